"""What the LSTM layers share: the whole torch.nn.LSTM contract, shape checks and conversion.

A subclass only says how one layer's gate map is parameterised (``_layer_parameter_shapes``), how
it is applied to given weights (``_gate_fn``), what dense W those weights equal
(``_dense_gate_weights``) and, optionally, which whole-sequence function runs it fast
(``_layer_function``). This class does the rest exactly as torch.nn.LSTM does, for every cell type
alike: argument checks, ``batch_first``, unbatched input, PackedSequence input (sorted or not),
``bidirectional`` (a second set of parameters per layer, suffixed ``_reverse``), the initial state,
inter-layer dropout, ``(output, (h_n, c_n))``.

Layouts, as in torch.nn.LSTM (L = num_layers, D = 2 if bidirectional else 1):
    input   (T, B, p_in), or (B, T, p_in) with batch_first, or (T, p_in) unbatched, or a PackedSequence
    output  (T, B, D·p) / (B, T, D·p) / (T, D·p) / a PackedSequence,  p = proj_size or hidden_size;
            with D = 2 the forward direction's p features come first
    h_0/h_n (L·D, B, p),  c_0/c_n (L·D, B, n),  or (L·D, p) / (L·D, n) for unbatched input; entry
            l·D + d is layer l, direction d (0 forward, 1 reverse)

A packed batch: each sequence's final state is that of its own last step, and the reverse
direction starts at each sequence's own last step (no padding is ever run). h_0 and h_n are in
the batch's original order (PackedSequence.sorted_indices / unsorted_indices), as in torch.nn.LSTM.
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
from factorlm.errors import InputShapeError
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


def parameter_name(name: str, layer: int, direction: int = 0) -> str:
    """The attribute holding a layer's tensor, as torch.nn.LSTM names them: ``weight_ih`` of layer 1
    is ``weight_ih_l1``, and of its reverse direction ``weight_ih_l1_reverse``."""
    return f"{name}_l{layer}" + ("_reverse" if direction else "")


class LSTMBase(nn.Module):
    """Base of factorlm.nn.LSTM / FLSTM / GLSTM (not used directly).

    Every layer has one gate bias ``bias_l{k}`` of size G·n (the paper's b; G = ``num_gates``), not
    torch.nn.LSTM's two (b_ih + b_hh are redundant: only their sum matters). ``forget_bias`` is a
    constant, not a parameter, added to the forget-gate pre-activation. With ``bidirectional=True``
    every tensor of a layer has a twin for the reverse direction, named with ``_reverse``
    (``bias_l{k}_reverse``).

    ``coupled_gates=True`` (any cell type) couples the input and forget gates, CIFG (Greff et al.
    2017, "LSTM: A Search Space Odyssey"): f_t = 1 − i_t, so the gate map has G = 3 blocks of n
    rows, [i, g, o], instead of G = 4, [i, f, g, o] (``num_gates``), a quarter fewer gate
    parameters and multiply-adds. There is no forget pre-activation then, and ``forget_bias`` b_f
    shifts the input gate's instead: i_t = σ(a_i − b_f), so f_t = 1 − i_t = σ(b_f − a_i), the same
    bias toward remembering that b_f gives the uncoupled forget gate σ(a_f + b_f):
        c_t = (1 − i_t)⊙c_{t-1} + i_t⊙tanh(a_g),   h_t = W_hr·(σ(a_o)⊙tanh(c_t)).
    No torch.nn.LSTM computes that, so :meth:`to_lstm` refuses such a layer.

    ``shared_gates=True`` (any cell type; composes with coupled_gates) gives the gates one gate map:
    the cell's weights produce ONE block of n pre-activations a = W·[x_t; h_{t-1}] (W with n rows:
    the dense W_ih / W_hh, F-LSTM's W2 (n, r), each G-LSTM group's n/k rows, C-LSTM's n/b block rows,
    the diagonal LSTM's W_ih (n, p_in) and one u (1, n)), and gate g gets
        z_g = s_g ⊙ a + b_g,   s = ``gate_scale_l{k}`` (G, n), initialised to ones; b = ``bias_l{k}`` (G·n)
    i.e. the G-gate weights diag(s_g)·W stacked: about G× fewer gate weights for G·n more scales.
    What runs: :meth:`effective_parameters` materialises the G-gate weights once per forward (an
    element-wise product of W's rows with s, under autograd, which carries the gradients back to s
    and W) and the cell's own paths run them unchanged (reference, PyTorch, C++ and Triton loops,
    torch.lstm). So the fast path costs the cell's non-shared multiply-adds, G·n rows on the input
    side too; :meth:`macs_per_token` counts the structure's own, the n-row map plus G·n scalings,
    which an input side computed n wide (then expanded) would approach. Without coupled gates a
    torch.nn.LSTM computes the layer (:meth:`to_lstm` builds it from the materialised weights).

    ``proj_rank=r`` (one int or one per layer; needs proj_size > 0 and 0 < r < min(n, p)) factors the
    projection W_hr (p × n) = P2·P1, P1 = ``weight_hr1_l{k}`` (r, n), P2 = ``weight_hr2_l{k}`` (p, r):
    r·(n + p) parameters instead of p·n. W_hr is materialised once per forward
    (:meth:`effective_parameters`) and the cell's paths run it unchanged; the multiply-add count is
    the factored one, r·(n + p) per token.

    A subclass (a new cell type) implements ``_layer_parameter_shapes(layer)``,
    ``_gate_fn(layer, weights)``, ``_dense_gate_weights(layer, weights)`` and
    ``_layer_gate_macs(layer)``, where ``weights`` is one direction's ``effective_parameters``: it never
    sees directions, packing or batch order, and gets all of them from this class. Every gate
    tensor it makes has ``weight_gates``·n gate rows (``num_gates``, in the order [i, f, g, o], or
    [i, g, o] when coupled; 1 with shared gates, and it declares in ``_shared_gate_layout`` how its
    tensors hold those rows), and its ``_layer_function`` / ``_step_function``, if any, take
    ``num_gates``.
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
        coupled_gates: bool = False,
        shared_gates: bool = False,
        proj_rank: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
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
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.forget_bias = float(forget_bias)
        if not isinstance(coupled_gates, bool):
            raise ValueError(f"coupled_gates must be True or False, got {coupled_gates!r}")
        self.coupled_gates = coupled_gates
        if not isinstance(shared_gates, bool):
            raise ValueError(f"shared_gates must be True or False, got {shared_gates!r}")
        self.shared_gates = shared_gates
        self.proj_rank = self._check_proj_rank(proj_rank)
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
        state.setdefault("coupled_gates", False)  # pickled before the options existed
        state.setdefault("shared_gates", False)
        state.setdefault("proj_rank", None)
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

    @property
    def num_directions(self) -> int:
        """D: 2 with bidirectional=True, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def num_gates(self) -> int:
        """G, the gate blocks of n pre-activations each: 4 ([i, f, g, o]), or 3 ([i, g, o]) with
        coupled_gates (f = 1 − i). Every gate tensor has G·n gate rows."""
        return 3 if self.coupled_gates else 4

    @property
    def weight_gates(self) -> int:
        """The gate blocks of n rows that the gate map's weights have: 1 with shared_gates (one block,
        scaled per gate by ``gate_scale``), else ``num_gates``."""
        return 1 if self.shared_gates else self.num_gates

    def _check_proj_rank(self, proj_rank) -> tuple[int, ...] | None:
        """proj_rank as one int per layer (None: a dense projection); ValueError naming the value and
        the valid range: it needs proj_size > 0, and 0 < r < min(hidden_size, proj_size)."""
        if proj_rank is None:
            return None
        if not self.proj_size:
            raise ValueError(f"proj_rank={proj_rank!r} factors the projection W_hr, which needs proj_size > 0; "
                             f"got proj_size=0")
        if isinstance(proj_rank, Sequence) and not isinstance(proj_rank, str):
            if len(proj_rank) != self.num_layers:
                raise ValueError(f"proj_rank has {len(proj_rank)} entries {list(proj_rank)!r} but "
                                 f"num_layers={self.num_layers}; give one int, or one int per layer")
            ranks = tuple(proj_rank)
        else:
            ranks = (proj_rank,) * self.num_layers
        limit = min(self.hidden_size, self.proj_size)
        for layer, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 < r < limit:
                raise ValueError(f"proj_rank={r} (layer {layer}) must be in 1..{limit - 1}: below min(hidden_size, "
                                 f"proj_size) = min({self.hidden_size}, {self.proj_size}), else the factors save "
                                 f"nothing")
        return tuple(int(r) for r in ranks)

    def layer_input_size(self, layer: int) -> int:
        """p_in of a layer: input_size for the first, D·p (both directions' outputs) after it."""
        return self.input_size if layer == 0 else self.output_size * self.num_directions

    # ------------------------------------------------------------- parameters
    def _check_divides(self, arg: str, values: tuple[int, ...]) -> None:
        """Refuse a per-layer ``arg`` (groups, block) that does not divide every size its layer
        splits: the layer's input size, hidden_size and the output size. ValueError naming the layer,
        the value, the sizes it fails and the values that would divide them all."""
        for layer, k in enumerate(values):
            sizes = {"input size": self.layer_input_size(layer), "hidden_size": self.hidden_size,
                     "output size": self.output_size}
            bad = {name: size for name, size in sizes.items() if size % k}
            if bad:
                listed = ", ".join(f"{name} {size}" for name, size in bad.items())
                common = math.gcd(*sizes.values())
                divisors = [str(d) for d in range(1, common + 1) if common % d == 0]
                choices = divisors[0] if len(divisors) == 1 else f"{', '.join(divisors[:-1])} or {divisors[-1]}"
                raise ValueError(
                    f"{type(self).__name__} layer {layer}: {arg}={k} does not divide the {listed}; the input "
                    f"size, hidden_size and output size must all be multiples of {arg}: here {choices}"
                )

    def _init_layers(self) -> None:
        """Called by subclasses once their own attributes are set."""
        if (self.shared_gates and not self._shared_gate_layout
                and type(self)._expand_shared_gates is LSTMBase._expand_shared_gates):
            # without it the scales would be made and never read: refused, not silently ignored
            raise NotImplementedError(
                f"{type(self).__name__} does not support shared_gates: it declares no _shared_gate_layout (how its "
                f"gate tensors hold their n rows, see factorlm.nn.base.LSTMBase)")
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                shapes = dict(self._layer_parameter_shapes(layer))
                if self.shared_gates:
                    shapes["gate_scale"] = (self.num_gates, self.hidden_size)
                if self.bias:
                    shapes["bias"] = (self.num_gates * self.hidden_size,)
                if self.proj_rank:
                    r = self.proj_rank[layer]
                    shapes["weight_hr1"] = (r, self.hidden_size)
                    shapes["weight_hr2"] = (self.proj_size, r)
                elif self.proj_size:
                    shapes["weight_hr"] = (self.proj_size, self.hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(parameter_name(name, layer, direction),
                                            nn.Parameter(self._empty_parameter(name, shape)))
        self.reset_parameters()

    def _empty_parameter(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The uninitialised tensor behind parameter ``name`` (a short name) of ``shape``: contiguous
        here; a subclass may choose another memory layout its products read faster."""
        return torch.empty(shape)

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """The gate map's tensors of one layer (either direction) by short name, and their shapes."""
        raise NotImplementedError

    def layer_parameters(self, layer: int, direction: int = 0) -> dict[str, Tensor | None]:
        """One direction's tensors of a layer by short name (``weight_ih``, ..., ``bias``,
        ``weight_hr``; None where absent), in the order the fast path takes them."""
        params = self._parameters
        return {short: params[name] if name in params else getattr(self, name, None)
                for short, name in self._parameter_names(layer, direction)}

    def _parameter_names(self, layer: int, direction: int) -> tuple[tuple[str, str], ...]:
        """(short name, attribute name) of one direction's tensors of a layer, worked out once: a
        batch-1 generation step asks for them at every token, where formatting the names and looking
        them up through nn.Module.__getattr__ cost a few µs of a ~65 µs step."""
        cache = self.__dict__.setdefault("_parameter_name_cache", {})
        names = cache.get((layer, direction))
        if names is None:
            if direction not in range(self.num_directions):
                raise ValueError(f"direction must be 0 (forward){' or 1 (reverse)' if self.bidirectional else ''} "
                                 f"for this {type(self).__name__}, got {direction!r}")
            shorts = [*self._layer_parameter_shapes(layer), *(["gate_scale"] if self.shared_gates else []), "bias",
                      *(["weight_hr1", "weight_hr2"] if self.proj_rank else ["weight_hr"])]
            names = cache[(layer, direction)] = tuple((s, parameter_name(s, layer, direction)) for s in shorts)
        return names

    def reset_parameters(self) -> None:
        """U(-1/√n, 1/√n) for every tensor, as torch.nn.LSTM (subclasses may refine); shared gates'
        scales s = 1 (every gate starts from the same pre-activation a, its bias apart); a low-rank
        projection's factors U(±1/√fan_in) each, as F-LSTM's (P1: n, P2: r)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)
        with torch.no_grad():
            for name, weight in self.named_parameters():
                if name.startswith("gate_scale_l"):
                    weight.fill_(1.0)
                elif name.startswith(("weight_hr1_l", "weight_hr2_l")):
                    fan_in = weight.shape[1]
                    nn.init.uniform_(weight, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def effective_parameters(self, layer: int, direction: int = 0) -> dict[str, Tensor | None]:
        """The tensors the cell's maths and fast paths take, by short name, in ``layer_parameters``'
        order: the gate map's tensors, ``bias``, ``weight_hr``. Without shared_gates or proj_rank,
        ``layer_parameters`` itself. With shared_gates the gate tensors are the G-gate ones,
        diag(s_g)·W stacked per gate (:meth:`_expand_shared_gates`); with proj_rank, ``weight_hr``
        is P2·P1 (p, n). Both are made here, once per forward, with autograd: gradients reach s, W,
        P1 and P2."""
        weights = self.layer_parameters(layer, direction)
        if not (self.shared_gates or self.proj_rank):  # the usual case: batch-1 generation calls this per token
            return weights
        weights = dict(weights)
        if self.shared_gates:
            weights = self._expand_shared_gates(layer, weights)
        if self.proj_rank:
            weight_hr1, weight_hr2 = weights.pop("weight_hr1"), weights.pop("weight_hr2")
            weights["weight_hr"] = weight_hr2 @ weight_hr1
        return weights

    #: with shared_gates, how each gate tensor of the cell holds its n gate rows, for
    #: :meth:`_expand_shared_gates`: "rows" (n, ...): row m is cell m; "groups" (k, n/k, ...): group j's
    #: row m is cell j·n/k + m; "vector" (1, n): one value per cell. A cell whose weights cannot be
    #: scaled row by row in their own form (C-LSTM's circulant blocks) overrides _expand_shared_gates.
    _shared_gate_layout: dict[str, str] = {}

    def _expand_shared_gates(self, layer: int, weights: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """``weights`` (one direction's, with ``gate_scale`` s (G, n)) with each gate tensor W of n
        rows replaced by its G-gate form, gate g's rows s_g ⊙ W's (the layout a non-shared layer of
        the cell has: G·n rows gate-major, or per group G·n/k rows [gate, cell]), s removed."""
        scale = weights.pop("gate_scale")  # (G, n)
        for name, layout in self._shared_gate_layout.items():
            weights[name] = scale_gate_rows(scale, weights[name], layout)
        return weights

    # ---------------------------------------------------------------- the maths
    def _gate_fn(self, layer: int, weights: dict[str, Tensor | None]):
        """A function (x_t (B, p_in), h (B, p)) -> gate pre-activations (B, G·n), computed with
        ``weights`` (one direction's ``effective_parameters(layer, direction)``)."""
        raise NotImplementedError

    def _dense_gate_weights(self, layer: int, weights: dict[str, Tensor | None]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The dense (weight_ih (G·n, p_in), weight_hh (G·n, p), bias (G·n,) or None) that ``weights``
        (one direction's ``effective_parameters``) equal; G = ``num_gates``."""
        raise NotImplementedError

    def dense_gate_weights(self, layer: int, direction: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
        """The dense (weight_ih (G·n, p_in), weight_hh (G·n, p), bias (G·n,) or None) this layer's
        ``direction`` (0 forward, 1 reverse) equals; G = ``num_gates``."""
        return self._dense_gate_weights(layer, self.effective_parameters(layer, direction))

    def macs_per_token(self) -> int:
        """Forward multiply-adds per token (one time step of one sequence), all layers and directions.

        Counts the gate map and the projection; the O(n) pointwise gate math is left out. With
        shared_gates, the structure's: the cell's map with n rows (``weight_gates`` = 1) plus the G·n
        scalings s_g ⊙ a (the fast path runs the materialised G-gate weights, the cell's non-shared
        count); with proj_rank, the projection's r·(n + p).
        """
        per_direction = 0
        for layer in range(self.num_layers):
            per_direction += self._layer_gate_macs(layer) + self._layer_projection_macs(layer)
            if self.shared_gates:
                per_direction += self.num_gates * self.hidden_size
        return per_direction * self.num_directions

    def _layer_projection_macs(self, layer: int) -> int:
        if self.proj_rank:
            return self.proj_rank[layer] * (self.hidden_size + self.proj_size)
        return self.proj_size * self.hidden_size

    def _layer_gate_macs(self, layer: int) -> int:
        raise NotImplementedError

    def _layer_forward(self, layer: int, direction: int, x: Tensor, h0: Tensor, c0: Tensor,
                       batch_sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor, Tensor]:
        """One direction of one layer over the whole sequence, in the direction's own time order
        (the caller reverses x for direction 1). x: (T, B, p_in), or packed rows (N, p_in) with
        ``batch_sizes``; h0: (B, p), c0: (B, n). Returns output (T, B, p) or (N, p), h_T, c_T.

        "reference" runs the per-step oracle; every other impl goes to ``_layer_function``, whose
        time loop factorlm.ops picks.
        """
        weights = self.effective_parameters(layer, direction)
        if self.impl == "reference" or self._layer_function is None:
            gates = self._gate_fn(layer, weights)
            return reference.lstmp_layer(x, h0, c0, gates, weights["weight_hr"], self.forget_bias, batch_sizes,
                                         num_gates=self.num_gates)
        return self._layer_function(x, h0, c0, *weights.values(), self.forget_bias, impl=self.impl,
                                    batch_sizes=batch_sizes, num_gates=self.num_gates)

    #: the factorlm.ops function running one layer over a whole sequence with a hand-written
    #: backward, called as (x, h0, c0, *effective_parameters(layer, direction).values(), forget_bias,
    #: impl=..., batch_sizes=..., num_gates=...), i.e. the two gate weights, bias, weight_hr; None
    #: where the class has no such function (then every impl runs the reference)
    _layer_function = None

    #: the factorlm.ops function running one step of one layer without autograd on the PyTorch
    #: loop, called as (x_t (B, p_in), h0 (B, p), c0 (B, n), *effective_parameters(layer).values(),
    #: forget_bias, num_gates) -> (h (B, p), c (B, n)); None where the class has none. See _single_step.
    _step_function = None

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None):
        """input (T, B, p_in) [or (B, T, p_in) with batch_first, or (T, p_in), or a PackedSequence];
        hx = (h_0 (L·D, B, p), c_0 (L·D, B, n)) or None for zeros.

        Returns output (T, B, D·p) [or a PackedSequence] and (h_n (L·D, B, p), c_n (L·D, B, n)),
        laid out as torch.nn.LSTM (module doc).
        """
        if not torch.is_grad_enabled() and self._step_function is not None and isinstance(input, Tensor):
            result = self._single_step(input, hx)
            if result is not None:
                return result
        if isinstance(input, PackedSequence):
            return self._packed_forward(input, hx)
        name = type(self).__name__
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise InputShapeError(f"{name} expects a 2-D (unbatched) or 3-D input, or a PackedSequence, got {shape}")
        self._check_input_size(input)
        unbatched = input.dim() == 2
        if unbatched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise InputShapeError(f"{name}: the sequence is empty (input shape {tuple(input.shape)})")
        h0, c0 = self._initial_state(hx, x, x.shape[1], unbatched)
        output, h_n, c_n = self._run_stack(x, h0, c0, None)
        if unbatched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _single_step(self, input: Tensor, hx):
        """forward() for one time step without autograd on the PyTorch loop (token-by-token
        generation under torch.no_grad / inference_mode), or None where that is not the case and
        forward() goes the general way.

        At batch 1 such a step costs what its Python and ATen calls cost: through the general way
        F-LSTM and G-LSTM at p = 64, n = 256 ran at 0.6-0.85x of torch.nn.LSTM's speed (~46 µs a
        token on one core of the Xeon). Here each layer is one call of ``_step_function``
        (:mod:`factorlm.ops._step`), with the checks that one step needs (input size, hx shapes)
        and none of the whole-sequence machinery (layout transposes, time reversal, the autograd
        Function, the scan's buffers): F-LSTM 1.1-1.2x, G-LSTM 1.0-1.1x of torch.nn.LSTM under
        AVX-512 and AVX2 (G-LSTM's two bmms, 4-5.5 µs each on transposed views, take 2.3-3.4 µs on
        the layout GLSTM stores). Same results as the general way, to rounding.
        """
        dim = input.dim()
        if dim == 3:
            if input.shape[1 if self.batch_first else 0] != 1:
                return None
            batch = input.shape[0 if self.batch_first else 1]
        elif dim == 2 and input.shape[0] == 1:
            batch = 1
        else:
            return None
        if (self.bidirectional or not ops.runs_torch_loop(input, self._impl, "extension" in self._implementations)
                or torch.compiler.is_compiling()
                or torch._C._are_functorch_transforms_active()):
            return None
        self._check_input_size(input)
        x = input.view(batch, -1) if input.is_contiguous() else input.reshape(batch, -1)
        h0, c0 = self._initial_state(hx, input, batch, unbatched=dim == 2)
        step, forget_bias, gates = self._step_function, self.forget_bias, self.num_gates
        if self.num_layers == 1:  # the usual case: no lists, no stacking (a few µs a token)
            x, c = step(x, _first(h0), _first(c0), *self.effective_parameters(0).values(), forget_bias, gates)
            # h_n is its own tensor, not a view of the output, as torch.nn.LSTM's; c_n may be a
            # view of c, returned nowhere else
            if dim == 2:  # unbatched: output (1, p), h_n (1, p), c_n (1, n)
                return x, (x.clone(), c)
            return x.unsqueeze(1 if self.batch_first else 0), (x.unsqueeze(0).clone(), c.unsqueeze(0))
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x, c = step(x, h0[layer], c0[layer], *self.effective_parameters(layer).values(), forget_bias, gates)
            hs.append(x)
            cs.append(c)
        if dim == 2:  # unbatched: output (1, p), h_n (L, p), c_n (L, n)
            return x, (torch.cat(hs), torch.cat(cs))
        return x.unsqueeze(1 if self.batch_first else 0), (torch.stack(hs), torch.stack(cs))

    def _packed_forward(self, packed: PackedSequence, hx):
        """A PackedSequence in, a PackedSequence out, as torch.nn.LSTM: h_0 is given, and h_n
        returned, in the batch's original order; the layers run on the sorted order."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise InputShapeError(f"{type(self).__name__}: a PackedSequence's data must be 2-D (rows, input_size), "
                                  f"got shape {tuple(data.shape)}")
        self._check_input_size(data)
        h0, c0 = self._initial_state(hx, data, int(batch_sizes[0]), unbatched=False)
        if hx is not None and sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        output, h_n, c_n = self._run_stack(data, h0, c0, batch_sizes)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    def _check_input_size(self, input: Tensor) -> None:
        if input.shape[-1] != self.input_size:
            raise InputShapeError(
                f"{type(self).__name__}: input.size(-1) must equal input_size={self.input_size}, got "
                f"{input.shape[-1]} (input shape {tuple(input.shape)})"
            )

    def _run_stack(self, x: Tensor, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None):
        """``_stack_forward``, which torch.compile traces for impl="reference" (plain per-step ops)
        and otherwise leaves out of the graph as a whole, running it as it is.

        The fast path's time loops cannot be traced (factorlm.ops._function.run_layer). The dense
        LSTM's torch.lstm could be, but Inductor then compiles the recurrence itself, step by step:
        a minute of compiling for a small layer at T = 20 on 2 cores (README). Dynamo
        keeps torch.nn.LSTM out of its graphs by default (``torch._dynamo.config.allow_rnn``), and
        this layer does the same. Why the whole stack and not each layer's call: a graph break inside
        the loop over layers and directions makes Dynamo compile the loop's remainder as a new frame
        whose loop counters are inputs, and once they vary it turns them into symbolic ints, which
        cannot name a parameter; what is left around the layers (dropout, a concatenation) gains
        nothing from compiling.
        """
        if self.impl == "reference" or not torch.compiler.is_compiling():
            # eager calls skip the disabled wrapper: it costs a few µs per call, felt at batch 1
            return self._stack_forward(x, h0, c0, batch_sizes)
        return self._stack_forward_outside_graph(x, h0, c0, batch_sizes)

    @torch.compiler.disable
    def _stack_forward_outside_graph(self, x, h0, c0, batch_sizes):
        return self._stack_forward(x, h0, c0, batch_sizes)

    def _stack_forward(self, x: Tensor, h0: Tensor, c0: Tensor,
                       batch_sizes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """All layers and directions. x: (T, B, p_in), or packed rows (N, p_in) with ``batch_sizes``
        (a PackedSequence's, sorted order); h0: (L·D, B, p), c0: (L·D, B, n).

        The reverse direction runs the per-direction code on the reversed sequence: x.flip(0) for
        a (T, B, ·) tensor (torch.nn.LSTM reverses padding too), and for a packed batch each
        sequence reversed within its own length, so that it starts at the sequence's last step.
        Those are copies of x and of the output, cheap beside the layer's GEMMs, and they let every
        impl and every cell type run one time direction only.
        """
        sizes = None if batch_sizes is None else tuple(batch_sizes.tolist())
        if self.num_layers == 1 and not self.bidirectional:  # the short way, a few µs a call fewer
            out, h, c = self._layer_forward(0, 0, x, h0[0], c0[0], sizes)
            return out, h.unsqueeze(0), c.unsqueeze(0)
        reverse = _time_reversal(sizes, x.device) if self.bidirectional else None
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                x_d = reverse(x) if direction else x
                out, h, c = self._layer_forward(layer, direction, x_d, h0[index], c0[index], sizes)
                outputs.append(reverse(out) if direction else out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return x, torch.stack(h_n), torch.stack(c_n)

    def _initial_state(self, hx, x: Tensor, batch: int, unbatched: bool) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) of shapes (L·D, B, p), (L·D, B, n): zeros for hx None, else hx checked."""
        L, p, n = self.num_layers * self.num_directions, self.output_size, self.hidden_size
        if hx is None:
            zeros = dict(dtype=x.dtype, device=x.device)
            return torch.zeros(L, batch, p, **zeros), torch.zeros(L, batch, n, **zeros)
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise InputShapeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        h0, c0 = hx
        expected_h = (L, p) if unbatched else (L, batch, p)
        expected_c = (L, n) if unbatched else (L, batch, n)
        for label, state, expected in (("h_0", h0, expected_h), ("c_0", c0, expected_c)):
            if not isinstance(state, Tensor) or state.shape != expected:
                got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                raise InputShapeError(f"{type(self).__name__}: expected {label} of shape {expected}, got {got}")
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return h0, c0

    # --------------------------------------------------------------- conversion
    @torch.no_grad()
    def to_lstm(self) -> nn.LSTM:
        """A torch.nn.LSTM computing the same function (F-LSTM: W = W2·W1; G-LSTM: block-diagonal W),
        both directions when bidirectional.

        The gate bias and forget_bias go into ``bias_ih_l{k}[_reverse]``; ``bias_hh_l{k}[_reverse]``
        is zero. A layer with coupled_gates has no torch.nn.LSTM equivalent: ValueError. Shared gates
        and a low-rank projection convert through their materialised weights (effective_parameters).
        """
        if self.coupled_gates:
            raise ValueError(
                f"{type(self).__name__}.to_lstm(): this layer has coupled_gates=True (f = 1 - i, 3 gate blocks), "
                f"which no torch.nn.LSTM computes (it has 4 independent gates); use the layer itself, or "
                f"dense_gate_weights() for its (3n, ·) gate matrices"
            )
        has_bias = self.bias or self.forget_bias != 0.0
        ref = next(self.parameters())
        lstm = nn.LSTM(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bias=has_bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
            device=ref.device,
            dtype=ref.dtype,
        )
        n = self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                weight_ih, weight_hh, bias = self.dense_gate_weights(layer, direction)
                target = {name: getattr(lstm, parameter_name(name, layer, direction), None)
                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
                target["weight_ih"].copy_(weight_ih)
                target["weight_hh"].copy_(weight_hh)
                if has_bias:
                    b = torch.zeros(4 * n, dtype=ref.dtype, device=ref.device) if bias is None else bias.clone()
                    b[n : 2 * n] += self.forget_bias
                    target["bias_ih"].copy_(b)
                    target["bias_hh"].zero_()
                if self.proj_size:
                    target["weight_hr"].copy_(self.effective_parameters(layer, direction)["weight_hr"])
        lstm.train(self.training)
        return lstm

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}", f"{self.hidden_size}"]
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                        forget_bias=0.0, coupled_gates=False, shared_gates=False, proj_rank=None)
        for key, default in defaults.items():
            value = getattr(self, key)
            if key == "proj_rank" and value is not None:
                value = value[0] if len(set(value)) == 1 else list(value)
            if value != default:
                parts.append(f"{key}={value}")
        parts.extend(self._extra_repr_parts())
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


def scale_gate_rows(scale: Tensor, weight: Tensor, layout: str) -> Tensor:
    """The G-gate form of a shared gate tensor: gate g's rows are s_g ⊙ the n rows of ``weight``.

    scale s (G, n); ``layout`` how ``weight`` holds its n rows (LSTMBase._shared_gate_layout):
        "rows"    (n, m...) -> (G·n, m...), gate-major (gate g's cell c at row g·n + c)
        "groups"  (k, n/k, m...) -> (k, G·n/k, m...), group j's rows [gate, cell]: G-LSTM's layout
        "vector"  (1, n) -> (G, n)
    """
    gates, n = scale.shape
    if layout == "rows":  # (G, n, 1...) * (n, m...) -> (G·n, m...)
        return (scale.view(gates, n, *(1,) * (weight.dim() - 1)) * weight).flatten(0, 1)
    if layout == "groups":  # (k, G, n/k, 1...) * (k, 1, n/k, m...) -> (k, G·n/k, m...)
        k = weight.shape[0]
        s = scale.view(gates, k, n // k).transpose(0, 1).reshape(k, gates, n // k, *(1,) * (weight.dim() - 2))
        return (s * weight.unsqueeze(1)).flatten(1, 2)
    if layout == "vector":
        return scale * weight
    raise ValueError(f"unknown shared-gate layout {layout!r}: expected 'rows', 'groups' or 'vector'")


def _first(state: Tensor) -> Tensor:
    """state[0] of an (L, B, ·) state with L = 1, as a view call (cheaper than select) where it can."""
    return state.view(state.shape[1], -1) if state.is_contiguous() else state[0]


def _time_reversal(batch_sizes: tuple[int, ...] | None, device):
    """The function that reverses time in a (T, B, ·) tensor (batch_sizes None), or in every
    sequence of packed rows (N, ·) within its own length; it is its own inverse."""
    if batch_sizes is None:
        return lambda t: t.flip(0)
    rows = ops.reversed_rows(batch_sizes, device)
    return lambda t: t.index_select(0, rows)


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
