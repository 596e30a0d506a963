"""Whole-sequence G∘F-LSTM layer (groups of low rank) with a hand-written backward.

Maths: G-LSTM's groups (Kuchaiev & Ginsburg 2017, §2.2), each with F-LSTM's factorization (§2.1),
as the paper's conclusion suggests. x_t and h_{t-1} are split into k slices; group j computes the
[i, f, g, o] pre-activations of its cells j·n/k … (j+1)·n/k from its slices only, through rank r:
    z_t^(j)     = W1^(j)·[x_t^(j); h_{t-1}^(j)] = W1x^(j)·x_t^(j) + W1h^(j)·h_{t-1}^(j)     (B, r)
    gates^(j)   = W2^(j)·z_t^(j) + b^(j)                                              (B, 4n/k)

The input side W1x·x is one bmm over groups for all rows (T·B, or N of a packed batch); per step
the recurrent side is two bmms over the k groups, W1h·h (k × B × p/k × r) and W2·z (k × B × r ×
4n/k), B shrinking as the sequences of a packed batch end. Forming W2^(j)·W1h^(j) once and running
G-LSTM's scan would be simpler but would spend 4n/k × p/k multiply-adds per group a step instead of
r·(p/k + 4n/k): the low-rank saving is the point of the cell. Weight gradients and dL/dx are single
bmms over all rows after the recurrence. The projection W_hr stays dense.

Time loops: all of :mod:`factorlm.ops._backend`'s: "extension" (csrc/scan.cpp's G∘F scans: the same
two bmms a step, G-LSTM's fused cell loops on the same tiles), "torch" and "triton" (the G-LSTM cell
math on the same (k, B, 4, n/k) tiles). With k = 1 the layer *is* an F-LSTM, and :func:`gflstm_layer`
runs F-LSTM's function on the (r, p_in + p) and (4n, r) views of the weights, with its loops.
Coupled input and forget gates (``num_gates=3``): 3n/k gate rows [i, g, o] per group wherever 4n/k
stands here, the scans and the cell math reading G off the shapes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops import _backend
from factorlm.ops._function import (
    BIAS_INPUT, autocast_off, bias_and_projection_grads, check_arguments, check_num_gates, finish_forward,
    finish_inference, grouped_weight_grad, incoming, input_grad, input_weight_grad, previous_h_grad, ring_rows,
    run_layer, runs_in_autocast_dtype,
)
from factorlm.ops.flstm import flstm_layer


class GFLSTMFunction(torch.autograd.Function):
    """One G∘F-LSTM layer over a whole sequence; see :func:`gflstm_layer` for the arguments and
    :mod:`factorlm.ops._function` for the conventions."""

    @staticmethod
    def forward(ctx, x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes):
        saved, out, cells = GFLSTMFunction.scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, True)
        return finish_forward(ctx, loop, batch_sizes, bias, saved, out, cells)

    @staticmethod
    def infer(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes):
        """The forward without autograd and without keeping anything for a backward."""
        _, out, cells = GFLSTMFunction.scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, False)
        return finish_inference(batch_sizes, out, cells)

    @staticmethod
    def scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, keep: bool):
        """(what the backward needs, out (N, p), cells): the recurrence, keeping its whole-sequence
        buffers when ``keep`` (else cells are the (B, n) final states)."""
        out, z, gates, cells, m = loop.gflstm_forward_scan(
            x, w1, bias, forget_bias, w2, w_hr, h0.contiguous(), c0.contiguous(), batch_sizes, keep
        )
        return (x, h0, w1, w2, w_hr, out, z, gates, cells, m), out, cells

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, w1, w2, w_hr, out, z, gates, cells, m = ctx.saved_tensors
        pk_in = x.shape[1] // w1.shape[0]
        need = ctx.needs_input_grad
        sums_wanted = need[4] or (need[BIAS_INPUT] and ctx.has_bias)
        dgates, dz, dh, dh0, dc0, dw2_summed, bias_sums = ctx.loop.gflstm_backward_scan(
            *incoming(dout, dh_last, dc_last), gates, cells, w1[:, :, pk_in:], w2, w_hr, ctx.batch_sizes,
            ring_rows(z, gates, sums_wanted)
        )
        dx = input_grad(dz, w1[:, :, :pk_in], x.shape) if need[0] else None
        dw1 = dw2 = None
        if need[3]:
            dw1 = torch.empty_like(w1)  # the parameter's own memory layout
            dw1[:, :, :pk_in] = input_weight_grad(dz, x)
            dw1[:, :, pk_in:] = previous_h_grad(dz, h0, out, ctx.batch_sizes)
        if need[4]:  # the loop's sum is (k, r, 4nk), the narrow side as rows: a transposed view
            dw2 = grouped_weight_grad(dgates, z) if dw2_summed is None else dw2_summed.transpose(1, 2)
        return dx, dh0, dc0, dw1, dw2, *bias_and_projection_grads(ctx, dgates, dh, m, w_hr, bias_sums)


@runs_in_autocast_dtype
def gflstm_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_w1: Tensor, weight_w2: Tensor, bias: Tensor | None,
                 weight_hr: Tensor | None, forget_bias: float = 0.0, impl: str = "auto",
                 batch_sizes: Tensor | Sequence[int] | None = None, num_gates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One G∘F-LSTM layer over a sequence, fast path (same maths as factorlm.nn.reference).

    x (T, B, p_in), or with ``batch_sizes`` a packed batch's rows (N, p_in), as in
    :func:`factorlm.ops.flstm_layer`; h0 (B, p), c0 (B, n); weight_w1 (k, r, (p_in + p)/k), group
    j's columns ordered [x^(j); h^(j)]; weight_w2 (k, 4n/k, r), group j's rows its [i, f, g, o]
    (n/k each, as G-LSTM's); bias (4n,) or None in nn.LSTM order; weight_hr (p, n) or None.
    impl: which time loop runs, as for :func:`factorlm.ops.flstm_layer`; ValueError for an unknown
    impl, RuntimeError when the asked-for loop cannot run x.
    num_gates: 4, or 3 for coupled input and forget gates (CIFG: 3n/k rows [i, g, o] per group
    and a 3n bias where 4n/k and 4n stand above; f = 1 - i, forget_bias lowering i).

    Returns output (T, B, p) (packed: (N, p)), h_T (B, p), c_T (B, n) after each sequence's own
    last step.
    """
    impl = _backend.check_impl(impl, what="gflstm_layer: impl", stacklevel=2)
    gates = check_num_gates("gflstm_layer", num_gates)
    p_in, p, n = x.shape[-1], h0.shape[-1], c0.shape[-1]
    if weight_w1.dim() != 3:
        raise ValueError(f"gflstm_layer: weight_w1 must be 3-D (k, r, (p_in + p)/k), got shape "
                         f"{tuple(weight_w1.shape)}")
    k, rank = weight_w1.shape[:2]
    if k < 1 or p_in % k or p % k or n % k:
        raise ValueError(f"gflstm_layer: {k} groups must divide p_in = {p_in}, p = {p} and n = {n}")
    check_arguments("gflstm_layer", x, h0, c0, weight_hr, {
        "weight_w1": (weight_w1, (k, rank, (p_in + p) // k)), "weight_w2": (weight_w2, (k, gates * n // k, rank)),
        "bias": (bias, (gates * n,)), "weight_hr": (weight_hr, (p, n)),
    })
    if k == 1:  # an F-LSTM: its function, with its loops (the C++ one too)
        return flstm_layer(x, h0, c0, weight_w1[0], weight_w2[0], bias, weight_hr, forget_bias, impl, batch_sizes,
                           num_gates=gates)
    weights = (weight_w1, weight_w2, bias, weight_hr)
    return run_layer(GFLSTMFunction, x, h0, c0, weights, forget_bias, impl, batch_sizes)
