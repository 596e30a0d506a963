"""What the three LSTM layers share: the torch.nn.LSTM contract, shape checks and conversion.

A subclass only says how one layer's gate map is parameterised (``_make_layer_parameters``),
how it is applied (``_gate_fn``) and what dense W it equals (``dense_gate_weights``). This
class does the rest exactly as torch.nn.LSTM does: argument checks, ``batch_first``,
unbatched input, the initial state, inter-layer dropout, ``(output, (h_n, c_n))``.

Layouts, as in torch.nn.LSTM (L = num_layers, D = 1):
    input   (T, B, p_in), or (B, T, p_in) with batch_first, or (T, p_in) unbatched
    output  (T, B, p) / (B, T, p) / (T, p),  p = proj_size or hidden_size
    h_0/h_n (L, B, p),  c_0/c_n (L, B, n),   or (L, p) / (L, n) for unbatched input
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from factorlm import ops
from factorlm.nn import reference
from factorlm.validate import check_fraction, check_int

#: The implementations a layer can run (``layer.impl``; all compute the same function):
#:   "reference"  the plain per-step oracle in factorlm.nn.reference, autograd for the backward;
#:   "torch"      the whole-sequence autograd Function with the PyTorch time loop (the dense LSTM: torch.lstm);
#:   "extension"  the same Function with the C++ time loop (CPU float32/float64);
#:   "triton"     the same Function with the PyTorch loop and fused Triton cells (CUDA);
#:   "auto"       the default: the fastest of those for the input (the dense LSTM: torch.lstm).
#: factorlm.ops._backend says exactly when each runs and what it raises. "fast" is a deprecated
#: alias of "auto".
IMPLEMENTATIONS = ("reference", *ops.IMPLEMENTATIONS)


def per_layer(name: str, value, num_layers: int) -> tuple[int, ...]:
    """Expand an int, or check a sequence of ints, into one positive int per layer."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_layers:
            raise ValueError(
                f"{name} has {len(value)} entries {list(value)!r} but num_layers={num_layers}; "
                f"give one int, or one int per layer"
            )
        return tuple(check_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (check_int(name, value),) * num_layers


class LSTMBase(nn.Module):
    """Base of factorlm.nn.LSTM / FLSTM / GLSTM (not used directly).

    Every layer has one gate bias ``bias_l{k}`` of size 4n (the paper's b), not torch.nn.LSTM's
    two (b_ih + b_hh are redundant: only their sum matters). ``forget_bias`` is a constant, not a
    parameter, added to the forget-gate pre-activation.
    """

    _cell_name = "LSTM"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size = check_int("input_size", input_size)
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.num_layers = check_int("num_layers", num_layers)
        self.proj_size = check_int("proj_size", proj_size, minimum=0)
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size (as in torch.nn.LSTM), "
                f"got proj_size={proj_size}, hidden_size={hidden_size}"
            )
        dropout = check_fraction("dropout", dropout, include_one=True)  # as torch.nn.LSTM
        if not isinstance(forget_bias, numbers.Real) or not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        if bidirectional:
            raise NotImplementedError(
                f"{name}: bidirectional=True is not supported yet; run two layers over the "
                f"sequence and its reverse, or use torch.nn.LSTM"
            )
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = False
        self.forget_bias = float(forget_bias)
        self.impl = "auto"

    # ------------------------------------------------------- implementation
    #: what ``impl`` may be set to on this class (see IMPLEMENTATIONS)
    _implementations: tuple[str, ...] = IMPLEMENTATIONS

    @property
    def impl(self) -> str:
        """Which implementation runs the layer: one of IMPLEMENTATIONS (module doc), "auto" by default.

        Setting an unknown value raises ValueError at once; "fast" is stored as "auto", with a
        DeprecationWarning.
        """
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        # stacklevel: warn at the line that set the attribute (setter <- Module.__setattr__ <- it)
        self._impl = ops.check_impl(value, self._implementations, f"{type(self).__name__}.impl", stacklevel=3)

    def __setstate__(self, state: dict) -> None:
        # a layer pickled before impl was a property has it as a plain attribute, maybe "fast"
        old = state.pop("impl", None)
        super().__setstate__(state)
        if old is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.impl = old

    # ------------------------------------------------------------------ sizes
    @property
    def output_size(self) -> int:
        """p: the size of h_t (proj_size if > 0, else hidden_size)."""
        return self.proj_size or self.hidden_size

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.output_size

    # ------------------------------------------------------------- parameters
    def _init_layers(self) -> None:
        """Called by subclasses once their own attributes are set."""
        for layer in range(self.num_layers):
            for name, shape in self._layer_parameter_shapes(layer).items():
                self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape)))
            if self.bias:
                self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(4 * self.hidden_size)))
            if self.proj_size:
                self.register_parameter(
                    f"weight_hr_l{layer}", nn.Parameter(torch.empty(self.proj_size, self.hidden_size))
                )
        self.reset_parameters()

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def layer_parameters(self, layer: int) -> dict[str, Tensor | None]:
        """The layer's tensors by short name (``weight_ih``, ``bias``, ``weight_hr``, ...)."""
        names = list(self._layer_parameter_shapes(layer)) + ["bias", "weight_hr"]
        return {name: getattr(self, f"{name}_l{layer}", None) for name in names}

    def reset_parameters(self) -> None:
        """U(-1/√n, 1/√n) for every tensor, as torch.nn.LSTM (subclasses may refine)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    # ---------------------------------------------------------------- the maths
    def _gate_fn(self, layer: int):
        """A function (x_t (B, p_in), h (B, p)) -> gate pre-activations (B, 4n)."""
        raise NotImplementedError

    def dense_gate_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The dense (weight_ih (4n, p_in), weight_hh (4n, p), bias (4n,) or None) this layer equals."""
        raise NotImplementedError

    def macs_per_token(self) -> int:
        """Forward multiply-adds per token (one time step of one sequence), all layers.

        Counts the gate map and the projection; the O(n) pointwise gate math is left out.
        """
        return sum(self._layer_gate_macs(layer) + self.proj_size * self.hidden_size for layer in range(self.num_layers))

    def _layer_gate_macs(self, layer: int) -> int:
        raise NotImplementedError

    def _layer_forward(self, layer: int, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One layer over the whole sequence. x: (T, B, p_in), h0: (B, p), c0: (B, n).

        "reference" runs the per-step oracle; every other impl goes to ``_fast_layer_forward``,
        which hands it on to factorlm.ops to pick the time loop.
        """
        if self.impl == "reference":
            return self._reference_layer_forward(layer, x, h0, c0)
        return self._fast_layer_forward(layer, x, h0, c0)

    def _reference_layer_forward(self, layer, x, h0, c0):
        return reference.lstmp_layer(
            x, h0, c0, self._gate_fn(layer), getattr(self, f"weight_hr_l{layer}", None), self.forget_bias
        )

    #: the factorlm.ops function running one layer over a whole sequence with a hand-written
    #: backward, called as (x, h0, c0, *layer_parameters(layer).values(), forget_bias, impl=...), i.e.
    #: the two gate weights, bias, weight_hr; None where the class has no such function
    _layer_function = None

    def _fast_layer_forward(self, layer, x, h0, c0):
        """``_layer_function``, whose time loop ``self.impl`` picks (else the reference): same maths
        as the reference."""
        if self._layer_function is None:
            return self._reference_layer_forward(layer, x, h0, c0)
        weights = self.layer_parameters(layer).values()
        return self._layer_function(x, h0, c0, *weights, self.forget_bias, impl=self.impl)

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        """input (T, B, p_in) [or (B, T, p_in) with batch_first, or (T, p_in)];
        hx = (h_0 (L, B, p), c_0 (L, B, n)) or None for zeros.

        Returns output (T, B, p) and (h_n (L, B, p), c_n (L, B, n)), laid out as torch.nn.LSTM.
        """
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                f"{name} does not accept a PackedSequence yet; pad the batch and pass a Tensor"
            )
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name} expects a 2-D (unbatched) or 3-D input, got {shape}")
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must equal input_size={self.input_size}, got {input.shape[-1]} "
                f"(input shape {tuple(input.shape)})"
            )
        unbatched = input.dim() == 2
        if unbatched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise ValueError(f"{name}: the sequence is empty (input shape {tuple(input.shape)})")
        h0, c0 = self._initial_state(hx, x, unbatched)
        output, h_n, c_n = self._stack_forward(x, h0, c0)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _stack_forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All layers. x: (T, B, p_in), h0: (L, B, p), c0: (L, B, n)."""
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x, h, c = self._layer_forward(layer, x, h0[layer], c0[layer])
            h_n.append(h)
            c_n.append(c)
        return x, torch.stack(h_n), torch.stack(c_n)

    def _initial_state(self, hx, x: Tensor, unbatched: bool) -> tuple[Tensor, Tensor]:
        batch = x.shape[1]
        L, p, n = self.num_layers, self.output_size, self.hidden_size
        if hx is None:
            zeros = dict(dtype=x.dtype, device=x.device)
            return torch.zeros(L, batch, p, **zeros), torch.zeros(L, batch, n, **zeros)
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        h0, c0 = hx
        expected_h = (L, p) if unbatched else (L, batch, p)
        expected_c = (L, n) if unbatched else (L, batch, n)
        for label, state, expected in (("h_0", h0, expected_h), ("c_0", c0, expected_c)):
            if not isinstance(state, Tensor) or tuple(state.shape) != expected:
                got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                raise ValueError(f"{type(self).__name__}: expected {label} of shape {expected}, got {got}")
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0

    # --------------------------------------------------------------- conversion
    @torch.no_grad()
    def to_lstm(self) -> nn.LSTM:
        """A torch.nn.LSTM computing the same function (F-LSTM: W = W2·W1; G-LSTM: block-diagonal W).

        The gate bias and forget_bias go into ``bias_ih_l{k}``; ``bias_hh_l{k}`` is zero.
        """
        has_bias = self.bias or self.forget_bias != 0.0
        ref = next(self.parameters())
        lstm = nn.LSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bias=has_bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            proj_size=self.proj_size,
            device=ref.device,
            dtype=ref.dtype,
        )
        n = self.hidden_size
        for layer in range(self.num_layers):
            weight_ih, weight_hh, bias = self.dense_gate_weights(layer)
            getattr(lstm, f"weight_ih_l{layer}").copy_(weight_ih)
            getattr(lstm, f"weight_hh_l{layer}").copy_(weight_hh)
            if has_bias:
                b = torch.zeros(4 * n, dtype=ref.dtype, device=ref.device) if bias is None else bias.clone()
                b[n : 2 * n] += self.forget_bias
                getattr(lstm, f"bias_ih_l{layer}").copy_(b)
                getattr(lstm, f"bias_hh_l{layer}").zero_()
            if self.proj_size:
                getattr(lstm, f"weight_hr_l{layer}").copy_(getattr(self, f"weight_hr_l{layer}"))
        lstm.train(self.training)
        return lstm

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}", f"{self.hidden_size}"]
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, proj_size=0, forget_bias=0.0)
        for key, default in defaults.items():
            value = getattr(self, key)
            if value != default:
                parts.append(f"{key}={value}")
        parts.extend(self._extra_repr_parts())
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set ``impl`` (see IMPLEMENTATIONS) on every factorlm LSTM / FLSTM / GLSTM inside ``module``
    (itself included, e.g. a LanguageModel or one layer); returns ``module``.

    E.g. ``set_impl(model, "reference")`` for the plain per-step path that export and quantization
    tools can trace. ValueError naming the value and the allowed ones if any layer refuses it (the
    dense LSTM has no "extension" or "triton"); then no layer is changed. A module without factorlm
    layers is returned unchanged.
    """
    impl = ops.check_impl(impl, IMPLEMENTATIONS, "impl", stacklevel=2)  # "fast" -> "auto", warned once
    layers = [m for m in module.modules() if isinstance(m, LSTMBase)]
    for layer in layers:  # all checked before any is changed
        ops.check_impl(impl, layer._implementations, f"{type(layer).__name__}.impl")
    for layer in layers:
        layer.impl = impl
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (works on the meta device: no memory is allocated)."""
    return sum(p.numel() for p in module.parameters())
