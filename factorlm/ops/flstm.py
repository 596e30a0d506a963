"""Whole-sequence F-LSTM layer with a hand-written backward.

Maths (Kuchaiev & Ginsburg 2017, §2.1), for one layer over a sequence:
    z_t   = W1·[x_t; h_{t-1}] = W1x·x_t + W1h·h_{t-1}           (B, r)
    [i f g o] = W2·z_t + b  (+ forget_bias on f)                  (B, 4n)
    c_t = σ(f)⊙c_{t-1} + σ(i)⊙tanh(g);  h_t = W_hr·(σ(o)⊙tanh(c_t))
or with num_gates=3 (coupled input and forget gates, factorlm.nn.reference's CIFG step)
    [i g o] = W2·z_t + b  (− forget_bias on i)                    (B, 3n)
    c_t = (1 − σ(i))⊙c_{t-1} + σ(i)⊙tanh(g)

W1x·x_t is computed for all rows (T·B, or N of a packed batch) in one GEMM before the recurrence
(the scan's first step);
per step only W1h·h_{t-1} (B×p×r) and W2·z_t (B×r×4n) remain, B shrinking as the sequences of a
packed batch end. In the backward, every weight gradient and dL/dx are single GEMMs over all rows
after the recurrence.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from factorlm.ops._function import (
    BIAS_INPUT, autocast_off, bias_and_projection_grads, check_arguments, check_num_gates, finish_forward,
    finish_inference, incoming, input_grad, input_weight_grad, previous_h_grad, ring_rows, run_layer,
    runs_in_autocast_dtype,
)


class FLSTMFunction(torch.autograd.Function):
    """One F-LSTM layer over a whole sequence; see :func:`flstm_layer` for the arguments and
    :mod:`factorlm.ops._function` for the conventions (F-LSTM as one group)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes):
        saved, out, cells = FLSTMFunction.scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, True)
        return finish_forward(ctx, loop, batch_sizes, bias, saved, out, cells)

    @staticmethod
    def infer(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes):
        """The forward without autograd and without keeping anything for a backward."""
        _, out, cells = FLSTMFunction.scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, False)
        return finish_inference(batch_sizes, out, cells)

    @staticmethod
    def scan(x, h0, c0, w1, w2, bias, w_hr, forget_bias, loop, batch_sizes, keep: bool):
        """(what the backward needs, out (N, p), cells): the recurrence, keeping its whole-sequence
        buffers when ``keep`` (else cells are the (B, n) final states)."""
        out, z, gates, cells, m = loop.flstm_forward_scan(
            x, w1, bias, forget_bias, w2, w_hr, h0.contiguous(), c0.contiguous(), batch_sizes, keep
        )
        return (x, h0, w1, w2, w_hr, out, z, gates, cells, m), out, cells

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, dout, dh_last, dc_last):
        x, h0, w1, w2, w_hr, out, z, gates, cells, m = ctx.saved_tensors
        p_in = x.shape[1]
        need = ctx.needs_input_grad
        sums_wanted = need[4] or (need[BIAS_INPUT] and ctx.has_bias)
        dgates, dz, dh, dh0, dc0, dw2_summed, bias_sums = ctx.loop.flstm_backward_scan(
            *incoming(dout, dh_last, dc_last), gates, cells, w1[:, p_in:].contiguous(), w2, w_hr, ctx.batch_sizes,
            ring_rows(z, gates, sums_wanted)
        )
        dz = dz[None]  # one group
        if dgates is not None:
            dgates = dgates[None]
        dx = input_grad(dz, w1[None, :, :p_in], x.shape) if need[0] else None
        dw1 = dw2 = None
        if need[3]:
            dw1 = torch.empty_like(w1)
            dw1[:, :p_in] = input_weight_grad(dz, x)[0]
            dw1[:, p_in:] = previous_h_grad(dz, h0, out, ctx.batch_sizes)[0]
        if need[4]:
            dw2 = input_weight_grad(dgates, z)[0] if dw2_summed is None else dw2_summed
        bias_sums = None if bias_sums is None else bias_sums[None]
        return dx, dh0, dc0, dw1, dw2, *bias_and_projection_grads(ctx, dgates, dh, m, w_hr, bias_sums)


@runs_in_autocast_dtype
def flstm_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_w1: Tensor, weight_w2: Tensor, bias: Tensor | None,
                weight_hr: Tensor | None, forget_bias: float = 0.0, impl: str = "auto",
                batch_sizes: Tensor | Sequence[int] | None = None, num_gates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """One F-LSTM layer over a sequence, fast path (same maths as factorlm.nn.reference).

    x (T, B, p_in), or with ``batch_sizes`` a packed batch's rows (N, p_in) (PackedSequence.data,
    sequences sorted longest first; batch_sizes as PackedSequence.batch_sizes);
    h0 (B, p), c0 (B, n), weight_w1 (r, p_in + p), weight_w2 (4n, r),
    bias (4n,) or None, weight_hr (p, n) or None. Gate rows in nn.LSTM order [i, f, g, o];
    with ``num_gates=3``, coupled input and forget gates: 3n rows [i, g, o] for every 4n.
    impl: which time loop runs, "torch", "extension", "triton" or "auto" (the default: the
    fastest available for x); see :mod:`factorlm.ops._backend`. ValueError for an unknown impl,
    RuntimeError when the asked-for loop cannot run x.

    Returns output (T, B, p) (packed: (N, p)), h_T (B, p), c_T (B, n), the states after each
    sequence's own last step.
    """
    p_in, p, n, rank = x.shape[-1], h0.shape[-1], c0.shape[-1], weight_w1.shape[0]
    gates = check_num_gates("flstm_layer", num_gates)
    check_arguments("flstm_layer", x, h0, c0, weight_hr, {
        "weight_w1": (weight_w1, (rank, p_in + p)), "weight_w2": (weight_w2, (gates * n, rank)),
        "bias": (bias, (gates * n,)), "weight_hr": (weight_hr, (p, n)),
    })
    weights = (weight_w1, weight_w2, bias, weight_hr)
    return run_layer(FLSTMFunction, x, h0, c0, weights, forget_bias, impl, batch_sizes)
