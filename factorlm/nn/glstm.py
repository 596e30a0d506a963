"""factorlm.nn.GLSTM: G-LSTM, the LSTM whose gate matrix is block-diagonal over k groups."""

from __future__ import annotations

import torch

from factorlm import ops
from factorlm.nn import reference
from factorlm.nn.base import LSTMBase, per_layer
from factorlm.nn.cell_args import CellArg


class GLSTM(LSTMBase):
    r"""G-LSTM (Kuchaiev & Ginsburg 2017, §2.2): k independent groups inside one LSTM layer.

    x_t and h_{t-1} are each split into k equal slices; group j maps [x^(j); h^(j)] to the
    pre-activations of cells j·n/k … (j+1)·n/k of every gate (a block-diagonal W). The
    projection h = W_hr·(o ⊙ tanh c) stays dense, so groups mix through it.

    Per layer k: ``weight_ih_l{k}`` (g, 4n/g, p_in/g) and ``weight_hh_l{k}`` (g, 4n/g, p/g),
    where the 4n/g rows of group j are its [i, f, g, o] pre-activations (n/g each; 3n/g rows
    [i, g, o] with coupled_gates, and likewise 3n for the bias);
    ``bias_l{k}`` (4n) full width in torch.nn.LSTM's order; ``weight_hr_l{k}`` (p, n); each again
    with ``_reverse`` for the reverse direction when bidirectional (whose next layer's input, the
    two directions' outputs side by side, is 2p wide: its groups see both directions).
    Every group has its own weights (a failure of TensorFlow's contrib GLSTMCell, issue #16703,
    was groups sharing one matrix). Gate parameters: 4n·(p_in + p)/g (with shared_gates each group
    outputs n/g rows, shared by the gates: n·(p_in + p)/g, LSTMBase).

    Args: as torch.nn.LSTM, plus ``groups``: one int, or one int per layer ("hierarchical"
    groups, e.g. (4, 8)). Each layer's input size, the output size p and hidden_size must be
    divisible by that layer's groups.
    """

    cell_args = (
        CellArg("groups", "G-LSTM groups k, one int or one per layer (4,8)", symbol="k",
                example=2, per_layer_example=(2, 4, 2)),
    )

    def __init__(self, *args, groups, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.groups = per_layer("groups", groups, self.num_layers)
        self._check_divides("groups", self.groups)
        self._init_layers()

    _shared_gate_layout = {"weight_ih": "groups", "weight_hh": "groups"}  # shared gates: n/k rows per group

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        k = self.groups[layer]
        rows = self.weight_gates * self.hidden_size // k
        return {
            "weight_ih": (k, rows, self.layer_input_size(layer) // k),
            "weight_hh": (k, rows, self.output_size // k),
        }

    def _empty_parameter(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        # The group weights (k, 4n/k, m) are stored column-major within each group (strides
        # (4n/k·m, 1, 4n/k)): every product reads them transposed, x^(j)·W^(j)^T, and a batched
        # product of a transposed view is MKL's slow case (a batch-1 step's two bmms took 4-6 µs
        # each instead of 1.6-2.7). The shape, values and state_dict are unchanged; only strides.
        if name in ("weight_ih", "weight_hh"):
            k, rows, cols = shape
            return torch.empty(k, cols, rows).transpose(1, 2)
        return super()._empty_parameter(name, shape)

    def _gate_fn(self, layer: int, w):
        return lambda x_t, h: reference.grouped_gates(x_t, h, w["weight_ih"], w["weight_hh"], w["bias"],
                                                      self.num_gates)

    # the fast path, called with this layer's parameters (see LSTMBase._fast_layer_forward)
    _layer_function = staticmethod(ops.glstm_layer)
    # one step without autograd on the PyTorch loop (see LSTMBase._single_step)
    _step_function = staticmethod(ops.glstm_step)

    def _dense_gate_weights(self, layer: int, w):
        gates = self.num_gates
        return _block_diagonal(w["weight_ih"], gates), _block_diagonal(w["weight_hh"], gates), w["bias"]

    def _layer_gate_macs(self, layer: int) -> int:
        gate_rows = self.weight_gates * self.hidden_size
        return gate_rows * (self.layer_input_size(layer) + self.output_size) // self.groups[layer]

    def _extra_repr_parts(self) -> list[str]:
        groups = self.groups[0] if len(set(self.groups)) == 1 else list(self.groups)
        return [f"groups={groups}"]


def _block_diagonal(weight: torch.Tensor, num_gates: int = 4) -> torch.Tensor:
    """(k, G·n/k, m/k) grouped weight -> the dense (G·n, m) matrix in gate-major row order."""
    k, rows, cols = weight.shape
    per_gate = weight.unflatten(1, (num_gates, rows // num_gates))  # (k, gate, n/k, m/k)
    return torch.cat([torch.block_diag(*per_gate[:, gate].unbind(0)) for gate in range(num_gates)], dim=0)
