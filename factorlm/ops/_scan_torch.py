"""The time recurrence of the fast F-LSTM / G-LSTM paths in plain PyTorch (the portable backend).

Only what cannot be batched over time lives here: per step, the recurrent GEMM(s), the
pointwise gate math and the projection, forward and backward. Everything that can be done
for all T·B rows at once (input-side GEMMs, weight gradients) is done by the callers in
:mod:`factorlm.ops.flstm` / :mod:`factorlm.ops.glstm`. The C++ extension in
:mod:`factorlm.ops._extension` exports the same four functions with the same signatures, less
the keyword ``cell_math``: one step's pointwise gate math, :data:`TORCH_CELL_MATH` (a few PyTorch
ops per step) or the fused Triton kernels of :mod:`factorlm.ops._triton_cells`.
:mod:`factorlm.ops._backend` chooses between them.

Conventions (k = groups, 1 for F-LSTM; nk = n/k; pk = p/k):
    Gate pre-activations are kept in the internal order [i, f, o, g] (not nn.LSTM's
    [i, f, g, o]) so that the three sigmoids act on one contiguous slice; the callers permute
    weights and bias once per call. One step's gates are a (k, B, 4, nk) tile: group j,
    batch row b, gate, cell m of the group (cell j·nk + m of the layer).
    Cell states and m = σ(o)⊙tanh(c) are stored in the layer's natural (B, n) layout and viewed
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


def _state_buffers(x_like: Tensor, steps: int, batch: int, n: int, p: int, proj: bool, c0: Tensor):
    out = _memory.empty(steps, batch, p, like=x_like)
    cells = _memory.empty(steps + 1, batch, n, like=x_like)
    cells[0].copy_(c0)
    m = _memory.empty(steps, batch, n, like=x_like) if proj else out
    return out, cells, m


def flstm_forward_scan(
    u: Tensor, bias: Tensor, w1h_t: Tensor, w2_t: Tensor, proj_t: Tensor | None, h0: Tensor, c0: Tensor,
    *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """F-LSTM recurrence. u = x·W1x^T (T, B, r), contiguous, turned in place into z = W1·[x; h];
    bias (4n) internal order incl. forget_bias; w1h_t = W1h^T (p, r); w2_t = W2^T (r, 4n)
    internal order; proj_t = W_hr^T (n, p) or None; h0 (B, p), c0 (B, n).

    Returns out (T, B, p), z (T, B, r) (``u`` itself), activated gates (T, B, 4n), cells
    (T+1, B, n) with c0 first, m (T, B, n) (``out`` itself when there is no projection).
    """
    steps, batch, rank = u.shape
    n = w2_t.shape[1] // 4
    p = h0.shape[1]
    out, cells, m = _state_buffers(u, steps, batch, n, p, proj_t is not None, c0)
    gates = _memory.empty(steps, batch, 4 * n, like=u)
    cell_forward = cell_math.forward
    bias = bias.view(1, 1, 4, n)
    h = h0
    for t in range(steps):
        u[t].addmm_(h, w1h_t)
        torch.mm(u[t], w2_t, out=gates[t])
        cell_forward(gates[t].view(1, batch, 4, n), cells[t][None], cells[t + 1][None], m[t][None], bias)
        if proj_t is not None:
            torch.mm(m[t], proj_t, out=out[t])
        h = out[t]
    return out, u, gates, cells, m


def _through_projection(dh_t: Tensor, proj: Tensor | None, buffer: Tensor | None) -> Tensor:
    """dL/dm_t = dL/dh_t · W_hr written into ``buffer`` (B, n); dL/dh_t itself without a projection."""
    return dh_t if proj is None else torch.mm(dh_t, proj, out=buffer)


def flstm_backward_scan(dout, dh_last, dc_last, gates, cells, w1h, w2, proj, *, cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`flstm_forward_scan` through time.

    dout (T, B, p), dh_last (B, p), dc_last (B, n): incoming gradients; gates, cells from the
    forward; w1h (r, p), w2 (4n, r) internal order, proj = W_hr (p, n) or None.

    Returns dgates (T, B, 4n) (pre-activation), dz (T, B, r), dh (T, B, p) = total dL/dh_t,
    dh0 (B, p), dc0 (B, n).
    """
    steps, batch, four_n = gates.shape
    n = four_n // 4
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(*gates.shape, like=gates)
    dz = _memory.empty(steps, batch, w2.shape[1], like=gates)
    dh = _memory.empty(*dout.shape, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    tanh_c = torch.empty(1, batch, n, **new)
    dh_rec = torch.empty(batch, w1h.shape[1], **new)
    dc = dc_last.clone()
    cell_backward = cell_math.backward
    torch.add(dout[steps - 1], dh_last, out=dh[steps - 1])
    for t in range(steps - 1, -1, -1):
        dm_t = _through_projection(dh[t], proj, dm)
        cell_backward(
            gates[t].view(1, batch, 4, n), cells[t][None], cells[t + 1][None], tanh_c, dm_t[None], dc[None],
            dgates[t].view(1, batch, 4, n),
        )
        torch.mm(dgates[t], w2, out=dz[t])
        torch.mm(dz[t], w1h, out=dh_rec)
        if t > 0:
            torch.add(dout[t - 1], dh_rec, out=dh[t - 1])
    return dgates, dz, dh, dh_rec, dc


def glstm_forward_scan(
    ax: Tensor, bias: Tensor, whh_t: Tensor, proj_t: Tensor | None, h0: Tensor, c0: Tensor,
    *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """G-LSTM recurrence. ax (k, T·B, 4nk), contiguous: the grouped input map x·Wih^T without bias,
    internal gate order; the recurrent term is accumulated into it in place and the gates are
    activated there. bias (k, 4nk) internal order incl. forget_bias; whh_t (k, pk, 4nk): each
    group's W_hh^T; proj_t = W_hr^T (n, p) or None; h0 (B, p), c0 (B, n).

    Returns out (T, B, p), activated gates (k, T·B, 4nk) (``ax`` itself), cells (T+1, B, n)
    with c0 first, m (T, B, n) (``out`` itself when there is no projection).
    """
    k, rows, four_nk = ax.shape
    batch, p = h0.shape
    steps = rows // batch
    nk = four_nk // 4
    n = nk * k
    out, cells, m = _state_buffers(ax, steps, batch, n, p, proj_t is not None, c0)
    bias = bias.view(k, 1, 4, nk)
    cell_forward = cell_math.forward
    h = h0
    for t in range(steps):
        gates_t = ax[:, t * batch : (t + 1) * batch]
        gates_t.baddbmm_(_grouped(h, k), whh_t)
        cell_forward(
            gates_t.view(k, batch, 4, nk), _grouped(cells[t], k), _grouped(cells[t + 1], k), _grouped(m[t], k), bias
        )
        if proj_t is not None:
            torch.mm(m[t], proj_t, out=out[t])
        h = out[t]
    return out, ax, cells, m


def glstm_backward_scan(dout, dh_last, dc_last, gates, cells, whh, proj, *, cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`glstm_forward_scan` through time.

    dout (T, B, p), dh_last (B, p), dc_last (B, n); gates (k, T·B, 4nk), cells from the forward;
    whh (k, 4nk, pk) internal order; proj = W_hr (p, n) or None.

    Returns dgates (k, T·B, 4nk) (pre-activation; group-major so that the weight gradients are
    one bmm over all T·B rows), dh (T, B, p) = total dL/dh_t, dh0 (B, p), dc0 (B, n).
    """
    k, rows, four_nk = gates.shape
    steps, batch, p = dout.shape
    nk = four_nk // 4
    n = nk * k
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(*gates.shape, like=gates)
    dh = _memory.empty(*dout.shape, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    tanh_c = torch.empty(k, batch, nk, **new)
    dh_rec = torch.empty(k, batch, p // k, **new)
    dc = dc_last.clone()
    cell_backward = cell_math.backward
    torch.add(dout[steps - 1], dh_last, out=dh[steps - 1])
    for t in range(steps - 1, -1, -1):
        dm_t = _through_projection(dh[t], proj, dm)
        rows_t = slice(t * batch, (t + 1) * batch)
        cell_backward(
            gates[:, rows_t].view(k, batch, 4, nk), _grouped(cells[t], k), _grouped(cells[t + 1], k), tanh_c,
            _grouped(dm_t, k), _grouped(dc, k), dgates[:, rows_t].view(k, batch, 4, nk),
        )
        torch.bmm(dgates[:, rows_t], whh, out=dh_rec)
        if t > 0:
            torch.add(_grouped(dout[t - 1], k), dh_rec, out=_grouped(dh[t - 1], k))
    return dgates, dh, dh_rec.transpose(0, 1).reshape(batch, p), dc
