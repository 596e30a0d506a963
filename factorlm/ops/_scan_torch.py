"""The time recurrence of the fast F-LSTM / G-LSTM paths in plain PyTorch (the portable backend).

The recurrence proper: per step, the recurrent GEMM(s), the pointwise gate math and the
projection, forward and backward; the forward scans also start with the input-side GEMM over all
T·B rows (one call fewer from Python per layer, which batch-1 generation feels). What else can be
done for all rows at once (weight gradients, dL/dx) is done by the callers in
:mod:`factorlm.ops.flstm` / :mod:`factorlm.ops.glstm`. The C++ extension in
:mod:`factorlm.ops._extension` exports the same four functions with the same signatures, less
the keyword ``cell_math``: one step's pointwise gate math, :data:`TORCH_CELL_MATH` (a few PyTorch
ops per step) or the fused Triton kernels of :mod:`factorlm.ops._triton_cells`.
:mod:`factorlm.ops._backend` chooses between them.

Rows (see :mod:`factorlm.ops._packed`): every buffer holds one row per (step, sequence), step-major,
N rows in all; step t has ``batch_sizes[t]`` rows (non-increasing: the first sequences, those still
running), so a padded (T, B, ·) batch is the case of every batch size B, and a packed batch runs with
a shrinking batch and no padding. Step t reads h_{t-1} and c_{t-1} from the first
``batch_sizes[t]`` rows of step t-1 (h0 and c0 for t = 0); a sequence's final state stays in the
row of its last step, and the backward adds dL/dh_T and dL/dc_T there.

Conventions (k = groups, 1 for F-LSTM; nk = n/k; pk = p/k):
    Gate pre-activations are kept in the internal order [i, f, o, g] (not nn.LSTM's
    [i, f, g, o]) so that the three sigmoids act on one contiguous slice; the callers permute
    weights and bias once per call. One step's gates are a (k, B, 4, nk) tile: group j,
    batch row b, gate, cell m of the group (cell j·nk + m of the layer).
    Cell states and m = σ(o)⊙tanh(c) are stored in the layer's natural (rows, n) layout and viewed
    as (k, B, nk) for the pointwise math, which writes through strided views; tanh(c) is
    recomputed by the backward instead of stored. Buffers cover the whole sequence and are
    allocated once (G-LSTM's gates live in the caller's input-side buffer): no per-step
    allocations, and as few large fresh buffers as possible, since each costs page faults.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from factorlm.ops import _memory


def _grouped(t: Tensor, k: int) -> Tensor:
    """(B, n) -> its (k, B, n/k) view: group j's slice of every row."""
    batch, width = t.shape
    return t.view(batch, k, width // k).transpose(0, 1)


def _cell_forward(gates: Tensor, c_prev: Tensor, c: Tensor, m: Tensor, addend: Tensor | None = None) -> None:
    """Add ``addend`` (broadcastable, e.g. the bias as (k, 1, 4, nk)) to gates (k, B, 4, nk) and
    activate them in place; write c and m = σ(o)⊙tanh(c) (each (k, B, nk))."""
    if addend is not None:
        gates.add_(addend)
    gates[:, :, :3].sigmoid_()
    gates[:, :, 3].tanh_()
    i, f, o, g = gates.unbind(2)
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)
    torch.tanh(c, out=m)
    m.mul_(o)


def _cell_backward(gates: Tensor, c_prev: Tensor, c: Tensor, tanh_c: Tensor, dm: Tensor, dc: Tensor, dgates: Tensor) -> None:
    """One step of the pointwise backward.

    gates: activated (k, B, 4, nk); c_prev, c: cell states before and after the step (k, B, nk);
    tanh_c: scratch (k, B, nk) for tanh(c), recomputed rather than stored by the forward;
    dm = dL/dm_t (k, B, nk); dc: dL/dc_t from later steps, turned in place into dL/dc_{t-1};
    dgates (k, B, 4, nk) receives dL/d(pre-activation).
    """
    i, f, o, g = gates.unbind(2)
    di, df, do, dg = dgates.unbind(2)
    torch.tanh(c, out=tanh_c)
    torch.mul(tanh_c, tanh_c, out=do)  # do as scratch: dc += dm·σ(o)·(1 - tanh²c)
    do.neg_().add_(1).mul_(o).mul_(dm)
    dc.add_(do)
    torch.mul(dm, tanh_c, out=do)  # dm·tanh(c)·σ'(o), σ' = σ(1 - σ)
    do.mul_(o)
    do.addcmul_(do, o, value=-1)
    torch.mul(g, g, out=dg)  # dc·σ(i)·(1 - tanh²g)
    dg.neg_().add_(1).mul_(i).mul_(dc)
    torch.mul(dc, g, out=di)  # dc·tanh(g)·σ'(i)
    di.mul_(i)
    di.addcmul_(di, i, value=-1)
    torch.mul(dc, c_prev, out=df)  # dc·c_{t-1}·σ'(f)
    df.mul_(f)
    df.addcmul_(df, f, value=-1)
    dc.mul_(f)


class CellMath(NamedTuple):
    """One step's pointwise gate math, forward and backward, with the contracts of
    :func:`_cell_forward` and :func:`_cell_backward`."""

    forward: Callable[..., None]
    backward: Callable[..., None]


#: The plain-PyTorch cell (~8 pointwise kernels forward and ~20 backward per step).
TORCH_CELL_MATH = CellMath(_cell_forward, _cell_backward)


def _state_buffers(x_like: Tensor, rows: int, batch: int, n: int, p: int, proj: bool, c0: Tensor, keep: bool):
    """keep (training): out (N, p); cells (B + N, n) with c0 in its first B rows; m (N, n) (``out``
    itself without a projection). Not keep (inference, nothing saved for a backward): out (N, p);
    cells (B, n), c0 updated in place step after step, so that each row ends holding its sequence's
    c_T (rows of sequences that have ended are not touched again); m one step's (B, n) scratch (or out)."""
    out = _memory.empty(rows, p, like=x_like)
    cells = _memory.empty(batch + rows if keep else batch, n, like=x_like)
    cells[:batch].copy_(c0)
    m = _memory.empty(rows if keep else batch, n, like=x_like) if proj else out
    return out, cells, m


def _step_views(cells: Tensor, m: Tensor, batch: int, start: int, size: int, keep: bool, proj: bool):
    """Step t's c_t (size, n) in cells and m_t (size, n) in m, for the rows start … start + size."""
    if keep:
        return cells[batch + start : batch + start + size], m[start : start + size]
    return cells[:size], (m[:size] if proj else m[start : start + size])


def _first(t: Tensor, size: int) -> Tensor:
    """The first ``size`` rows of t (t itself when that is all of them: one view fewer per step)."""
    return t if t.shape[0] == size else t[:size]


def _step_starts(batch_sizes) -> list[int]:
    """First row of each step, and N at the end."""
    starts = [0]
    for size in batch_sizes:
        starts.append(starts[-1] + size)
    return starts


def flstm_forward_scan(
    x: Tensor, w1x_t: Tensor, bias: Tensor, w1h_t: Tensor, w2_t: Tensor, proj_t: Tensor | None, h0: Tensor,
    c0: Tensor, batch_sizes, keep: bool = True, *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """F-LSTM recurrence. x (N, p_in) the rows; w1x_t = W1x^T (p_in, r): u = x·W1x^T (N, r) is
    computed first, for all rows, and turned in place into z = W1·[x; h]; bias (4n) internal order
    incl. forget_bias; w1h_t = W1h^T (p, r); w2_t = W2^T (r, 4n) internal order; proj_t = W_hr^T
    (n, p) or None; h0 (B, p), c0 (B, n); batch_sizes the rows of each step (ints).

    Returns out (N, p), z (N, r), activated gates (N, 4n), cells (B + N, n) with c0 first, m (N, n)
    (``out`` itself when there is no projection). With keep=False (inference) gates and m are one
    step's scratch and cells is (B, n), each sequence's c_T (see :func:`_state_buffers`).
    """
    u = torch.mm(x, w1x_t)
    rows, rank = u.shape
    batch, p = h0.shape
    n = w2_t.shape[1] // 4
    proj = proj_t is not None
    out, cells, m = _state_buffers(u, rows, batch, n, p, proj, c0, keep)
    gates = _memory.empty(rows if keep else batch, 4 * n, like=u)
    cell_forward = cell_math.forward
    bias = bias.view(1, 1, 4, n)
    h, c_prev, start = h0, cells[:batch], 0
    for size in batch_sizes:
        step = slice(start, start + size)
        c_t, m_t = _step_views(cells, m, batch, start, size, keep, proj)
        z_t, gates_t = u[step], (gates[step] if keep else gates[:size])
        z_t.addmm_(_first(h, size), w1h_t)
        torch.mm(z_t, w2_t, out=gates_t)
        cell_forward(gates_t.view(1, size, 4, n), _first(c_prev, size)[None], c_t[None], m_t[None], bias)
        if proj:
            torch.mm(m_t, proj_t, out=out[step])
        h, c_prev, start = out[step], c_t, start + size
    return out, u, gates, cells, m


def _through_projection(dh_t: Tensor, proj: Tensor | None, buffer: Tensor | None) -> Tensor:
    """dL/dm_t = dL/dh_t · W_hr written into ``buffer`` (its first rows); dL/dh_t itself without a
    projection."""
    return dh_t if proj is None else torch.mm(dh_t, proj, out=_first(buffer, dh_t.shape[0]))


def _ending_rows_grad(dh: Tensor, dout: Tensor, dh_last: Tensor, start: int, size: int, following: int) -> None:
    """dL/dh of the rows of one step whose sequence ends there (rows ``following`` … ``size`` of the
    step that starts at row ``start``): dout + dL/dh_T, and no recurrent term."""
    if size > following:
        rows = slice(start + following, start + size)
        torch.add(dout[rows], dh_last[following:size], out=dh[rows])


def _cells_before(cells: Tensor, batch: int, starts: list[int], t: int, size: int) -> Tensor:
    """c_{t-1} of the ``size`` rows of step t: c0's rows for t = 0, else the first rows of step t-1."""
    first = 0 if t == 0 else batch + starts[t - 1]
    return cells[first : first + size]


def flstm_backward_scan(dout, dh_last, dc_last, gates, cells, w1h, w2, proj, batch_sizes, *,
                        cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`flstm_forward_scan` through time.

    dout (N, p), dh_last (B, p), dc_last (B, n): incoming gradients (dh_last/dc_last at each
    sequence's last step); gates, cells from the forward; w1h (r, p), w2 (4n, r) internal order,
    proj = W_hr (p, n) or None; batch_sizes as in the forward.

    Returns dgates (N, 4n) (pre-activation), dz (N, r), dh (N, p) = total dL/dh_t,
    dh0 (B, p), dc0 (B, n).
    """
    rows, four_n = gates.shape
    n = four_n // 4
    batch, p = dh_last.shape
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(rows, four_n, like=gates)
    dz = _memory.empty(rows, w2.shape[1], like=gates)
    dh = _memory.empty(rows, p, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    tanh_c = torch.empty(1, batch, n, **new)
    dh_rec = torch.empty(batch, p, **new)
    dc = dc_last.clone()  # rows of sequences that have not started (backwards) keep dL/dc_T
    cell_backward = cell_math.backward
    starts = _step_starts(batch_sizes)
    steps = len(batch_sizes)
    _ending_rows_grad(dh, dout, dh_last, starts[-2], batch_sizes[-1], 0)
    for t in range(steps - 1, -1, -1):
        size, start = batch_sizes[t], starts[t]
        step = slice(start, start + size)
        dm_t = _through_projection(dh[step], proj, dm)
        cell_backward(
            gates[step].view(1, size, 4, n), _cells_before(cells, batch, starts, t, size)[None],
            cells[batch + start : batch + start + size][None], tanh_c[:, :size], dm_t[None], _first(dc, size)[None],
            dgates[step].view(1, size, 4, n),
        )
        torch.mm(dgates[step], w2, out=dz[step])
        torch.mm(dz[step], w1h, out=_first(dh_rec, size))
        if t > 0:  # dL/dh_{t-1}: the recurrent term for the rows that go on, dL/dh_T for those that end
            before = starts[t - 1]
            torch.add(dout[before : before + size], _first(dh_rec, size), out=dh[before : before + size])
            _ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size)
    return dgates, dz, dh, dh_rec, dc


def glstm_forward_scan(
    x: Tensor, wih_t: Tensor, bias: Tensor, whh_t: Tensor, proj_t: Tensor | None, h0: Tensor, c0: Tensor,
    batch_sizes, keep: bool = True, *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """G-LSTM recurrence. x (N, p_in) the rows; wih_t (k, p_in/k, 4nk): each group's W_ih^T,
    internal gate order. The grouped input map ax = x·Wih^T (k, N, 4nk), without bias, is computed
    first for all rows; the recurrent term is accumulated into it in place and the gates are
    activated there. bias (k, 4nk) internal order incl. forget_bias; whh_t (k, pk, 4nk): each
    group's W_hh^T; proj_t = W_hr^T (n, p) or None; h0 (B, p), c0 (B, n); batch_sizes the rows of
    each step.

    Returns out (N, p), activated gates (k, N, 4nk), cells (B + N, n) with c0 first, m (N, n)
    (``out`` itself when there is no projection). With keep=False (inference) m is one step's
    scratch and cells is (B, n), each sequence's c_T (see :func:`_state_buffers`).
    """
    k, _, four_nk = wih_t.shape
    rows = x.shape[0]
    # No bias here: broadcasting it into the (k, N, 4nk) output first costs a full extra pass
    # over it; the cell math adds it instead.
    ax = _memory.empty(k, rows, four_nk, like=x)  # becomes the gates, in place
    torch.bmm(_grouped(x, k), wih_t, out=ax)
    batch, p = h0.shape
    nk = four_nk // 4
    n = nk * k
    proj = proj_t is not None
    out, cells, m = _state_buffers(ax, rows, batch, n, p, proj, c0, keep)
    bias = bias.view(k, 1, 4, nk)
    cell_forward = cell_math.forward
    h, c_prev, start = h0, cells[:batch], 0
    for size in batch_sizes:
        step = slice(start, start + size)
        c_t, m_t = _step_views(cells, m, batch, start, size, keep, proj)
        gates_t = ax[:, step]
        gates_t.baddbmm_(_grouped(_first(h, size), k), whh_t)
        cell_forward(
            gates_t.view(k, size, 4, nk), _grouped(_first(c_prev, size), k), _grouped(c_t, k), _grouped(m_t, k),
            bias,
        )
        if proj:
            torch.mm(m_t, proj_t, out=out[step])
        h, c_prev, start = out[step], c_t, start + size
    return out, ax, cells, m


def glstm_backward_scan(dout, dh_last, dc_last, gates, cells, whh, wih, proj, batch_sizes, *,
                        cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`glstm_forward_scan` through time.

    dout (N, p), dh_last (B, p), dc_last (B, n); gates (k, N, 4nk), cells from the forward;
    whh (k, 4nk, pk) internal order; wih (k, 4nk, p_in/k) internal order when dL/dx is wanted,
    else None; proj = W_hr (p, n) or None; batch_sizes as in the forward.

    Returns dgates (k, N, 4nk) (pre-activation; group-major so that the weight gradients are
    one bmm over all rows), dh (N, p) = total dL/dh_t, dh0 (B, p), dc0 (B, n), and dL/dx (N, p_in)
    or None. The C++ loop computes dL/dx step by step, in the same product as the recurrent
    term, while the step's dgates are still in cache; this loop returns None and leaves it to the
    caller's single product over all rows (one large GEMM, the better shape for cuBLAS).
    """
    k, rows, four_nk = gates.shape
    batch, p = dh_last.shape
    nk = four_nk // 4
    n = nk * k
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(*gates.shape, like=gates)
    dh = _memory.empty(rows, p, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    tanh_c = torch.empty(k, batch, nk, **new)
    rec_store = torch.empty(k * batch * (p // k), **new)  # each step's (k, B_t, pk) dL/dh_{t-1}, contiguous
    dc = dc_last.clone()
    cell_backward = cell_math.backward
    starts = _step_starts(batch_sizes)
    steps = len(batch_sizes)
    _ending_rows_grad(dh, dout, dh_last, starts[-2], batch_sizes[-1], 0)
    for t in range(steps - 1, -1, -1):
        size, start = batch_sizes[t], starts[t]
        step = slice(start, start + size)
        dm_t = _through_projection(dh[step], proj, dm)
        cell_backward(
            gates[:, step].view(k, size, 4, nk), _grouped(_cells_before(cells, batch, starts, t, size), k),
            _grouped(cells[batch + start : batch + start + size], k), tanh_c[:, :size], _grouped(dm_t, k),
            _grouped(_first(dc, size), k), dgates[:, step].view(k, size, 4, nk),
        )
        dh_rec = rec_store[: k * size * (p // k)].view(k, size, p // k)
        torch.bmm(dgates[:, step], whh, out=dh_rec)
        if t > 0:
            before = starts[t - 1]
            torch.add(_grouped(dout[before : before + size], k), dh_rec, out=_grouped(dh[before : before + size], k))
            _ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size)
    return dgates, dh, dh_rec.transpose(0, 1).reshape(batch, p), dc, None
