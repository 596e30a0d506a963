"""Symmetric int8 arithmetic: per-output-channel weights, per-row (per-token) dynamic activations.

Scheme (the one torchao's ``Int8DynamicActivationInt8WeightConfig`` uses, and PyTorch's legacy
dynamic quantization up to its asymmetric activations):

    weight W (N, K)   -> q_W = round(W / s_W) in [-127, 127], s_W (N,) = max_k |W[n, k]| / 127
    activation x (M, K), quantized at every call from its own values (dynamic):
                      -> q_x = round(x / s_x),  s_x (M,) = max_k |x[m, k]| / 127
    y = (q_x · q_Wᵀ) ⊙ s_x[:, None] ⊙ s_W[None, :] + b      (integer products, int32 sums)

-128 is never used, so that negation is exact and the range is symmetric. The integer product
runs through ``torch._int_mm`` on a CPU (int8 × int8 → int32, any shape there); elsewhere through
a float32 product of the integer values, which is exact while K·127² < 2^24, i.e. K <= 1040, and
within float32 rounding beyond.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the largest magnitude of a symmetric int8 value
QMAX = 127


def row_scales(t: Tensor) -> Tensor:
    """s (...,) = max |t| over the last dimension / 127: the step of each row's int8 grid.

    A row of zeros gets the smallest positive float (its values quantize to 0, and no 0/0)."""
    return (t.detach().abs().amax(dim=-1) / QMAX).clamp_min(torch.finfo(t.dtype).tiny)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """t (..., K) float -> (q (..., K) int8, s (...,) float): each row on its own symmetric grid."""
    scale = row_scales(t)
    q = torch.round(t / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype=torch.float32) -> Tensor:
    """q (..., K) int8, s (...,) -> the float values q·s they stand for."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (M, K) int8, b (N, K) int8 -> a·bᵀ (M, N) as float32 (the int32 sums, converted)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t()).to(torch.float32)
    return a.to(torch.float32) @ b.to(torch.float32).t()  # exact for K <= 1040 (module doc)


def int8_linear(x: Tensor, q_weight: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) float, q_weight (N, K) int8, w_scale (N,) -> (..., N) in x's dtype: x quantized
    per row at this call, the int8 product, rescaled (module doc)."""
    rows = x.reshape(-1, x.shape[-1])
    q_x, x_scale = quantize_rows(rows)
    y = int8_mm(q_x, q_weight) * x_scale.unsqueeze(1) * w_scale.unsqueeze(0)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], q_weight.shape[0])


def int8_grouped_linear(x: Tensor, q_weight: Tensor, w_scale: Tensor) -> Tensor:
    """k independent products: x (M, k·K) float, q_weight (k, N, K) int8, w_scale (k, N)
    -> (M, k, N), group j = x[:, jK:(j+1)K]·W_jᵀ. Each row of each group's slice is quantized on
    its own grid (the slice is what that product reads: a token's activation for that group)."""
    k, _, cols = q_weight.shape
    q_x, x_scale = quantize_rows(x.reshape(x.shape[0], k, cols))  # (M, k, K), (M, k)
    acc = torch.stack([int8_mm(q_x[:, j], q_weight[j]) for j in range(k)], dim=1)  # (M, k, N)
    return (acc * x_scale.unsqueeze(2) * w_scale.unsqueeze(0)).to(x.dtype)
