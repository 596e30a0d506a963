"""Whole-sequence diagonal LSTM (IndyLSTM) layer with a hand-written backward, and its single step.

Maths (factorlm.nn.diagonal): pre_g,t = W_ih,g·x_t + b_g + u_g ⊙ s_{t-1} for g in [i, f, g, o];
c_t = σ(f + forget_bias)⊙c_{t-1} + σ(i)⊙tanh(g); m_t = σ(o)⊙tanh(c_t); h_t = W_hr·m_t (or m_t).
s_{t-1} = h_{t-1} without a projection, tanh(c_{t-1}) with one. With coupled input and forget
gates (``num_gates`` G = 3, gates [i, g, o], u (3, n)): c_t = (1 − ι)⊙c_{t-1} + ι⊙tanh(g),
ι = σ(i − forget_bias) (factorlm.nn.reference's CIFG step); the scans read G off u's rows.

No product runs inside the time loop: z = x·W_ih^T + b is ONE GEMM over all rows, then the
element-wise scan (:mod:`factorlm.ops._scan_diagonal`, or its C++ twin csrc/diagonal_scan.cpp),
then, with a projection, ONE GEMM m·W_hr^T over all rows: the projection does not feed the
recurrence. The backward likewise: dm = dh·W_hr (one GEMM), the backward scan, then dL/dx,
dL/dW_ih, dL/db, dL/du, dL/dW_hr each one product or reduction over all rows.

Which scan runs follows the layer's ``impl`` as for F-LSTM/G-LSTM (:mod:`factorlm.ops._backend`):
"extension" the C++ scan, "triton" (CUDA) two Triton kernels, each the whole time loop in one
launch (:mod:`factorlm.ops._triton_diagonal`), "torch" the PyTorch loop.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops import _extension, _packed, _scan_diagonal, _triton_diagonal
from factorlm.ops._function import (
    BIAS_INPUT, WEIGHT_HR_INPUT, autocast_off, check_arguments, check_num_gates, previous_rows, run_layer,
    runs_in_autocast_dtype,
)


class DiagonalScans(NamedTuple):
    """One implementation of the element-wise scan: its name and its two functions, with the
    signatures of :mod:`factorlm.ops._scan_diagonal`."""

    name: str
    forward: Callable
    backward: Callable


TORCH_SCANS = DiagonalScans("torch", _scan_diagonal.diagonal_forward_scan, _scan_diagonal.diagonal_backward_scan)


TRITON_SCANS = DiagonalScans("triton", _triton_diagonal.diagonal_forward_scan, _triton_diagonal.diagonal_backward_scan)


def scans_for(loop) -> DiagonalScans:
    """The scan that runs for the F-/G-LSTM time loop ``loop`` (a _backend.Recurrence) that
    :func:`factorlm.ops._backend.select` chose, and so for the same ``impl``: the C++ scan for
    "extension", the Triton kernels for "triton", the PyTorch loop for "torch"."""
    if loop.name == "extension":
        module = _extension.load()  # loaded already: select() built it
        return DiagonalScans("extension", module.diagonal_forward_scan, module.diagonal_backward_scan)
    if loop.name == "triton":
        return TRITON_SCANS
    return TORCH_SCANS


def _input_side(x: Tensor, w_ih: Tensor, bias: Tensor | None) -> Tensor:
    """z = x·W_ih^T + b (N, G·n), a new tensor the scan overwrites with the activated gates."""
    return torch.mm(x, w_ih.t()) if bias is None else torch.addmm(bias, x, w_ih.t())


def _recurrent_input0(h0: Tensor, c0: Tensor, w_hr: Tensor | None) -> Tensor:
    """s0, what step 0 reads through u: h0 without a projection, tanh(c0) with one."""
    return h0.contiguous() if w_hr is None else torch.tanh(c0)


def _final_rows(batch_sizes: tuple[int, ...], out: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """(h_T (B, p), c_T (B, n)) read at each sequence's last row; cells (B + N, n) has c0 first."""
    batch = batch_sizes[0]
    if _packed.is_uniform(batch_sizes):
        return out[-batch:].clone(), cells[-batch:].clone()
    last = _packed.last_step_rows(batch_sizes, out.device)
    return out.index_select(0, last), cells.index_select(0, last + batch)


class DiagonalLSTMFunction(torch.autograd.Function):
    """One diagonal LSTM layer over a whole sequence; see :func:`diagonal_layer` for the arguments
    and :mod:`factorlm.ops._function` for the conventions (the argument order is theirs, with u in
    place of the second gate weight)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, u, bias, w_hr, forget_bias, loop, batch_sizes):
        scans = scans_for(loop)
        s0 = _recurrent_input0(h0, c0, w_hr)
        gates, cells, m = scans.forward(_input_side(x, w_ih, bias), u.contiguous(), forget_bias, s0,
                                        c0.contiguous(), batch_sizes, w_hr is not None)
        out = m if w_hr is None else torch.mm(m, w_hr.t())
        ctx.save_for_backward(x, h0, c0, w_ih, u, w_hr, gates, cells, m, s0)
        ctx.has_bias, ctx.scans, ctx.batch_sizes = bias is not None, scans, batch_sizes
        h_n, c_n = _final_rows(batch_sizes, out, cells)
        return out, h_n, c_n

    @staticmethod
    def infer(x, h0, c0, w_ih, u, bias, w_hr, forget_bias, loop, batch_sizes):
        """The forward without autograd (nothing is kept for a backward)."""
        s0 = _recurrent_input0(h0, c0, w_hr)
        _, cells, m = scans_for(loop).forward(_input_side(x, w_ih, bias), u.contiguous(), forget_bias, s0,
                                              c0.contiguous(), batch_sizes, w_hr is not None)
        out = m if w_hr is None else torch.mm(m, w_hr.t())
        return (out, *_final_rows(batch_sizes, out, cells))

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, c0, w_ih, u, w_hr, gates, cells, m, s0 = ctx.saved_tensors
        need, sizes = ctx.needs_input_grad, ctx.batch_sizes
        rows, batch = x.shape[0], sizes[0]
        dh = dout.clone()  # total dL/dh_t = dL/dout + dL/dh_T at each sequence's last row
        if _packed.is_uniform(sizes):
            dh[rows - batch :] += dh_last
        else:
            dh.index_add_(0, _packed.last_step_rows(sizes, dh.device), dh_last)
        proj = w_hr is not None
        dm = torch.mm(dh, w_hr) if proj else dh  # the projection does not feed the recurrence
        dpre, ds0, dc0 = ctx.scans.backward(dm.contiguous(), dc_last.contiguous(), gates, cells, u.contiguous(),
                                            sizes, proj)
        if proj:  # s0 = tanh(c0); h0 is not read
            dh0 = torch.zeros_like(h0)
            dc0 = dc0.addcmul(ds0, 1 - s0 * s0)
        else:
            dh0 = ds0
        dx = torch.mm(dpre, w_ih) if need[0] else None
        dw_ih = torch.mm(dpre.t(), x) if need[3] else None
        du = None
        if need[4]:  # Σ_rows dpre_g ⊙ s_{t-1}: s of every row, s0 for step 0's
            prev = previous_rows(c0, cells[batch:], sizes) if proj else previous_rows(h0, m, sizes)
            if prev is not None:
                prev = torch.cat([s0, torch.tanh(prev) if proj else prev])
            else:
                prev = s0
            # one product and one reduction over rows (an einsum went through n bmms of copies: 5x slower)
            du = torch.mul(dpre.view(rows, u.shape[0], -1), prev.unsqueeze(1)).sum(0)
        dbias = dpre.sum(0) if need[BIAS_INPUT] and ctx.has_bias else None
        dw_hr = torch.mm(dh.t(), m) if need[WEIGHT_HR_INPUT] and proj else None
        return dx, dh0, dc0, dw_ih, du, dbias, dw_hr, None, None, None


@runs_in_autocast_dtype
def diagonal_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                   weight_hr: Tensor | None, forget_bias: float = 0.0, impl: str = "auto",
                   batch_sizes: Tensor | Sequence[int] | None = None,
                   num_gates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One diagonal LSTM layer over a sequence, fast path (the maths of factorlm.nn.diagonal).

    x (T, B, p_in), or with ``batch_sizes`` a packed batch's rows (N, p_in); h0 (B, p), c0 (B, n),
    weight_ih (4n, p_in), weight_hh = u (4, n) (row g: gate g's recurrent weights, [i, f, g, o]),
    bias (4n,) or None in nn.LSTM order, weight_hr (p, n) or None. impl: which scan runs, as in
    :func:`factorlm.ops.flstm_layer`. num_gates: 4, or 3 for coupled input and forget gates (CIFG:
    3n for every 4n above, u (3, n), gates [i, g, o]).

    Returns output (T, B, p) (packed: (N, p)), h_T (B, p), c_T (B, n) after each sequence's own
    last step. With weight_hr, h0 is not read (step 0's recurrent input is tanh(c0)) and its
    gradient is zero.
    """
    gates = check_num_gates("diagonal_layer", num_gates)
    p_in, p, n = x.shape[-1], h0.shape[-1], c0.shape[-1]
    check_arguments("diagonal_layer", x, h0, c0, weight_hr, {
        "weight_ih": (weight_ih, (gates * n, p_in)), "weight_hh": (weight_hh, (gates, n)),
        "bias": (bias, (gates * n,)), "weight_hr": (weight_hr, (p, n)),
    })
    weights = (weight_ih, weight_hh, bias, weight_hr)
    return run_layer(DiagonalLSTMFunction, x, h0, c0, weights, forget_bias, impl, batch_sizes)


@runs_in_autocast_dtype
def diagonal_step(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, u: Tensor, bias: Tensor | None,
                  w_hr: Tensor | None, forget_bias: float, num_gates: int = 4) -> tuple[Tensor, Tensor]:
    """One step without autograd (the layers' token-by-token path, as :mod:`factorlm.ops._step`):
    x (B, p_in), h0 (B, p), c0 (B, n) -> (h (B, p), c (B, n)), new tensors; num_gates as in
    :func:`diagonal_layer`."""
    s = h0 if w_hr is None else torch.tanh(c0)
    gates = F.linear(x, w_ih, bias).view(x.shape[0], num_gates, -1).addcmul_(u, s.unsqueeze(1))
    if num_gates == 3:  # [i, g, o]: forget_bias lowers i, f = 1 - i
        if forget_bias != 0.0:
            gates[:, 0].sub_(forget_bias)
        act = gates.sigmoid()
        i, _, o = act.unbind(1)
        c = torch.lerp(c0, gates[:, 1].tanh(), i)
    else:
        if forget_bias != 0.0:
            gates[:, 1].add_(forget_bias)
        act = gates.sigmoid()
        i, f, _, o = act.unbind(1)
        c = torch.addcmul(f * c0, i, gates[:, 2].tanh())
    m = torch.tanh(c).mul_(o)
    return (m if w_hr is None else F.linear(m, w_hr)), c
