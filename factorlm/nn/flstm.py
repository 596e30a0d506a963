"""factorlm.nn.FLSTM: F-LSTM, the LSTM whose gate matrix is factorized as W2·W1."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from factorlm import ops
from factorlm.errors import ConfigWarning
from factorlm.nn import reference
from factorlm.nn.base import LSTMBase, per_layer
from factorlm.nn.cell_args import CellArg


class FLSTM(LSTMBase):
    r"""F-LSTM (Kuchaiev & Ginsburg 2017, §2.1): ``W·[x; h] + b`` becomes ``W2·(W1·[x; h]) + b``.

    Per layer k: ``weight_w1_l{k}`` (r, p_in + p), no bias; ``weight_w2_l{k}`` (4n, r);
    ``bias_l{k}`` (4n); ``weight_hr_l{k}`` (p, n) when ``proj_size > 0``; each again with
    ``_reverse`` for the reverse direction when bidirectional. Columns of W1 are
    ordered [x; h]; rows of W2 are the gates [i, f, g, o] as in torch.nn.LSTM (3n rows [i, g, o]
    with coupled_gates, and a 3n bias). Gate parameters: r·(p_in + p + 4n) instead of 4n·(p_in + p)
    (G·n for 4n in general, G = num_gates; with shared_gates W2 is (n, r), LSTMBase).

    Args: as torch.nn.LSTM, plus ``rank`` (r): one int, or one int per layer.
    """

    cell_args = (
        CellArg("rank", "F-LSTM factorization rank r, one int or one per layer (256,128)", symbol="r",
                example=5, per_layer_example=(3, 5, 2)),
    )

    def __init__(self, *args, rank, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank = per_layer("rank", rank, self.num_layers)
        _warn_if_rank_saves_nothing(self)
        self._init_layers()

    _shared_gate_layout = {"weight_w2": "rows"}  # shared gates: W2 (n, r), W1 as it is

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        r = self.rank[layer]
        return {
            "weight_w1": (r, self.layer_input_size(layer) + self.output_size),
            "weight_w2": (self.weight_gates * self.hidden_size, r),
        }

    def reset_parameters(self) -> None:
        """nn.LSTM's U(-1/√n, 1/√n) for bias and projection; each factor U(±1/√fan_in).

        With these, W2·W1 has entries of variance 1/(9·(p_in + p)): the scale of a dense
        fan-in-initialised gate matrix.
        """
        super().reset_parameters()
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                weights = self.layer_parameters(layer, direction)
                for name in ("weight_w1", "weight_w2"):
                    bound = 1.0 / math.sqrt(weights[name].shape[1])
                    nn.init.uniform_(weights[name], -bound, bound)

    @torch.no_grad()
    def precondition_factor_gradients_(self, damping: float = 1e-2) -> None:
        r"""Turn each layer's factor gradients into scaled-gradient-descent directions, in place.

        ``W1.grad ← (W2ᵀW2 + λI)⁻¹·W1.grad`` and ``W2.grad ← W2.grad·(W1W1ᵀ + λI)⁻¹`` (r × r
        solves), with λ = ``damping`` × the Gram matrix's mean eigenvalue.

        Why: a plain gradient step on the factors moves the product by
        ``ΔW ≈ −lr·(W2W2ᵀ·G + G·W1ᵀW1)`` (G = ∂L/∂W), so along a singular direction of W the
        step is scaled by about twice that singular value: W's singular values grow
        multiplicatively, and a learning rate tuned for a dense W diverges along the top ones
        (BENCHMARKS.md, "Why F-LSTM did not train under SGD"). After this preconditioning the step is
        ``ΔW ≈ −lr·(P₂·G + G·P₁)`` with P₂, P₁ the projections onto W2's columns and W1's
        rows: a dense step restricted to rank r, whatever the factors' scale (Tong, Ma &
        Chi 2021, "scaled gradient descent"). Call it between ``backward`` and the optimizer
        step; gradients that are None are skipped. Each direction's factors are one product.
        """
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                weights = self.layer_parameters(layer, direction)
                w1, w2 = weights["weight_w1"], weights["weight_w2"]
                if w1.grad is None or w2.grad is None:
                    continue
                g1 = torch.cholesky_solve(w1.grad, _damped_cholesky(w2.T @ w2, damping))  # (r, p_in + p)
                g2 = torch.cholesky_solve(w2.grad.T, _damped_cholesky(w1 @ w1.T, damping)).T  # (4n, r)
                w1.grad.copy_(g1)
                w2.grad.copy_(g2)

    def _gate_fn(self, layer: int, w):
        return lambda x_t, h: reference.factorized_gates(x_t, h, w["weight_w1"], w["weight_w2"], w["bias"])

    # the fast path, called with this layer's parameters (see LSTMBase._fast_layer_forward)
    _layer_function = staticmethod(ops.flstm_layer)
    # one step without autograd on the PyTorch loop (see LSTMBase._single_step)
    _step_function = staticmethod(ops.flstm_step)

    def _dense_gate_weights(self, layer: int, w):
        weight = w["weight_w2"] @ w["weight_w1"]  # (4n, p_in + p)
        p_in = self.layer_input_size(layer)
        return weight[:, :p_in], weight[:, p_in:], w["bias"]

    def _layer_gate_macs(self, layer: int) -> int:
        r = self.rank[layer]
        return r * (self.layer_input_size(layer) + self.output_size) + self.weight_gates * self.hidden_size * r

    def _extra_repr_parts(self) -> list[str]:
        rank = self.rank[0] if len(set(self.rank)) == 1 else list(self.rank)
        return [f"rank={rank}"]


def _warn_if_rank_saves_nothing(layer: FLSTM) -> None:
    """A ConfigWarning for each layer whose rank gives the factors at least as many parameters
    as the dense gate matrix: r·(m + 4n) >= 4n·m (m = p_in + p), i.e. r >= 4n·m / (m + 4n).

    Not an error: such a layer still computes an F-LSTM, and full-rank layers are legitimate in
    tests and comparisons. But it is almost always a typo or a misread size (--rank 1000 on 64-wide
    layers), and it costs more than the LSTM it was meant to shrink.
    """
    found: dict[tuple[int, int], list[int]] = {}  # (rank, width) -> layers: stacked layers often repeat
    gates = layer.weight_gates * layer.hidden_size
    for k, r in enumerate(layer.rank):
        width = layer.layer_input_size(k) + layer.output_size
        if r * (width + gates) >= gates * width:
            found.setdefault((r, width), []).append(k)
    problems = []
    for (r, width), layers in found.items():
        dense = gates * width
        threshold = -(-dense // (width + gates))  # the smallest rank that saves nothing
        problems.append(f"rank {r} in layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} has "
                        f"{r * (width + gates):,} gate parameters, the dense LSTM's {gates} x {width} matrix "
                        f"{dense:,}: ranks from {threshold} on save nothing (and above {min(gates, width)}, the "
                        f"dense matrix's full rank, add nothing)")
    if problems:
        warnings.warn("F-LSTM " + "; ".join(problems), ConfigWarning, stacklevel=3)


def _damped_cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor of ``gram + λI``, λ = damping × mean eigenvalue of the (r, r) Gram matrix."""
    r = gram.shape[0]
    lam = damping * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.linalg.cholesky(gram + lam * torch.eye(r, dtype=gram.dtype, device=gram.device))
