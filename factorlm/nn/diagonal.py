"""factorlm.nn.DiagonalLSTM: the LSTM whose recurrent map is element-wise (IndyLSTM, IndRNN-style)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from factorlm import ops
from factorlm.nn.base import LSTMBase
from factorlm.nn.cell_args import CellArg


class DiagonalLSTM(LSTMBase):
    r"""Diagonal-recurrence LSTM ("IndyLSTM", Gonnet & Deselaers 2019, arXiv 1903.08023; the
    recurrence of IndRNN, Li et al. 2018, arXiv 1803.04831): each gate's recurrent matrix is a
    diagonal, i.e. an element-wise product with one vector per gate, and the input map is dense:

        ``[i f g o]_t = W_ih·x_t + b + u ⊙ s_{t-1}``  (u_i ⊙ s, u_f ⊙ s, u_g ⊙ s, u_o ⊙ s)
        ``c_t = σ(f + forget_bias)⊙c_{t-1} + σ(i)⊙tanh(g)``;  ``m_t = σ(o)⊙tanh(c_t)``
        ``h_t = m_t``, or ``W_hr·m_t`` when ``proj_size > 0``

    The recurrent input s_{t-1} (n wide, as a diagonal must be square):
        without a projection, s_{t-1} = h_{t-1} (= m_{t-1}), s_0 = h_0: the IndyLSTM, and the same
        function as a ``torch.nn.LSTM`` whose W_hh is per-gate diagonal (:meth:`to_lstm` builds it);
        with a projection, s_{t-1} = tanh(c_{t-1}), s_0 = tanh(c_0). Why not m_{t-1}: the state a
        layer returns and takes is torch.nn.LSTM's (h, c), with h the projected p-wide output, and
        m_{t-1} = σ(o_{t-1})⊙tanh(c_{t-1}) cannot be recovered from it; then running a sequence in
        chunks, ``layer(x[5:], layer(x[:5], hx)[1])``, would not equal one pass. tanh(c_{t-1}) is
        what m_{t-1} is before its output gate, and c is in the state. So with a projection h_0 is
        not read (its gradient is zero), the projection feeds only the next layer and the output,
        and no torch.nn.LSTM computes this function: :meth:`to_lstm` refuses, saying so.

    Per layer k: ``weight_ih_l{k}`` (4n, p_in) as torch.nn.LSTM's; ``weight_hh_l{k}`` (4, n), row g
    the recurrent weights u_g of gate g in [i, f, g, o] order; ``bias_l{k}`` (4n); ``weight_hr_l{k}``
    (p, n); ``_reverse`` twins when bidirectional. Gate parameters 4n·p_in + 4n; multiply-adds per
    token the same (the O(n) u ⊙ s counted as the gate map's, as a diagonal GEMM would be). With
    coupled_gates every 4 here is G = 3, gates [i, g, o]: c_t = (1 − ι)⊙c_{t-1} + ι⊙tanh(g),
    ι = σ(i − forget_bias) (factorlm.nn.base.LSTMBase).

    shared_gates=True composes, and the whole gate map shares: one W_ih (n, p_in) and one u (1, n)
    give a = W_ih·x_t + u ⊙ s_{t-1}, and gate g gets s_g ⊙ a + b_g (LSTMBase), so gate g's
    recurrent diagonal is s_g ⊙ u: G× fewer input weights and recurrent weights, for G·n scales.
    Why share u too rather than keep G of them: the option's definition (one gate map, scaled per
    gate) holds as it is, and a per-gate u would only add back G·n values that s_g ⊙ u already
    spans (any per-gate diagonal is s_g ⊙ u with u = 1). ``recurrent_clip`` clamps u, not s_g ⊙ u.

    Initialisation: W_ih, b, W_hr as torch.nn.LSTM, U(-1/√n, 1/√n); u ~ U(-1, 1), the recurrent
    initialiser of the IndyLSTM authors' TensorFlow cell (tf.contrib.rnn.IndyLSTMCell, its
    ``kernel_u``): with bounded gates a |u| up to 1 neither explodes nor starves the recurrence.
    Clipping: IndRNN (Li et al. 2018) keeps each |u| within a bound after every update (for ReLU
    units over T steps about 2^{1/T}, so that u^T stays bounded). ``recurrent_clip=γ`` does that here:
    :meth:`clip_recurrent_weights_` clamps every u to [-γ, γ] (called at construction; call it after
    each optimiser step); the default None never clips, and nothing clips silently.

    Fast path: one input GEMM for all steps, then a fused element-wise scan with no per-step GEMM
    (C++ on CPU, Triton on CUDA, a PyTorch loop anywhere; :mod:`factorlm.ops.diagonal`), then the
    projection as one GEMM over all steps.
    """

    cell_args: tuple[CellArg, ...] = ()

    #: whether a torch.nn.LSTM computes this function when proj_size > 0 (tests read it)
    dense_equivalent_with_projection = False

    def __init__(self, *args, recurrent_clip: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if recurrent_clip is not None and (not isinstance(recurrent_clip, numbers.Real)
                                           or not math.isfinite(recurrent_clip) or recurrent_clip <= 0):
            raise ValueError(f"recurrent_clip must be a positive finite number (the largest |u| allowed) or None, "
                             f"got {recurrent_clip!r}")
        self.recurrent_clip = None if recurrent_clip is None else float(recurrent_clip)
        self._init_layers()

    #: shared gates: the whole gate map shares, W_ih (n, p_in) and one u (1, n)
    _shared_gate_layout = {"weight_ih": "rows", "weight_hh": "vector"}

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        n = self.hidden_size
        gates = self.weight_gates  # G, or 1 with shared gates
        return {"weight_ih": (gates * n, self.layer_input_size(layer)), "weight_hh": (gates, n)}

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            for name, weight in self.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.uniform_(weight, -1.0, 1.0)
        self.clip_recurrent_weights_()

    @torch.no_grad()
    def clip_recurrent_weights_(self) -> DiagonalLSTM:
        """Clamp every recurrent weight u to [-recurrent_clip, recurrent_clip] in place (IndRNN's
        constraint; a no-op when recurrent_clip is None). Returns self."""
        if getattr(self, "recurrent_clip", None) is not None:
            for name, weight in self.named_parameters():
                if name.startswith("weight_hh"):
                    weight.clamp_(-self.recurrent_clip, self.recurrent_clip)
        return self

    # the maths ------------------------------------------------------------
    def _gate_fn(self, layer: int, w):
        if self.proj_size:
            raise NotImplementedError("with a projection the diagonal LSTM's recurrence reads tanh(c_{t-1}), not h; "
                                      "its per-step reference is factorlm.nn.diagonal.reference_layer")
        return lambda x_t, h: _gates(x_t, h, w["weight_ih"], w["weight_hh"], w["bias"])

    def _layer_forward(self, layer, direction, x, h0, c0, batch_sizes):
        if self.impl == "reference":
            w = self.effective_parameters(layer, direction)
            return reference_layer(x, h0, c0, w["weight_ih"], w["weight_hh"], w["bias"], w["weight_hr"],
                                   self.forget_bias, batch_sizes, num_gates=self.num_gates)
        return super()._layer_forward(layer, direction, x, h0, c0, batch_sizes)

    _layer_function = staticmethod(ops.diagonal_layer)
    _step_function = staticmethod(ops.diagonal_step)

    def _dense_gate_weights(self, layer: int, w):
        if self.proj_size:
            raise ValueError(_NO_DENSE_WITH_PROJECTION)
        u = w["weight_hh"]
        return w["weight_ih"], torch.cat([torch.diag(u[gate]) for gate in range(self.num_gates)]), w["bias"]

    def to_lstm(self) -> nn.LSTM:
        """The torch.nn.LSTM computing the same function: without a projection, W_hh = the per-gate
        diagonals diag(u_g) stacked (4n, n). With a projection no torch.nn.LSTM does (its recurrence
        reads the projected h; this layer's reads tanh(c)): ValueError saying so."""
        if self.proj_size and not self.coupled_gates:  # a coupled layer: the base class's refusal, first
            raise ValueError(_NO_DENSE_WITH_PROJECTION)
        return super().to_lstm()

    def _layer_gate_macs(self, layer: int) -> int:
        return self.weight_gates * self.hidden_size * (self.layer_input_size(layer) + 1)

    def _extra_repr_parts(self) -> list[str]:
        return [] if self.recurrent_clip is None else [f"recurrent_clip={self.recurrent_clip}"]


_NO_DENSE_WITH_PROJECTION = (
    "DiagonalLSTM with proj_size > 0 has no torch.nn.LSTM equivalent: its recurrence reads the n-wide "
    "tanh(c_{t-1}) through per-gate diagonals, while torch.nn.LSTM's reads the projected p-wide h_{t-1}; "
    "only a DiagonalLSTM with proj_size=0 converts"
)


def _gates(x_t: Tensor, s: Tensor, weight_ih: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """W_ih·x_t + b + u ⊙ s: x_t (B, p_in), s (B, n), weight_ih (G·n, p_in), u (G, n) -> (B, G·n)."""
    gates = x_t @ weight_ih.t() + (u.unsqueeze(0) * s.unsqueeze(1)).flatten(1)
    return gates if bias is None else gates + bias


def reference_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, u: Tensor, bias: Tensor | None,
                    weight_hr: Tensor | None, forget_bias: float = 0.0,
                    batch_sizes: Sequence[int] | None = None, num_gates: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """The plain per-step diagonal LSTM layer (impl="reference", the oracle of the fast path), with
    factorlm.nn.reference.lstmp_layer's arguments and results but the weights themselves: x
    (T, B, p_in), or packed rows (N, p_in) with ``batch_sizes``; h0 (B, p), c0 (B, n); num_gates
    3 for coupled input and forget gates (the CIFG cell of factorlm.nn.reference)."""
    steps = x.unbind(0) if batch_sizes is None else x.split(list(batch_sizes), dim=0)
    h, c = h0, c0
    outputs, ended_h, ended_c = [], [], []
    for x_t in steps:
        size = x_t.shape[0]
        if size < h.shape[0]:  # the last rows' sequences ended at the step before
            ended_h.append(h[size:])
            ended_c.append(c[size:])
            h, c = h[:size], c[:size]
        s = h if weight_hr is None else torch.tanh(c)
        gates = _gates(x_t, s, weight_ih, u, bias).chunk(num_gates, dim=1)
        if num_gates == 3:
            i, g, o = gates
            input_gate = torch.sigmoid(i - forget_bias)
            c = (1 - input_gate) * c + input_gate * torch.tanh(g)
        else:
            i, f, g, o = gates
            c = torch.sigmoid(f + forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if weight_hr is not None:
            h = h @ weight_hr.t()
        outputs.append(h)
    h_n = torch.cat([h, *reversed(ended_h)])
    c_n = torch.cat([c, *reversed(ended_c)])
    return torch.cat(outputs) if batch_sizes is not None else torch.stack(outputs), h_n, c_n
