"""Whole-sequence F-LSTM layer with a hand-written backward.

Maths (Kuchaiev & Ginsburg 2017, §2.1), for one layer over a sequence:
    z_t   = W1·[x_t; h_{t-1}] = W1x·x_t + W1h·h_{t-1}           (B, r)
    [i f g o] = W2·z_t + b  (+ forget_bias on f)                  (B, 4n)
    c_t = σ(f)⊙c_{t-1} + σ(i)⊙tanh(g);  h_t = W_hr·(σ(o)⊙tanh(c_t))

W1x·x_t is computed for all T·B rows in one GEMM before the recurrence; per step only
W1h·h_{t-1} (B×p×r) and W2·z_t (B×r×4n) remain. In the backward, every weight gradient and
dL/dx are single GEMMs over all T·B rows after the recurrence.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops import _backend

#: nn.LSTM gate order [i, f, g, o] <-> internal [i, f, o, g] (a swap: its own inverse).
GATE_PERM = [0, 1, 3, 2]


def internal_bias(bias: Tensor | None, forget_bias: float, n: int, like: Tensor) -> Tensor:
    """(4n,) gate bias in nn.LSTM order (or None) -> (4, n) internal order with forget_bias added."""
    if bias is None:
        b = torch.zeros(4, n, dtype=like.dtype, device=like.device)
    else:
        b = bias.view(4, n)[GATE_PERM]
    b[1] += forget_bias
    return b


class FLSTMFunction(torch.autograd.Function):
    """One F-LSTM layer over a whole sequence; see :func:`flstm_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, c0, w1, w2, bias, w_hr, forget_bias, use_extension):
        steps, batch, p_in = x.shape
        rank = w1.shape[0]
        n = w2.shape[0] // 4
        scan = _backend.select(x, use_extension)
        w1x, w1h = w1[:, :p_in], w1[:, p_in:]
        w2_int = w2.view(4, n, rank)[GATE_PERM].view(4 * n, rank)
        b_int = internal_bias(bias, forget_bias, n, x).view(4 * n)
        u = torch.mm(x.reshape(steps * batch, p_in), w1x.t()).view(steps, batch, rank)
        proj_t = None if w_hr is None else w_hr.t()
        out, z, gates, cells, m = scan.flstm_forward_scan(
            u, b_int, w1h.t(), w2_int.t(), proj_t, h0.contiguous(), c0.contiguous()
        )
        ctx.save_for_backward(x, h0, w1, w2_int, w_hr, out, z, gates, cells, m)
        ctx.has_bias = bias is not None
        ctx.scan = scan
        return out, out[-1].clone(), cells[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, w1, w2_int, w_hr, out, z, gates, cells, m = ctx.saved_tensors
        steps, batch, p_in = x.shape
        rank = w1.shape[0]
        n = w2_int.shape[0] // 4
        rows = steps * batch
        w1x, w1h = w1[:, :p_in], w1[:, p_in:]
        dgates, dz, dh, dh0, dc0 = ctx.scan.flstm_backward_scan(
            dout.contiguous(), dh_last.contiguous(), dc_last.contiguous(), gates, cells,
            w1h.contiguous(), w2_int, w_hr,
        )
        dgates2 = dgates.view(rows, 4 * n)
        dz2 = dz.view(rows, rank)
        need = ctx.needs_input_grad
        dx = torch.mm(dz2, w1x).view(steps, batch, p_in) if need[0] else None
        dw1 = dw2 = dbias = dw_hr = None
        if need[3]:
            dw1 = torch.empty_like(w1)
            dw1[:, :p_in] = dz2.t() @ x.reshape(rows, p_in)
            # h_{t-1} for all rows is [h0, out[0..T-2]]: two GEMMs instead of a copy
            dw1h = dz[0].t() @ h0
            if steps > 1:
                dw1h.addmm_(dz[1:].reshape(-1, rank).t(), out[:-1].reshape(-1, out.shape[2]))
            dw1[:, p_in:] = dw1h
        if need[4]:
            dw2 = (dgates2.t() @ z.view(rows, rank)).view(4, n, rank)[GATE_PERM].reshape(4 * n, rank)
        if need[5] and ctx.has_bias:
            dbias = dgates2.sum(0).view(4, n)[GATE_PERM].reshape(4 * n)
        if need[6] and w_hr is not None:
            dw_hr = dh.view(rows, -1).t() @ m.view(rows, n)
        return dx, dh0, dc0, dw1, dw2, dbias, dw_hr, None, None


def flstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_w1: Tensor,
    weight_w2: Tensor,
    bias: Tensor | None,
    weight_hr: Tensor | None,
    forget_bias: float = 0.0,
    use_extension: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One F-LSTM layer over a sequence, fast path (same maths as factorlm.nn.reference).

    x (T, B, p_in), h0 (B, p), c0 (B, n), weight_w1 (r, p_in + p), weight_w2 (4n, r),
    bias (4n,) or None, weight_hr (p, n) or None. Gate rows in nn.LSTM order [i, f, g, o].
    use_extension: None picks the C++ recurrence when it is available, False forces the
    pure-PyTorch one, True requires the extension (RuntimeError if it cannot be built).

    Returns output (T, B, p), h_T (B, p), c_T (B, n).
    """
    return FLSTMFunction.apply(x, h0, c0, weight_w1, weight_w2, bias, weight_hr, float(forget_bias), use_extension)
