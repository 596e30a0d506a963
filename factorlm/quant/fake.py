"""Fake quantization for quantization-aware training: the int8 grids of factorlm.quant.int8, in float.

``fake_quantize_rows(t)`` returns the float values q·s that the int8 path would compute with
(t's rows on their own symmetric grids, the scale from the values themselves), so a model trained
through it sees in its forward exactly the rounding the converted int8 model will have.

The backward is the straight-through estimator: rounding counts as the identity, so the gradient
passes through unchanged wherever |t / s| <= 127.5 (inside the grid's range) and is zero outside
it (values the clamp cut off). The scale is treated as a constant (detached), as in PyTorch's
FakeQuantize with fixed qparams: with dynamic max scales no value lies outside the range, and the
gradient is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm.quant.int8 import QMAX, row_scales


class _FakeQuantize(torch.autograd.Function):
    """round(t / s).clamp(±127)·s forward; the gradient masked to the unclamped entries backward."""

    @staticmethod
    def forward(ctx, t: Tensor, scale: Tensor) -> Tensor:
        scaled = t / scale
        ctx.save_for_backward(scaled.abs() <= QMAX + 0.5)
        return torch.round(scaled).clamp_(-QMAX, QMAX) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def fake_quantize(t: Tensor, scale: Tensor) -> Tensor:
    """t on the symmetric int8 grid of step ``scale`` (broadcast against t), straight-through gradient."""
    return _FakeQuantize.apply(t, scale.detach())


def fake_quantize_rows(t: Tensor) -> Tensor:
    """t (..., K): each row on its own int8 grid (s = max |row| / 127), straight-through gradient.

    Per output channel for a weight (N, K); per token for an activation (M, K)."""
    return fake_quantize(t, row_scales(t).unsqueeze(-1))
