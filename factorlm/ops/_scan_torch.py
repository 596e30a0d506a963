"""The time recurrence of the fast F-LSTM / G-LSTM / G∘F-LSTM paths in plain PyTorch (the portable
backend).

The recurrence proper: per step, the recurrent GEMM(s), the pointwise gate math and the
projection, forward and backward; the forward scans also start with the input-side GEMM over all
T·B rows (one call fewer from Python per layer, which batch-1 generation feels). What else can be
done for all rows at once (weight gradients, dL/dx) is done by the callers in
:mod:`factorlm.ops.flstm` / :mod:`factorlm.ops.glstm` / :mod:`factorlm.ops.gflstm`. The C++
extension in :mod:`factorlm.ops._extension` exports the F-LSTM and G-LSTM functions with the same
signatures, less the keyword ``cell_math`` (it has no G∘F-LSTM loop: see :mod:`factorlm.ops.gflstm`).
``cell_math`` is one step's pointwise gate math, :data:`TORCH_CELL_MATH` (a few PyTorch ops per
step) or the fused Triton kernels of :mod:`factorlm.ops._triton_cells`.
:mod:`factorlm.ops._backend` chooses between them.

Rows (see :mod:`factorlm.ops._packed`): every buffer holds one row per (step, sequence), step-major,
N rows in all; step t has ``batch_sizes[t]`` rows (non-increasing: the first sequences, those still
running), so a padded (T, B, ·) batch is the case of every batch size B, and a packed batch runs with
a shrinking batch and no padding. Step t reads h_{t-1} and c_{t-1} from the first
``batch_sizes[t]`` rows of step t-1 (h0 and c0 for t = 0); a sequence's final state stays in the
row of its last step, and the backward adds dL/dh_T and dL/dc_T there.

Conventions (k = groups, 1 for F-LSTM; nk = n/k; pk = p/k):
    Gate pre-activations are in torch.nn.LSTM's order [i, f, g, o], the order of the layer's
    weight rows and bias, so that the scans read the weights as they are (transposed views, no
    copies) and the backward's gradients need no re-ordering. One step's gates are a
    (k, B, 4, nk) tile: group j, batch row b, gate, cell m of the group (cell j·nk + m of the
    layer). The bias is the layer's (4n,) in that order, gate-major (group j's part of gate s at
    s·n + j·nk), read through a (k, 1, 4, nk) view; forget_bias is added to a copy only when it
    is not 0.
    Cell states and m = σ(o)⊙tanh(c) are stored in the layer's natural (rows, n) layout and viewed
    as (k, B, nk) for the pointwise math, which writes through strided views; tanh(c) is
    recomputed by the backward instead of stored. Buffers cover the whole sequence and are
    allocated once (G-LSTM's gates live in the caller's input-side buffer): no per-step
    allocations but the PyTorch cell's one (rows, n) buffer per run of steps it prepares for the
    backward, and as few large fresh buffers as possible, since each costs page faults.
    Each step's views of a buffer are taken before the loop, by one split call per buffer: on
    small steps the per-step Python and view overhead, not arithmetic, is what a step costs.

Coupled input and forget gates (CIFG, ``num_gates`` G = 3 on the layers): every "4" above is G,
the gates are [i, g, o] with f = 1 - σ(i), and forget_bias is subtracted from i instead of added to
f (factorlm.nn.reference). The scans read G off the shapes (the gate rows over n = c0's width, which
the public functions have checked against the num_gates they were given); the cell maths below
take a (k, B, G, nk) tile and branch on its G, and so do the C++ and Triton cells.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from factorlm.ops import _memory


def _grouped(t: Tensor, k: int) -> Tensor:
    """(B, n) -> its (k, B, n/k) view: group j's slice of every row."""
    batch, width = t.shape
    return t.view(batch, k, width // k).transpose(0, 1)


def _cell_forward(gates: Tensor, c_prev: Tensor, c: Tensor, m: Tensor, addend: Tensor | None = None) -> None:
    """Add ``addend`` (broadcastable, e.g. the bias as (k, 1, 4, nk)) to gates (k, B, 4, nk),
    [i, f, g, o], and activate them in place; write c and m = σ(o)⊙tanh(c) (each (k, B, nk)).
    A (k, B, 3, nk) tile is the coupled cell's [i, g, o]: :func:`_coupled_cell_forward`."""
    if addend is not None:
        gates.add_(addend)
    if gates.shape[2] == 3:
        _coupled_cell_forward(gates, c_prev, c, m)
        return
    i, f, g, o = gates.unbind(2)
    gates.narrow(2, 0, 2).sigmoid_()  # i and f: one kernel
    o.sigmoid_()
    g.tanh_()
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)
    torch.tanh(c, out=m)
    m.mul_(o)


def _coupled_cell_forward(gates: Tensor, c_prev: Tensor, c: Tensor, m: Tensor) -> None:
    """The coupled cell on pre-activations [i, g, o] (k, B, 3, nk), the bias already added:
    activated in place; c = (1 - σi)·c_prev + σi·tanh g, m = σ(o)⊙tanh(c)."""
    i, g, o = gates.unbind(2)
    i.sigmoid_()
    g.tanh_()
    o.sigmoid_()
    torch.lerp(c_prev, g, i, out=c)  # c_prev + i·(g - c_prev)
    torch.tanh(c, out=m)
    m.mul_(o)


def _prepare_backward(gates: Tensor, c: Tensor, dgates: Tensor) -> Tensor:
    """The part of the pointwise backward that does not depend on the recurrence, for the rows of
    many steps at once (see :func:`_prepared_backwards`): each step then needs 7 pointwise kernels
    instead of ~20.

    gates: activated (k, N, 4, nk), [i, f, g, o]; c: the cell state after each row's step
    (k, N, nk); dgates (k, N, 4, nk) receives each gate's local factor, which the step completes in
    place: i: tanh(g)·σ'(i), f: σ'(f), g: σ(i)·(1 - tanh²g), o: tanh(c)·σ'(o), with σ' = σ(1 - σ).
    Returns A = σ(o)·(1 - tanh²c) (k, N, nk), through which dL/dm_t reaches dL/dc_t.

    A (k, N, 3, nk) tile is the coupled cell's, [i, g, o]: the local factors are then
    i: σi·(tanh g - c), which equals σ'(i)·(tanh g - c_{t-1}) since c - c_{t-1} = σi·(tanh g - c_{t-1})
    (c_{t-1} is not at hand here: a packed batch's previous rows are not a shift), g: σ(i)·(1 - tanh²g),
    o: tanh(c)·σ'(o).
    """
    if gates.shape[2] == 3:
        i, g, o = gates.unbind(2)
        di, dg, do = dgates.unbind(2)
        torch.sub(g, c, out=di)
        di.mul_(i)
        torch.mul(g, g, out=dg)
        dg.neg_().add_(1).mul_(i)
        torch.addcmul(o, o, o, value=-1, out=do)
        a = _memory.empty(*c.shape, like=c)
        torch.tanh(c, out=a)
        do.mul_(a)
        a.mul_(a).neg_().add_(1).mul_(o)
        return a
    i, f, g, o = gates.unbind(2)
    di, df, dg, do = dgates.unbind(2)
    # σ' of i, f and o in one kernel, over all four gates (g's slot is overwritten just below):
    # cheaper than one kernel for i, f and another for o, which are not adjacent
    torch.addcmul(gates, gates, gates, value=-1, out=dgates)
    di.mul_(g)
    torch.mul(g, g, out=dg)
    dg.neg_().add_(1).mul_(i)
    a = _memory.empty(*c.shape, like=c)
    torch.tanh(c, out=a)
    do.mul_(a)
    a.mul_(a).neg_().add_(1).mul_(o)
    return a


def _cell_backward(gates: Tensor, c_prev: Tensor, c: Tensor, a: Tensor, dm: Tensor, dc: Tensor, dgates: Tensor) -> None:
    """One step of the pointwise backward, after :func:`_prepare_backward` ran for its rows.

    gates: activated (k, B, 4, nk), [i, f, g, o]; c_prev: the cell state before the step (k, B, nk); c: not
    needed here (it is part of the :class:`CellMath` contract); a: the step's rows of what
    :func:`_prepare_backward` returned; dm = dL/dm_t (k, B, nk); dc: dL/dc_t from later steps,
    turned in place into dL/dc_{t-1}; dgates (k, B, 4, nk) holds the step's local factors and
    receives dL/d(pre-activation). A coupled (k, B, 3, nk) tile: dL/dc_{t-1} = dL/dc_t·(1 - σi).
    """
    if gates.shape[2] == 3:
        di, dg, do = dgates.unbind(2)
        dc.addcmul_(dm, a)
        di.mul_(dc)
        dg.mul_(dc)
        do.mul_(dm)
        dc.addcmul_(dc, gates.select(2, 0), value=-1)  # dc·(1 - i), elementwise in place
        return
    di, df, dg, do = dgates.unbind(2)  # whole-gate views: a view costs as much as a small kernel
    dc.addcmul_(dm, a)  # now all of dL/dc_t
    di.mul_(dc)
    df.mul_(dc).mul_(c_prev)  # c_{t-1} here, as a packed batch's rows of step t-1 are not a shift
    dg.mul_(dc)
    do.mul_(dm)
    dc.mul_(gates.select(2, 1))


class CellMath(NamedTuple):
    """Pointwise gate math, with the contracts of :func:`_cell_forward` (one step),
    :func:`_cell_backward` (one step) and, when given, ``prepare`` (:func:`_prepare_backward`: on
    runs of steps, before the backward loop reaches them); ``backward`` then receives the step's
    rows of what ``prepare`` returned as its fourth argument, else None."""

    forward: Callable[..., None]
    backward: Callable[..., None]
    prepare: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


#: The plain-PyTorch cell: 8 pointwise kernels a step forward; backward ~10 per run of steps
#: (:data:`PREPARE_CHUNK`), then 7 a step.
TORCH_CELL_MATH = CellMath(_cell_forward, _cell_backward, _prepare_backward)


def _gate_addend(bias: Tensor | None, forget_bias: float, k: int, nk: int, like: Tensor,
                 num_gates: int = 4) -> Tensor | None:
    """What the cell adds to a step's gates (k, B, G, nk): the layer's bias (G·n,) in nn.LSTM order
    as a (k, 1, G, nk) view, plus forget_bias on f (G = 4), or minus forget_bias on i (G = 3, the
    coupled cell: f = 1 - σ(i)) (then a (G, n) copy, made once per call, or zeros like ``like``
    without a bias); None when there is neither."""
    n = k * nk
    if forget_bias == 0.0:
        if bias is None:
            return None
        b = bias.view(num_gates, n)
    else:
        b = like.new_zeros(num_gates, n) if bias is None else bias.view(num_gates, n).clone()
        if num_gates == 3:
            b[0] -= forget_bias
        else:
            b[1] += forget_bias
    return b.view(num_gates, k, nk).transpose(0, 1).unsqueeze(1)


def _state_buffers(x_like: Tensor, rows: int, batch: int, n: int, p: int, proj: bool, c0: Tensor, keep: bool):
    """keep (training): out (N, p); cells (B + N, n) with c0 in its first B rows; m (N, n) (``out``
    itself without a projection). Not keep (inference, nothing saved for a backward): out (N, p);
    cells (B, n), updated in place step after step, so that each row ends holding its sequence's
    c_T (rows of sequences that have ended are not touched again); m one step's (B, n) scratch (or out).
    Also returns the (B, n) cell state that step 0 reads: c0's copy in cells (keep), or c0 itself
    (inference: step 0 writes every row of cells, so nothing needs copying there)."""
    out = _memory.empty(rows, p, like=x_like)
    cells = _memory.empty(batch + rows if keep else batch, n, like=x_like)
    if keep or rows == 0:
        cells[:batch].copy_(c0)
        c_first = cells[:batch]
    else:
        c_first = c0.contiguous()
    m = _memory.empty(rows if keep else batch, n, like=x_like) if proj else out
    return out, cells, m, c_first


def _head(t: Tensor, size: int, dim: int = 0) -> Tensor:
    """The first ``size`` rows of t along ``dim`` (t itself when that is all of them: no view)."""
    return t if t.shape[dim] == size else t.narrow(dim, 0, size)


def _steps(t: Tensor, sizes: list[int], per_step: bool = True, dim: int = 0) -> Sequence[Tensor]:
    """Each step's rows of t along ``dim``. When t holds every step's rows (``per_step``), they are
    consecutive blocks of ``sizes`` rows, taken as views by one split call: a view costs ~0.5 µs
    there against 1-3 µs for a slice or a small helper each step, and that overhead, not
    arithmetic, is what a small step costs (on a GPU, the CPU time per step bounds the speed).
    Otherwise t is one step's scratch that every step reuses, and step t gets its first sizes[t] rows.
    A single step (token-by-token generation) gets t itself, without a view."""
    if len(sizes) == 1:
        return (_head(t, sizes[0], dim),)
    if per_step:
        return t.split(sizes, dim)
    return [_head(t, size, dim) for size in sizes]


def _previous(steps: Sequence[Tensor], first: Tensor, t: int, size: int, dim: int = 0) -> Tensor:
    """What step t reads of step t-1 (of ``first``, the initial state, for t = 0): the first
    ``size`` rows along ``dim``, those of the sequences still running."""
    return _head(first if t == 0 else steps[t - 1], size, dim)


#: How many gate elements (rows × 4n) :func:`_prepared_backwards` prepares at a time: 1 MB of
#: float32. Small steps are prepared many at once (fewer, larger kernels: the point of preparing);
#: a large step alone, while its tile is still in cache (G-LSTM k=8 at p=256, n=2048, B=128: the
#: whole sequence's 84 MB of gates in one pass made its backward 10% slower, measured).
PREPARE_CHUNK = 1 << 18


def _prepared_backwards(cell_math: CellMath, gates: Tensor, c: Tensor, dgates: Tensor, sizes: list[int]) -> Iterator:
    """For t = T-1 … 0, the order of the backward loop, step t's rows (along dim 1) of
    ``cell_math.prepare`` (gates, dgates (k, N, 4, nk), c (k, N, nk)), run on runs of consecutive
    steps of about :data:`PREPARE_CHUNK` elements each as the loop reaches them; None for every
    step where the cell math has no such part."""
    if cell_math.prepare is None:
        yield from [None] * len(sizes)
        return
    width = gates.shape[0] * gates.shape[2] * gates.shape[3]
    end, end_row = len(sizes), gates.shape[1]
    while end > 0:
        begin, rows = end - 1, sizes[end - 1]
        while begin > 0 and (rows + sizes[begin - 1]) * width <= PREPARE_CHUNK:
            begin -= 1
            rows += sizes[begin]
        first = end_row - rows
        chunk = [t.narrow(1, first, rows) for t in (gates, c, dgates)]
        yield from reversed(cell_math.prepare(*chunk).split(sizes[begin:end], 1))
        end, end_row = begin, first


def flstm_forward_scan(
    x: Tensor, w1: Tensor, bias: Tensor | None, forget_bias: float, w2: Tensor, proj: Tensor | None, h0: Tensor,
    c0: Tensor, batch_sizes, keep: bool = True, *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """F-LSTM recurrence. x (N, p_in) the rows; the layer's weights as they are, w1 (r, p_in + p),
    w2 (4n, r), proj = W_hr (p, n) or None, multiplied through their transposed views:
    u = x·W1x^T (N, r) is computed first, for all rows, and turned in place into z = W1·[x; h];
    bias (4n,) or None and the constant forget_bias (added to f); h0 (B, p), c0 (B, n);
    batch_sizes the rows of each step (ints).

    Returns out (N, p), z (N, r), activated gates (N, 4n), cells (B + N, n) with c0 first, m (N, n)
    (``out`` itself when there is no projection). With keep=False (inference) gates and m are one
    step's scratch and cells is (B, n), each sequence's c_T (see :func:`_state_buffers`).
    """
    p_in = x.shape[1]
    w1x_t, w1h_t, w2_t = w1[:, :p_in].t(), w1[:, p_in:].t(), w2.t()
    proj_t = None if proj is None else proj.t()
    u = torch.mm(x, w1x_t)
    rows = u.shape[0]
    batch, p = h0.shape
    n = c0.shape[1]
    num_gates = w2_t.shape[1] // n
    proj = proj_t is not None
    out, cells, m, c_first = _state_buffers(u, rows, batch, n, p, proj, c0, keep)
    gates = _memory.empty(rows if keep else batch, num_gates * n, like=u)
    sizes = list(batch_sizes)
    zs, outs = _steps(u, sizes), _steps(out, sizes)
    gate_rows, gate_tiles = _steps(gates, sizes, keep), _steps(gates.view(1, -1, num_gates, n), sizes, keep, 1)
    cs = _steps((cells[batch:] if keep else cells)[None], sizes, keep, 1)
    m_rows, m_tiles = _steps(m, sizes, keep or not proj), _steps(m[None], sizes, keep or not proj, 1)
    c0_tile = c_first[None]
    cell_forward = cell_math.forward
    addend = _gate_addend(bias, forget_bias, 1, n, u, num_gates)
    for t, size in enumerate(sizes):
        zs[t].addmm_(_previous(outs, h0, t, size), w1h_t)
        torch.mm(zs[t], w2_t, out=gate_rows[t])
        cell_forward(gate_tiles[t], _previous(cs, c0_tile, t, size, 1), cs[t], m_tiles[t], addend)
        if proj:
            torch.mm(m_rows[t], proj_t, out=outs[t])
    return out, u, gates, cells, m


def _ending_rows_grad(dh_t: Tensor, dout_t: Tensor, dh_last: Tensor, following: int) -> None:
    """dL/dh of the rows of one step whose sequence ends there (its rows ``following`` onwards;
    dh_t, dout_t that step's (rows, p)): dout + dL/dh_T, and no recurrent term."""
    size = dh_t.shape[0]
    if size > following:
        torch.add(dout_t[following:], dh_last[following:size], out=dh_t[following:])


def flstm_backward_scan(dout, dh_last, dc_last, gates, cells, w1h, w2, proj, batch_sizes, z=None, *,
                        cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`flstm_forward_scan` through time.

    dout (N, p), dh_last (B, p), dc_last (B, n): incoming gradients (dh_last/dc_last at each
    sequence's last step); gates, cells from the forward; w1h (r, p), w2 (4n, r),
    proj = W_hr (p, n) or None; batch_sizes as in the forward; z (N, r) the forward's factor
    rows, for a loop that sums dL/dW2 itself (unused here).

    Returns dgates (N, 4n) (pre-activation), dz (N, r), dh (N, p) = total dL/dh_t,
    dh0 (B, p), dc0 (B, n), and dL/dW2 (4n, r) and Σ_rows dgates (4n,), None here: the caller's
    products over all rows. The C++ loop, given z, sums those two every few steps from a ring of
    dgates that stays in cache, and returns no dgates.
    """
    rows, four_n = gates.shape
    n = dc_last.shape[1]
    num_gates = four_n // n
    batch, p = dh_last.shape
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(rows, four_n, like=gates)
    dz = _memory.empty(rows, w2.shape[1], like=gates)
    dh = _memory.empty(rows, p, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    dh_rec = torch.empty(batch, p, **new)
    dc = dc_last.clone()  # rows of sequences that have not started (backwards) keep dL/dc_T
    sizes = list(batch_sizes)
    gate_tiles, dgate_tiles = (_steps(t.view(1, rows, num_gates, n), sizes, dim=1) for t in (gates, dgates))
    prepared = _prepared_backwards(cell_math, gates.view(1, rows, num_gates, n), cells[batch:][None],
                                   dgates.view(1, rows, num_gates, n), sizes)
    cs, c0_tile = _steps(cells[batch:][None], sizes, dim=1), cells[:batch][None]
    dgate_rows, dzs, dhs, douts = (_steps(t, sizes) for t in (dgates, dz, dh, dout))
    cell_backward = cell_math.backward
    _ending_rows_grad(dhs[-1], douts[-1], dh_last, 0)
    for t in range(len(sizes) - 1, -1, -1):
        size = sizes[t]
        dm_t = dhs[t] if proj is None else torch.mm(dhs[t], proj, out=_head(dm, size))
        cell_backward(gate_tiles[t], _previous(cs, c0_tile, t, size, 1), cs[t], next(prepared), dm_t[None],
                      _head(dc, size)[None], dgate_tiles[t])
        torch.mm(dgate_rows[t], w2, out=dzs[t])
        rec = torch.mm(dzs[t], w1h, out=_head(dh_rec, size))
        if t > 0:  # dL/dh_{t-1}: the recurrent term for the rows that go on, dL/dh_T for those that end
            torch.add(_head(douts[t - 1], size), rec, out=_head(dhs[t - 1], size))
            _ending_rows_grad(dhs[t - 1], douts[t - 1], dh_last, size)
    return dgates, dz, dh, dh_rec, dc, None, None


def glstm_forward_scan(
    x: Tensor, w_ih: Tensor, bias: Tensor | None, forget_bias: float, w_hh: Tensor, proj: Tensor | None,
    h0: Tensor, c0: Tensor, batch_sizes, keep: bool = True, *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """G-LSTM recurrence. x (N, p_in) the rows; the layer's weights as they are, w_ih
    (k, 4nk, p_in/k), w_hh (k, 4nk, pk), proj = W_hr (p, n) or None, multiplied through their
    transposed views. The grouped input map ax = x·Wih^T (k, N, 4nk), without bias, is computed
    first for all rows; the recurrent term is accumulated into it in place and the gates are
    activated there. bias (4n,) or None and the constant forget_bias, as in
    :func:`flstm_forward_scan`; h0 (B, p), c0 (B, n); batch_sizes the rows of each step.

    Returns out (N, p), activated gates (k, N, 4nk), cells (B + N, n) with c0 first, m (N, n)
    (``out`` itself when there is no projection), and the weight gradients' operand: None here,
    where the C++ loop may return the rows [x^(j); h_{t-1}^(j); 1] its products used (see
    :func:`factorlm.ops._function.grouped_gate_weight_grads`). With keep=False (inference) m is
    one step's scratch and cells is (B, n), each sequence's c_T (see :func:`_state_buffers`).
    """
    wih_t, whh_t = w_ih.transpose(1, 2), w_hh.transpose(1, 2)
    k = wih_t.shape[0]
    # No bias here: broadcasting it into the (k, N, 4nk) output first costs a full extra pass
    # over it; the cell math adds it instead.
    ax = _memory.empty(k, x.shape[0], wih_t.shape[2], like=x)  # becomes the gates, in place
    torch.bmm(_grouped(x, k), wih_t, out=ax)

    def recurrent(t: int, h_prev: Tensor, gates_t: Tensor) -> None:
        gates_t.baddbmm_(h_prev, whh_t)

    out, cells, m = _grouped_forward_scan(ax, True, h0, c0, bias, forget_bias, proj, batch_sizes, keep, cell_math,
                                          recurrent)
    return out, ax, cells, m, None


def glstm_backward_scan(dout, dh_last, dc_last, gates, cells, whh, wih, proj, batch_sizes, operand=None, *,
                        cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`glstm_forward_scan` through time.

    dout (N, p), dh_last (B, p), dc_last (B, n); gates (k, N, 4nk), cells from the forward;
    whh (k, 4nk, pk); wih (k, 4nk, p_in/k) when dL/dx is wanted,
    else None; proj = W_hr (p, n) or None; batch_sizes as in the forward.

    Returns dgates (k, N, 4nk) (pre-activation; group-major so that the weight gradients are
    one bmm over all rows), dh (N, p) = total dL/dh_t, dh0 (B, p), dc0 (B, n), dL/dx (N, p_in)
    or None, and the weight gradients or None. The C++ loop computes dL/dx step by step, in the
    same product as the recurrent term, while the step's dgates are still in cache, and, given
    ``operand`` (the rows its forward kept), the weight gradients every few steps from a ring of
    dgates, which it then does not return. This loop returns None for both and leaves them to the
    caller's single products over all rows (large GEMMs, the better shape for cuBLAS); ``operand``
    is then unused (its forward returns none).
    """
    def recurrent(t: int, dgates_t: Tensor, out: Tensor) -> None:
        torch.bmm(dgates_t, whh, out=out)

    dgates, dh, dh0, dc0 = _grouped_backward_scan(dout, dh_last, dc_last, gates, cells, proj, batch_sizes,
                                                  cell_math, recurrent)
    return dgates, dh, dh0, dc0, None, None


def gflstm_forward_scan(
    x: Tensor, w1: Tensor, bias: Tensor | None, forget_bias: float, w2: Tensor, proj: Tensor | None,
    h0: Tensor, c0: Tensor, batch_sizes, keep: bool = True, *, cell_math: CellMath = TORCH_CELL_MATH,
):
    """G∘F-LSTM recurrence: F-LSTM's two products per step, each one bmm over the k groups.

    x (N, p_in) the rows; the layer's weights as they are, w1 (k, r, mk) with group j's columns
    [x^(j); h^(j)] (mk = (p_in + p)/k), w2 (k, 4nk, r) (G·nk with G gates: G read off the
    shapes, as in every scan here), proj = W_hr (p, n) or None, multiplied
    through their transposed views. u = x^(j)·W1x^(j)^T (k, N, r) is computed first, for all rows,
    and turned in place into z^(j) = W1^(j)·[x^(j); h^(j)] step by step; the gates
    W2^(j)·z^(j) (k, N, 4nk) are G-LSTM's tiles, so the cell math is shared. Nothing of rank
    4nk × mk is ever formed: a step costs B·r·(pk + 4nk) multiply-adds per group.
    bias (4n,) or None and the constant forget_bias as in :func:`flstm_forward_scan`; h0 (B, p),
    c0 (B, n); batch_sizes the rows of each step.

    Returns out (N, p), z (k, N, r), activated gates (k, N, 4nk), cells (B + N, n) with c0 first,
    m (N, n) (``out`` itself when there is no projection). With keep=False (inference) gates and m
    are one step's scratch and cells is (B, n), each sequence's c_T (see :func:`_state_buffers`).
    """
    k, r = w1.shape[0], w1.shape[1]
    pk_in = x.shape[1] // k
    w1_t = w1.transpose(1, 2)  # (k, mk, r)
    w1x_t, w1h_t, w2_t = w1_t[:, :pk_in], w1_t[:, pk_in:], w2.transpose(1, 2)
    rows = x.shape[0]
    u = _memory.empty(k, rows, r, like=x)  # becomes z, in place
    torch.bmm(_grouped(x, k), w1x_t, out=u)
    gates = _memory.empty(k, rows if keep else h0.shape[0], w2_t.shape[2], like=u)
    zs = _steps(u, list(batch_sizes), dim=1)

    def recurrent(t: int, h_prev: Tensor, gates_t: Tensor) -> None:
        zs[t].baddbmm_(h_prev, w1h_t)
        torch.bmm(zs[t], w2_t, out=gates_t)

    out, cells, m = _grouped_forward_scan(gates, keep, h0, c0, bias, forget_bias, proj, batch_sizes, keep,
                                          cell_math, recurrent)
    return out, u, gates, cells, m


def _grouped_forward_scan(gates: Tensor, gates_per_step: bool, h0: Tensor, c0: Tensor, bias: Tensor | None,
                          forget_bias: float, proj: Tensor | None, batch_sizes, keep: bool, cell_math: CellMath,
                          recurrent: Callable[[int, Tensor, Tensor], None]):
    """The forward time loop G-LSTM and G∘F-LSTM share. ``gates`` (k, N or B, 4nk) holds each step's
    pre-activations (all rows' when ``gates_per_step``, else one step's scratch); per step
    ``recurrent(t, h_prev, gates_t)`` adds the layer's recurrent term for the groups' h_{t-1}
    (k, B_t, pk) into gates_t (k, B_t, 4nk), then the cell runs and, with ``proj`` = W_hr (p, n),
    the projection. Returns out (N, p), cells, m as :func:`glstm_forward_scan` describes."""
    k, _, four_nk = gates.shape
    sizes = list(batch_sizes)
    rows = sum(sizes)
    batch, p = h0.shape
    n = c0.shape[1]
    nk = n // k
    num_gates = four_nk // nk
    proj_t = None if proj is None else proj.t()
    has_proj = proj_t is not None
    out, cells, m, c_first = _state_buffers(gates, rows, batch, n, p, has_proj, c0, keep)
    gate_rows = _steps(gates, sizes, gates_per_step, 1)
    gate_tiles = _steps(gates.view(k, -1, num_gates, nk), sizes, gates_per_step, 1)
    outs = _steps(out, sizes)
    hs = _steps(_grouped(out, k), sizes, dim=1) if len(sizes) > 1 else ()  # step t reads hs[t - 1]
    cs = _steps(_grouped(cells[batch:] if keep else cells, k), sizes, keep, 1)
    m_rows, m_tiles = (_steps(m, sizes, keep or not has_proj),
                       _steps(_grouped(m, k), sizes, keep or not has_proj, 1))
    h0_tile, c0_tile = _grouped(h0, k), _grouped(c_first, k)
    addend = _gate_addend(bias, forget_bias, k, nk, gates, num_gates)
    cell_forward = cell_math.forward
    for t, size in enumerate(sizes):
        recurrent(t, _previous(hs, h0_tile, t, size, 1), gate_rows[t])
        cell_forward(gate_tiles[t], _previous(cs, c0_tile, t, size, 1), cs[t], m_tiles[t], addend)
        if has_proj:
            torch.mm(m_rows[t], proj_t, out=outs[t])
    return out, cells, m


def gflstm_backward_scan(dout, dh_last, dc_last, gates, cells, w1h, w2, proj, batch_sizes, z=None, *,
                         cell_math: CellMath = TORCH_CELL_MATH):
    """Backward of :func:`gflstm_forward_scan` through time.

    dout (N, p), dh_last (B, p), dc_last (B, n); gates (k, N, 4nk), cells from the forward;
    w1h (k, r, pk) the recurrent columns of W1, w2 (k, 4nk, r); proj = W_hr (p, n) or None;
    batch_sizes as in the forward; z (k, N, r) the forward's factor rows, for a loop that sums
    dL/dW2 itself (unused here).

    Returns dgates (k, N, 4nk) (pre-activation), dz (k, N, r), dh (N, p) = total dL/dh_t,
    dh0 (B, p), dc0 (B, n): per step two bmms, dz = dgates·W2 and dL/dh_{t-1} = dz·W1h; every
    weight gradient and dL/dx are left to the caller's products over all rows, so the last two
    results, dL/dW2 transposed (k, r, 4nk) and Σ_rows dgates (k, 4nk), are None here. The C++
    loop, given z, sums those two every few steps from a ring of dgates, and returns no dgates.
    """
    dz = _memory.empty(gates.shape[0], gates.shape[1], w2.shape[2], like=gates)
    dzs = _steps(dz, list(batch_sizes), dim=1)

    def recurrent(t: int, dgates_t: Tensor, out: Tensor) -> None:
        torch.bmm(dgates_t, w2, out=dzs[t])
        torch.bmm(dzs[t], w1h, out=out)

    dgates, dh, dh0, dc0 = _grouped_backward_scan(dout, dh_last, dc_last, gates, cells, proj, batch_sizes,
                                                  cell_math, recurrent)
    return dgates, dz, dh, dh0, dc0, None, None


def _grouped_backward_scan(dout, dh_last, dc_last, gates, cells, proj, batch_sizes, cell_math: CellMath,
                           recurrent: Callable[[int, Tensor, Tensor], None]):
    """The backward time loop G-LSTM and G∘F-LSTM share: per step (latest first) dL/dm through the
    projection, the cell's backward into that step's dgates (k, B_t, 4nk), then ``recurrent(t,
    dgates_t, out)`` writes the groups' dL/dh_{t-1} (k, B_t, pk) into ``out``, the layer's own
    product(s) with its recurrent weights. Returns dgates (k, N, 4nk), dh (N, p), dh0 (B, p), dc0 (B, n)."""
    k, rows, four_nk = gates.shape
    batch, p = dh_last.shape
    n = dc_last.shape[1]
    nk = n // k
    num_gates = four_nk // nk
    new = dict(dtype=gates.dtype, device=gates.device)
    dgates = _memory.empty(*gates.shape, like=gates)
    dh = _memory.empty(rows, p, like=dout)
    dm = torch.empty(batch, n, **new) if proj is not None else None
    dc = dc_last.clone()
    sizes = list(batch_sizes)
    gate_tiles, dgate_tiles = (_steps(t.view(k, rows, num_gates, nk), sizes, dim=1) for t in (gates, dgates))
    c_all = _grouped(cells[batch:], k)
    prepared = _prepared_backwards(cell_math, gates.view(k, rows, num_gates, nk), c_all,
                                   dgates.view(k, rows, num_gates, nk), sizes)
    cs, c0_tile = _steps(c_all, sizes, dim=1), _grouped(cells[:batch], k)
    dgate_rows, dhs, douts = _steps(dgates, sizes, dim=1), _steps(dh, sizes), _steps(dout, sizes)
    dh_tiles, dout_tiles = _steps(_grouped(dh, k), sizes, dim=1), _steps(_grouped(dout, k), sizes, dim=1)
    dm_tile, dc_tile = (None if dm is None else _grouped(dm, k)), _grouped(dc, k)
    # each step's (k, B_t, pk) dL/dh_{t-1}, contiguous: one per distinct batch size
    rec_store, recs = torch.empty(k * batch * (p // k), **new), {}
    cell_backward = cell_math.backward
    _ending_rows_grad(dhs[-1], douts[-1], dh_last, 0)
    for t in range(len(sizes) - 1, -1, -1):
        size = sizes[t]
        if proj is None:
            dm_t = dh_tiles[t]
        else:
            torch.mm(dhs[t], proj, out=_head(dm, size))
            dm_t = _head(dm_tile, size, 1)
        cell_backward(gate_tiles[t], _previous(cs, c0_tile, t, size, 1), cs[t], next(prepared), dm_t,
                      _head(dc_tile, size, 1), dgate_tiles[t])
        rec = recs.get(size)
        if rec is None:
            rec = recs[size] = rec_store[: k * size * (p // k)].view(k, size, p // k)
        recurrent(t, dgate_rows[t], rec)
        if t > 0:
            torch.add(_head(dout_tiles[t - 1], size, 1), rec, out=_head(dh_tiles[t - 1], size, 1))
            _ending_rows_grad(dhs[t - 1], douts[t - 1], dh_last, size)
    return dgates, dh, rec.transpose(0, 1).reshape(batch, p), dc


