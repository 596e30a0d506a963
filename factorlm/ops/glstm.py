"""Whole-sequence G-LSTM layer with a hand-written backward.

Maths (Kuchaiev & Ginsburg 2017, §2.2): x_t and h_{t-1} are split into k slices; group j
computes the [i, f, g, o] pre-activations of its cells j·n/k … (j+1)·n/k from its slices only:
    gates^(j) = Wih^(j)·x_t^(j) + Whh^(j)·h_{t-1}^(j) + b^(j)

The input side Wih·x is one bmm over groups for all T·B rows; per step the recurrent side is
ONE bmm over the k groups (k × B × p/k × 4n/k). Weight gradients and dL/dx are single bmms
over all T·B rows after the recurrence. The projection W_hr stays dense.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops import _backend, _memory
from factorlm.ops.flstm import GATE_PERM, internal_bias


def _to_internal(weight: Tensor) -> Tensor:
    """(k, 4nk, m) rows [i f g o] per group -> the same in internal order [i f o g] (a copy)."""
    k, rows, cols = weight.shape
    return weight.view(k, 4, rows // 4, cols)[:, GATE_PERM].reshape(k, rows, cols)


def _rows_by_group(t: Tensor, k: int) -> Tensor:
    """(R, m) -> its (k, R, m/k) view: group j's column slice of every row."""
    rows, width = t.shape
    return t.view(rows, k, width // k).transpose(0, 1)


class GLSTMFunction(torch.autograd.Function):
    """One G-LSTM layer over a whole sequence; see :func:`glstm_layer` for the arguments."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, use_extension):
        steps, batch, p_in = x.shape
        k, four_nk, _ = w_ih.shape
        nk = four_nk // 4
        n = nk * k
        rows = steps * batch
        scan = _backend.select(x, use_extension)
        wih_int, whh_int = _to_internal(w_ih), _to_internal(w_hh)
        # gate-major (4, n) with cell j·nk + m -> group-major (k, gate, nk)
        b = internal_bias(bias, forget_bias, n, x).view(4, k, nk).transpose(0, 1).reshape(k, four_nk)
        xk = _rows_by_group(x.reshape(rows, p_in), k)  # (k, T·B, p_in/k)
        # No bias here: broadcasting it into the (k, T·B, 4nk) output first costs a full extra pass
        # over it; the scan adds it inside its gate loop instead.
        ax = _memory.empty(k, rows, four_nk, like=x)  # becomes the gates, in place
        torch.bmm(xk, wih_int.transpose(1, 2), out=ax)
        proj_t = None if w_hr is None else w_hr.t()
        out, gates, cells, m = scan.glstm_forward_scan(
            ax, b, whh_int.transpose(1, 2), proj_t, h0.contiguous(), c0.contiguous()
        )
        ctx.save_for_backward(x, h0, wih_int, whh_int, w_hr, out, gates, cells, m)
        ctx.has_bias = bias is not None
        ctx.scan = scan
        return out, out[-1].clone(), cells[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, wih_int, whh_int, w_hr, out, gates, cells, m = ctx.saved_tensors
        steps, batch, p_in = x.shape
        k, four_nk, _ = wih_int.shape
        nk = four_nk // 4
        n = nk * k
        p = out.shape[2]
        rows = steps * batch
        dgates, dh, dh0, dc0 = ctx.scan.glstm_backward_scan(
            dout.contiguous(), dh_last.contiguous(), dc_last.contiguous(), gates, cells,
            whh_int, w_hr,
        )
        dgk = dgates.view(k, rows, four_nk)
        need = ctx.needs_input_grad
        dx = dw_ih = dw_hh = dbias = dw_hr = None
        if need[0]:
            dx = torch.bmm(dgk, wih_int).transpose(0, 1).reshape(steps, batch, p_in)
        if need[3]:
            dw_ih = torch.bmm(dgk.transpose(1, 2), _rows_by_group(x.reshape(rows, p_in), k))
            dw_ih = _to_internal(dw_ih)  # the swap is its own inverse
        if need[4]:
            # h_{t-1} for all rows is [h0, out[0..T-2]]: two bmms instead of a copy
            dw_hh = torch.bmm(dgk[:, :batch].transpose(1, 2), _rows_by_group(h0, k))
            if steps > 1:
                dw_hh.baddbmm_(dgk[:, batch:].transpose(1, 2), _rows_by_group(out[:-1].reshape(-1, p), k))
            dw_hh = _to_internal(dw_hh)
        if need[5] and ctx.has_bias:
            dbias = dgk.sum(1).view(k, 4, nk)[:, GATE_PERM].transpose(0, 1).reshape(4 * n)
        if need[6] and w_hr is not None:
            dw_hr = dh.view(rows, p).t() @ m.view(rows, n)
        return dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr, None, None


def glstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None,
    weight_hr: Tensor | None,
    forget_bias: float = 0.0,
    use_extension: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One G-LSTM layer over a sequence, fast path (same maths as factorlm.nn.reference).

    x (T, B, p_in), h0 (B, p), c0 (B, n), weight_ih (k, 4n/k, p_in/k), weight_hh (k, 4n/k, p/k),
    bias (4n,) or None in nn.LSTM order, weight_hr (p, n) or None.
    use_extension: as in :func:`factorlm.ops.flstm_layer`.

    Returns output (T, B, p), h_T (B, p), c_T (B, n).
    """
    return GLSTMFunction.apply(x, h0, c0, weight_ih, weight_hh, bias, weight_hr, float(forget_bias), use_extension)
