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

    A subclass (a new cell type) implements ``_layer_parameter_shapes(layer)``,
    ``_gate_fn(layer, weights)``, ``_dense_gate_weights(layer, weights)`` and
    ``_layer_gate_macs(layer)``, where ``weights`` is one direction's ``layer_parameters``: it never
    sees directions, packing or batch order, and gets all of them from this class. Every gate
    tensor it makes has ``num_gates``·n gate rows (in the order [i, f, g, o], or [i, g, o] when
    coupled), and its ``_layer_function`` / ``_step_function``, if any, take ``num_gates``.
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
        state.setdefault("coupled_gates", False)  # pickled before the option existed
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
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                shapes = dict(self._layer_parameter_shapes(layer))
                if self.bias:
                    shapes["bias"] = (self.num_gates * self.hidden_size,)
                if self.proj_size:
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
            shorts = [*self._layer_parameter_shapes(layer), "bias", "weight_hr"]
            names = cache[(layer, direction)] = tuple((s, parameter_name(s, layer, direction)) for s in shorts)
        return names

    def reset_parameters(self) -> None:
        """U(-1/√n, 1/√n) for every tensor, as torch.nn.LSTM (subclasses may refine)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    # ---------------------------------------------------------------- the maths
    def _gate_fn(self, layer: int, weights: dict[str, Tensor | None]):
        """A function (x_t (B, p_in), h (B, p)) -> gate pre-activations (B, G·n), computed with
        ``weights`` (one direction's ``layer_parameters(layer, direction)``)."""
        raise NotImplementedError

    def _dense_gate_weights(self, layer: int, weights: dict[str, Tensor | None]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The dense (weight_ih (G·n, p_in), weight_hh (G·n, p), bias (G·n,) or None) that ``weights``
        (one direction's ``layer_parameters``) equal; G = ``num_gates``."""
        raise NotImplementedError

    def dense_gate_weights(self, layer: int, direction: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
        """The dense (weight_ih (G·n, p_in), weight_hh (G·n, p), bias (G·n,) or None) this layer's
        ``direction`` (0 forward, 1 reverse) equals; G = ``num_gates``."""
        return self._dense_gate_weights(layer, self.layer_parameters(layer, direction))

    def macs_per_token(self) -> int:
        """Forward multiply-adds per token (one time step of one sequence), all layers and directions.

        Counts the gate map and the projection; the O(n) pointwise gate math is left out.
        """
        per_direction = sum(
            self._layer_gate_macs(layer) + self.proj_size * self.hidden_size for layer in range(self.num_layers)
        )
        return per_direction * self.num_directions

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
        weights = self.layer_parameters(layer, direction)
        if self.impl == "reference" or self._layer_function is None:
            gates = self._gate_fn(layer, weights)
            return reference.lstmp_layer(x, h0, c0, gates, weights["weight_hr"], self.forget_bias, batch_sizes,
                                         num_gates=self.num_gates)
        return self._layer_function(x, h0, c0, *weights.values(), self.forget_bias, impl=self.impl,
                                    batch_sizes=batch_sizes, num_gates=self.num_gates)

    #: the factorlm.ops function running one layer over a whole sequence with a hand-written
    #: backward, called as (x, h0, c0, *layer_parameters(layer, direction).values(), forget_bias,
    #: impl=..., batch_sizes=..., num_gates=...), i.e. the two gate weights, bias, weight_hr; None
    #: where the class has no such function (then every impl runs the reference)
    _layer_function = None

    #: the factorlm.ops function running one step of one layer without autograd on the PyTorch
    #: loop, called as (x_t (B, p_in), h0 (B, p), c0 (B, n), *layer_parameters(layer).values(),
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
            x, c = step(x, _first(h0), _first(c0), *self.layer_parameters(0).values(), forget_bias, gates)
            # h_n is its own tensor, not a view of the output, as torch.nn.LSTM's; c_n may be a
            # view of c, returned nowhere else
            if dim == 2:  # unbatched: output (1, p), h_n (1, p), c_n (1, n)
                return x, (x.clone(), c)
            return x.unsqueeze(1 if self.batch_first else 0), (x.unsqueeze(0).clone(), c.unsqueeze(0))
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            x, c = step(x, h0[layer], c0[layer], *self.layer_parameters(layer).values(), forget_bias, gates)
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
        is zero. A layer with coupled_gates has no torch.nn.LSTM equivalent: ValueError.
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
                    target["weight_hr"].copy_(self.layer_parameters(layer, direction)["weight_hr"])
        lstm.train(self.training)
        return lstm

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}", f"{self.hidden_size}"]
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False, proj_size=0,
                        forget_bias=0.0, coupled_gates=False)
        for key, default in defaults.items():
            value = getattr(self, key)
            if value != default:
                parts.append(f"{key}={value}")
        parts.extend(self._extra_repr_parts())
        return ", ".join(parts)

    def _extra_repr_parts(self) -> list[str]:
        return []


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
