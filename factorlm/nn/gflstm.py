"""factorlm.nn.GFLSTM: G∘F-LSTM, G-LSTM's groups each factorized at rank r (groups of low rank)."""

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
from factorlm.nn.flstm import FLSTM
from factorlm.nn.glstm import GLSTM, _block_diagonal

_GROUPS = next(a for a in GLSTM.cell_args if a.name == "groups")
_RANK = next(a for a in FLSTM.cell_args if a.name == "rank")


class GFLSTM(LSTMBase):
    r"""G∘F-LSTM: k groups as in G-LSTM (Kuchaiev & Ginsburg 2017, §2.2), each group's gate matrix
    factorized at rank r as in F-LSTM (§2.1), the combination the paper's conclusion suggests.

    x_t and h_{t-1} are each split into k equal slices; group j maps [x^(j); h^(j)]
    ((p_in + p)/k wide) to the pre-activations of cells j·n/k … (j+1)·n/k of every gate through
    its own two factors: ``gates^(j) = W2^(j)·(W1^(j)·[x^(j); h^(j)]) + b^(j)``. The projection
    h = W_hr·(o ⊙ tanh c) stays dense, so groups mix through it. With k = 1 it is F-LSTM; with
    r at least the group's full rank, min((p_in + p)/k, 4n/k), it computes every G-LSTM.

    Per layer l: ``weight_w1_l{l}`` (k, r, (p_in + p)/k), group j's columns ordered
    [x^(j); h^(j)], no bias; ``weight_w2_l{l}`` (k, 4n/k, r), the 4n/k rows of group j its
    [i, f, g, o] pre-activations (n/k each, as G-LSTM's); ``bias_l{l}`` (4n) full width in
    torch.nn.LSTM's order (with coupled_gates 3n/k rows [i, g, o] and a 3n bias: every 4 here is 3); ``weight_hr_l{l}`` (p, n); each again with ``_reverse`` for the
    reverse direction when bidirectional. Every group has its own weights.
    Gate parameters: k·r·((p_in + p)/k + 4n/k) = r·(p_in + p + 4n), F-LSTM's count at the same
    r, instead of G-LSTM's 4n·(p_in + p)/k; multiply-adds per token the same.

    Args: as torch.nn.LSTM, plus ``groups`` (k) and ``rank`` (r), each one int or one int per
    layer (the same ``--groups`` / ``--rank`` options as G-LSTM's and F-LSTM's). Each layer's
    input size, the output size p and hidden_size must be divisible by that layer's groups.

    The fast path runs every time loop: the C++ one on a CPU ("auto"), PyTorch's and Triton's
    (k = 1 runs F-LSTM's function).
    """

    cell_args = (
        # the same parse and per_layer as G-LSTM's groups and F-LSTM's rank: one --groups / --rank
        # option serves all three cells (factorlm.nn.registry checks it)
        CellArg("groups", "G∘F-LSTM groups k, one int or one per layer (4,8)", symbol="k", example=2,
                per_layer_example=(2, 4, 2), parse=_GROUPS.parse, per_layer=_GROUPS.per_layer),
        CellArg("rank", "G∘F-LSTM rank r of each group's factorization, one int or one per layer (64,32)",
                symbol="r", example=3, per_layer_example=(3, 1, 2), parse=_RANK.parse, per_layer=_RANK.per_layer),
    )

    def __init__(self, *args, groups, rank, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups = per_layer("groups", groups, self.num_layers)
        self.rank = per_layer("rank", rank, self.num_layers)
        self._check_divides("groups", self.groups)
        _warn_if_rank_saves_nothing(self)
        self._init_layers()

    _shared_gate_layout = {"weight_w2": "groups"}  # shared gates: W2 (k, n/k, r)

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        k, r = self.groups[layer], self.rank[layer]
        return {
            "weight_w1": (k, r, (self.layer_input_size(layer) + self.output_size) // k),
            "weight_w2": (k, self.weight_gates * self.hidden_size // k, r),
        }

    def _empty_parameter(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        # Column-major within each group, as G-LSTM's weights and for the same reason: the
        # forward's products read every factor transposed (x^(j)·W1^(j)^T, z^(j)·W2^(j)^T), and
        # MKL's batched product of a transposed view is its slow case. Shape, values and
        # state_dict are unchanged; only the strides.
        if name in ("weight_w1", "weight_w2"):
            k, rows, cols = shape
            return torch.empty(k, cols, rows).transpose(1, 2)
        return super()._empty_parameter(name, shape)

    def reset_parameters(self) -> None:
        """nn.LSTM's U(-1/√n, 1/√n) for bias and projection; each factor U(±1/√fan_in) as F-LSTM's,
        with a group's fan-in: W1^(j) (p_in + p)/k, W2^(j) r."""
        super().reset_parameters()
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                weights = self.layer_parameters(layer, direction)
                for name in ("weight_w1", "weight_w2"):
                    bound = 1.0 / math.sqrt(weights[name].shape[2])
                    nn.init.uniform_(weights[name], -bound, bound)

    def _gate_fn(self, layer: int, w):
        return lambda x_t, h: reference.grouped_factorized_gates(x_t, h, w["weight_w1"], w["weight_w2"], w["bias"],
                                                                 self.num_gates)

    # the fast path, called with this layer's parameters (see LSTMBase._fast_layer_forward)
    _layer_function = staticmethod(ops.gflstm_layer)
    # one step without autograd on the PyTorch loop (see LSTMBase._single_step)
    _step_function = staticmethod(ops.gflstm_step)

    def _dense_gate_weights(self, layer: int, w):
        pk_in = self.layer_input_size(layer) // self.groups[layer]
        per_group = w["weight_w2"] @ w["weight_w1"]  # (k, G·n/k, (p_in + p)/k): G-LSTM's group weights
        gates = self.num_gates
        return (_block_diagonal(per_group[:, :, :pk_in], gates), _block_diagonal(per_group[:, :, pk_in:], gates),
                w["bias"])

    def _layer_gate_macs(self, layer: int) -> int:
        r = self.rank[layer]
        return r * (self.layer_input_size(layer) + self.output_size) + self.weight_gates * self.hidden_size * r

    def _extra_repr_parts(self) -> list[str]:
        groups = self.groups[0] if len(set(self.groups)) == 1 else list(self.groups)
        rank = self.rank[0] if len(set(self.rank)) == 1 else list(self.rank)
        return [f"groups={groups}", f"rank={rank}"]


def _warn_if_rank_saves_nothing(layer: GFLSTM) -> None:
    """A ConfigWarning for each layer whose rank gives a group's factors at least as many parameters
    as its dense G-LSTM block: r·(mk + G·nk) >= G·nk·mk (mk = (p_in + p)/k, nk = n/k, G = num_gates).

    Not an error, as for F-LSTM (whose rule this is, group by group; k = 1 gives F-LSTM's): such a
    layer still computes a G∘F-LSTM, and full-rank layers are legitimate in tests and comparisons
    (they hold every G-LSTM). But it is almost always a typo, and the layer costs more than the
    G-LSTM it was meant to shrink.
    """
    found: dict[tuple[int, int, int], list[int]] = {}  # (groups, rank, width) -> layers
    for index, (k, r) in enumerate(zip(layer.groups, layer.rank)):
        width = layer.layer_input_size(index) + layer.output_size
        mk, gates = width // k, layer.weight_gates * layer.hidden_size // k
        if r * (mk + gates) >= gates * mk:
            found.setdefault((k, r, width), []).append(index)
    problems = []
    for (k, r, width), layers in found.items():
        mk, gates = width // k, layer.weight_gates * layer.hidden_size // k
        dense = gates * mk
        threshold = -(-dense // (mk + gates))  # the smallest rank that saves nothing
        problems.append(f"rank {r} with groups {k} in layer{'s' if len(layers) > 1 else ''} "
                        f"{', '.join(map(str, layers))} gives each group {r * (mk + gates):,} gate parameters, its "
                        f"dense {gates} x {mk} block {dense:,}: ranks from {threshold} on save nothing (and above "
                        f"{min(gates, mk)}, the block's full rank, add nothing)")
    if problems:
        warnings.warn("G∘F-LSTM " + "; ".join(problems), ConfigWarning, stacklevel=3)
