"""What the whole-sequence F-LSTM and G-LSTM autograd Functions share: set-up and gradient tails.

Both Functions (:mod:`factorlm.ops.flstm`, :mod:`factorlm.ops.glstm`) take
``(x, h0, c0, w_a, w_b, bias, w_hr, forget_bias, loop)`` — x (T, B, p_in), h0 (B, p), c0 (B, n),
two gate weights, bias (4n,) or None in nn.LSTM's gate order, W_hr (p, n) or None, the constant
forget_bias and the time loop (a :class:`factorlm.ops._backend.Recurrence`) — and return
(out (T, B, p), h_T (B, p), c_T (B, n)).

F-LSTM is treated as G-LSTM with k = 1 group wherever the two agree, so one helper serves both:
per-row gradients are group-major (k, T·B, m), group j's slice of each row (F-LSTM's (T, B, m) is
the (1, T·B, m) view), and weights are (k, rows, columns) per group.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: nn.LSTM gate order [i, f, g, o] <-> internal [i, f, o, g] (a swap: its own inverse).
GATE_PERM = [0, 1, 3, 2]

#: positions in the Functions' arguments of the bias and W_hr (for ctx.needs_input_grad)
_BIAS, _WEIGHT_HR = 5, 6


def to_internal(weight: Tensor) -> Tensor:
    """(k, 4m, c) with rows [i f g o] per group -> the same in internal order [i f o g] (a copy).
    The swap is its own inverse, so this also takes gradients back to nn.LSTM order."""
    k, rows, cols = weight.shape
    return weight.view(k, 4, rows // 4, cols)[:, GATE_PERM].reshape(k, rows, cols)


def internal_bias(bias: Tensor | None, forget_bias: float, n: int, k: int, like: Tensor) -> Tensor:
    """(4n,) gate bias in nn.LSTM order (or None: zeros) -> (k, 4n/k), a new tensor: group j's
    [i f o g] pre-activation bias of its cells j·n/k … (j+1)·n/k, forget_bias added."""
    if bias is None:
        b = torch.zeros(4, n, dtype=like.dtype, device=like.device)
    else:
        b = bias.view(4, n)[GATE_PERM]
    b[1] += forget_bias
    return b.view(4, k, n // k).transpose(0, 1).reshape(k, 4 * n // k)


def rows_by_group(t: Tensor, k: int) -> Tensor:
    """(R, m) -> its (k, R, m/k) view: group j's column slice of every row."""
    rows, width = t.shape
    return t.view(rows, k, width // k).transpose(0, 1)


def state_args(w_hr: Tensor | None, h0: Tensor, c0: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
    """The last three arguments of every forward scan: W_hr^T (n, p) or None, h0, c0 (contiguous)."""
    return None if w_hr is None else w_hr.t(), h0.contiguous(), c0.contiguous()


def finish_forward(ctx, loop, bias: Tensor | None, saved: tuple, out: Tensor, cells: Tensor):
    """Keep what the backward needs; return (out (T, B, p), h_T (B, p), c_T (B, n)).
    cells (T+1, B, n) holds c0 first."""
    ctx.save_for_backward(*saved)
    ctx.has_bias = bias is not None
    ctx.loop = loop
    return out, out[-1].clone(), cells[-1].clone()


def incoming(dout: Tensor, dh_last: Tensor, dc_last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first three arguments of every backward scan: the incoming gradients, contiguous."""
    return dout.contiguous(), dh_last.contiguous(), dc_last.contiguous()


def input_grad(d: Tensor, w_in: Tensor, x_shape) -> Tensor:
    """dL/dx (T, B, p_in) from d (k, T·B, m), the gradient at x's image, and the input-side
    weights (k, m, p_in/k): one bmm over all rows."""
    return torch.bmm(d, w_in).transpose(0, 1).reshape(x_shape)


def input_weight_grad(d: Tensor, x: Tensor) -> Tensor:
    """Σ_rows d^T·x per group: (k, m, p_in/k) from d (k, T·B, m) and x (T, B, p_in)."""
    return torch.bmm(d.transpose(1, 2), rows_by_group(x.reshape(-1, x.shape[2]), d.shape[0]))


def previous_h_grad(d: Tensor, h0: Tensor, out: Tensor) -> Tensor:
    """Σ_t d_t^T·h_{t-1} per group: (k, m, p/k) from d (k, T·B, m), h0 (B, p), out (T, B, p).

    h_{t-1} for all rows is [h0, out[0..T-2]]: two bmms instead of a copy of out.
    """
    k = d.shape[0]
    batch, p = h0.shape
    grad = torch.bmm(d[:, :batch].transpose(1, 2), rows_by_group(h0, k))
    if d.shape[1] > batch:
        grad.baddbmm_(d[:, batch:].transpose(1, 2), rows_by_group(out[:-1].reshape(-1, p), k))
    return grad


def bias_and_projection_grads(ctx, dgates: Tensor, dh: Tensor, m: Tensor, w_hr: Tensor | None) -> tuple:
    """The backward's last four results: dL/dbias (4n,) in nn.LSTM order, dL/dW_hr (p, n), and None
    for forget_bias and the loop. dgates (k, T·B, 4n/k) pre-activation gradients (internal order),
    dh (T, B, p) = total dL/dh_t, m (T, B, n) the projection's input."""
    need = ctx.needs_input_grad
    k, rows, four_nk = dgates.shape
    dbias = dw_hr = None
    if need[_BIAS] and ctx.has_bias:
        dbias = dgates.sum(1).view(k, 4, four_nk // 4)[:, GATE_PERM].transpose(0, 1).reshape(k * four_nk)
    if need[_WEIGHT_HR] and w_hr is not None:
        dw_hr = dh.view(rows, -1).t() @ m.view(rows, -1)
    return dbias, dw_hr, None, None
