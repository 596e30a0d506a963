"""Whole-sequence G-LSTM layer with a hand-written backward.

Maths (Kuchaiev & Ginsburg 2017, §2.2): x_t and h_{t-1} are split into k slices; group j
computes the [i, f, g, o] pre-activations of its cells j·n/k … (j+1)·n/k from its slices only:
    gates^(j) = Wih^(j)·x_t^(j) + Whh^(j)·h_{t-1}^(j) + b^(j)
([i, g, o] with num_gates=3, coupled input and forget gates: see factorlm.ops.flstm)

The input side Wih·x is one bmm over groups for all rows (T·B, or N of a packed batch); per step the
recurrent side is ONE bmm over the k groups (k × B × p/k × 4n/k), B shrinking as the sequences of a
packed batch end. Weight gradients and dL/dx are single bmms over all rows after the recurrence.
The projection W_hr stays dense.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops._function import (
    BIAS_INPUT, autocast_off, bias_and_projection_grads, check_arguments, check_num_gates, finish_forward,
    finish_inference, grouped_gate_weight_grads, incoming, input_grad, run_layer, runs_in_autocast_dtype,
    ring_rows, split_gate_weight_grads,
)


class GLSTMFunction(torch.autograd.Function):
    """One G-LSTM layer over a whole sequence; see :func:`glstm_layer` for the arguments and
    :mod:`factorlm.ops._function` for the conventions."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, loop, batch_sizes):
        saved, out, cells = GLSTMFunction.scan(x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, loop, batch_sizes, True)
        return finish_forward(ctx, loop, batch_sizes, bias, saved, out, cells)

    @staticmethod
    def infer(x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, loop, batch_sizes):
        """The forward without autograd and without keeping anything for a backward."""
        _, out, cells = GLSTMFunction.scan(x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, loop, batch_sizes, False)
        return finish_inference(batch_sizes, out, cells)

    @staticmethod
    def scan(x, h0, c0, w_ih, w_hh, bias, w_hr, forget_bias, loop, batch_sizes, keep: bool):
        """(what the backward needs, out (N, p), cells): the recurrence, keeping its whole-sequence
        buffers when ``keep`` (else cells are the (B, n) final states)."""
        out, gates, cells, m, operand = loop.glstm_forward_scan(
            x, w_ih, bias, forget_bias, w_hh, w_hr, h0.contiguous(), c0.contiguous(), batch_sizes, keep
        )
        return (x, h0, w_ih, w_hh, w_hr, out, gates, cells, m, operand), out, cells

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, w_ih, w_hh, w_hr, out, gates, cells, m, operand = ctx.saved_tensors
        need = ctx.needs_input_grad
        with_bias = need[BIAS_INPUT] and ctx.has_bias
        weight_grads = need[3] or need[4] or with_bias
        dgates, dh, dh0, dc0, dx, grads = ctx.loop.glstm_backward_scan(
            *incoming(dout, dh_last, dc_last), gates, cells, w_hh, w_ih if need[0] else None, w_hr,
            ctx.batch_sizes, ring_rows(operand, gates, weight_grads)
        )
        if need[0] and dx is None:  # the loop left dL/dx to one product over all rows
            dx = input_grad(dgates, w_ih, x.shape)
        dw_ih = dw_hh = bias_sums = None
        if weight_grads:  # one product for all three (see grouped_gate_weight_grads), unless the loop summed them
            if grads is None:
                dw_ih_t, dw_hh_t, bias_sums = grouped_gate_weight_grads(dgates, x, h0, out, ctx.batch_sizes,
                                                                        with_bias, operand)
            else:
                dw_ih_t, dw_hh_t, bias_sums = split_gate_weight_grads(grads, x.shape[-1], h0.shape[-1], with_bias)
            dw_ih = dw_ih_t.transpose(1, 2) if need[3] else None
            dw_hh = dw_hh_t.transpose(1, 2) if need[4] else None
        return dx, dh0, dc0, dw_ih, dw_hh, *bias_and_projection_grads(ctx, dgates, dh, m, w_hr, bias_sums)


@runs_in_autocast_dtype
def glstm_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                weight_hr: Tensor | None, forget_bias: float = 0.0, impl: str = "auto",
                batch_sizes: Tensor | Sequence[int] | None = None, num_gates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One G-LSTM layer over a sequence, fast path (same maths as factorlm.nn.reference).

    x (T, B, p_in), or with ``batch_sizes`` a packed batch's rows (N, p_in), as in
    :func:`factorlm.ops.flstm_layer`; h0 (B, p), c0 (B, n), weight_ih (k, 4n/k, p_in/k),
    weight_hh (k, 4n/k, p/k), bias (4n,) or None in nn.LSTM order, weight_hr (p, n) or None;
    with ``num_gates=3``, coupled input and forget gates, 3n for every 4n (rows [i, g, o]).
    impl: which time loop runs, as in :func:`factorlm.ops.flstm_layer`.

    Returns output (T, B, p) (packed: (N, p)), h_T (B, p), c_T (B, n) after each sequence's own
    last step.
    """
    p_in, p, n = x.shape[-1], h0.shape[-1], c0.shape[-1]
    gates = check_num_gates("glstm_layer", num_gates)
    if weight_ih.dim() != 3:
        raise ValueError(f"glstm_layer: weight_ih must be 3-D (k, 4n/k, p_in/k), got shape {tuple(weight_ih.shape)}")
    k = weight_ih.shape[0]
    if k < 1 or p_in % k or p % k or n % k:
        raise ValueError(f"glstm_layer: {k} groups must divide p_in = {p_in}, p = {p} and n = {n}")
    check_arguments("glstm_layer", x, h0, c0, weight_hr, {
        "weight_ih": (weight_ih, (k, gates * n // k, p_in // k)), "weight_hh": (weight_hh, (k, gates * n // k, p // k)),
        "bias": (bias, (gates * n,)), "weight_hr": (weight_hr, (p, n)),
    })
    weights = (weight_ih, weight_hh, bias, weight_hr)
    return run_layer(GLSTMFunction, x, h0, c0, weights, forget_bias, impl, batch_sizes)
