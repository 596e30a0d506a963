"""int8 and fake-quantized twins of every factorlm recurrent layer type.

A layer's gate map is broken into the products it is made of ("pieces", by short name), each a
weight matrix (or k group matrices) that one product reads; the rest is element-wise:

    kind          cells                      pieces (float shapes)                         input side (all T at once)
    dense         LSTM, any dense-equivalent  weight_ih (G·n, p_in), weight_hh (G·n, p)        W_ih·x
    circulant     CirculantLSTM              weight_ih (G·n/b, p_in/b, b), weight_hh (...)     W_ih·x (the dense int8 W)
    factorized    FLSTM                      weight_w1_x (r, p_in), weight_w1_h (r, p),        W1_x·x
                                             weight_w2 (G·n, r)
    grouped       GLSTM                      weight_ih (k, G·n/k, p_in/k), weight_hh (k, G·n/k, p/k)   W_ih^(j)·x^(j)
    grouped_factorized GFLSTM                weight_w1_x (k, r, p_in/k), weight_w1_h (k, r, p/k),
                                             weight_w2 (k, G·n/k, r)                          W1_x^(j)·x^(j)
    diagonal      DiagonalLSTM               weight_ih (G·n, p_in); u = weight_hh (G, n) stays float

plus ``weight_hr`` (p, n), the projection, and the float bias (G·n). A layer with shared gates or a
factored projection (``shared_gates``, ``proj_rank``) is quantized in the form its maths runs
(``effective_parameters``: the G-gate weights diag(s_g)·W and W_hr = P2·P1), G·n rows and p × n. Every matrix is quantized per
output channel (row; per group and row for k groups), every activation a product reads per row
(per token; per token and group for grouped products), dynamically (factorlm.quant.int8). The
gate pre-activations, the cell state c and the element-wise LSTM math stay float32: c sums over
all time and the gates' sigmoids are steep where int8 steps would be coarse. F-LSTM's W1 is two
pieces because its two halves read two activations (x_t once for all steps, h_{t-1} per step).

A circulant layer keeps its compact (G·n/b, p_in/b, b) first columns in int8: every row of a
block row holds the same b·S values, so the dense matrix's per-row scale is the block row's, and
its dense int8 matrix (built once, not stored) is exactly the dense matrix quantized per row.

:func:`run_layer` runs one layer with pieces that are either float tensors (fake quantization:
quantization-aware training, autograd through straight-through rounding) or :class:`QWeight`
(real int8), the same rounding either way: a QAT model's forward is its int8 model's.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factorlm.nn.base import LSTMBase
from factorlm.nn.circulant import CirculantLSTM
from factorlm.nn.diagonal import DiagonalLSTM
from factorlm.nn.flstm import FLSTM
from factorlm.nn.gflstm import GFLSTM
from factorlm.nn.glstm import GLSTM
from factorlm.ops import circulant
from factorlm.quant import int8
from factorlm.quant.fake import fake_quantize_rows

KINDS = ("dense", "circulant", "factorized", "grouped", "grouped_factorized", "diagonal")
#: the piece each kind applies to x_t (over all T at once); the others read h_{t-1} or a step's value
INPUT_PIECE = {"dense": "weight_ih", "circulant": "weight_ih", "diagonal": "weight_ih", "grouped": "weight_ih",
               "factorized": "weight_w1_x", "grouped_factorized": "weight_w1_x"}


class QWeight(NamedTuple):
    """An int8 weight: q (..., N, K) int8 and its per-row scale (..., N) float32."""

    q: Tensor
    scale: Tensor


# ---------------------------------------------------------------- the pieces
def layer_kind(module: LSTMBase) -> str:
    """Which of KINDS a layer module's gate map is (any other registered cell, and a C-LSTM with
    shared gates: "dense", through its ``dense_gate_weights``)."""
    if isinstance(module, CirculantLSTM) and module.shared_gates:  # its scaled blocks are no longer circulant
        return "dense"
    for cls, kind in ((FLSTM, "factorized"), (GFLSTM, "grouped_factorized"), (GLSTM, "grouped"),
                      (DiagonalLSTM, "diagonal"), (CirculantLSTM, "circulant")):
        if isinstance(module, cls):
            return kind
    return "dense"


def float_pieces(module: LSTMBase, layer: int) -> dict[str, Tensor | None]:
    """Layer ``layer``'s (forward direction) pieces as float tensors: views of the parameters, so
    that gradients reach them (module doc). Keys: the kind's pieces, ``u`` (diagonal), ``bias``,
    ``weight_hr`` (None where absent)."""
    # the G-gate weights and the dense W_hr the cell's maths runs (shared gates and a factored
    # projection materialised once here): quantized as they are computed with
    w = module.effective_parameters(layer, 0)
    kind = layer_kind(module)
    pieces: dict[str, Tensor | None] = {}
    if kind in ("dense",):
        weight_ih, weight_hh, _ = module.dense_gate_weights(layer, 0)
        pieces.update(weight_ih=weight_ih, weight_hh=weight_hh)
    elif kind in ("circulant", "grouped"):
        pieces.update(weight_ih=w["weight_ih"], weight_hh=w["weight_hh"])
    elif kind == "diagonal":
        pieces.update(weight_ih=w["weight_ih"], u=w["weight_hh"])
    elif kind == "factorized":
        p_in = module.layer_input_size(layer)
        pieces.update(weight_w1_x=w["weight_w1"][:, :p_in], weight_w1_h=w["weight_w1"][:, p_in:],
                      weight_w2=w["weight_w2"])
    else:  # grouped_factorized: each group's columns are [x^(j); h^(j)]
        pk_in = module.layer_input_size(layer) // module.groups[layer]
        pieces.update(weight_w1_x=w["weight_w1"][:, :, :pk_in], weight_w1_h=w["weight_w1"][:, :, pk_in:],
                      weight_w2=w["weight_w2"])
    pieces.update(bias=w["bias"], weight_hr=w["weight_hr"])
    return pieces


def quantize_piece(kind: str, name: str, weight: Tensor) -> QWeight:
    """One float piece -> its int8 form (per output row; circulant: per block row, kept compact)."""
    weight = weight.detach().float()
    if kind == "circulant" and name in ("weight_ih", "weight_hh"):
        rows, cols, b = weight.shape
        q, scale = int8.quantize_rows(weight.reshape(rows, cols * b))
        return QWeight(q.view(rows, cols, b), scale)
    return QWeight(*int8.quantize_rows(weight.contiguous()))


def dense_circulant(weight: QWeight) -> QWeight:
    """A compact circulant int8 piece (R, S, b) -> the dense int8 (R·b, S·b) matrix and its per-row scale."""
    b = weight.q.shape[2]
    return QWeight(circulant.dense_matrix(weight.q).contiguous(), weight.scale.repeat_interleave(b))


# -------------------------------------------------------------- the products
def linear(x: Tensor, weight: Tensor | QWeight) -> Tensor:
    """x (M, K) · weightᵀ -> (M, N): int8 for a QWeight; for a float weight (already on its int8
    grid: :func:`fake_quantize_pieces`, once per forward rather than once per step), x is
    fake-quantized per row and the product taken in float."""
    if isinstance(weight, QWeight):
        return int8.int8_linear(x, weight.q, weight.scale)
    return F.linear(fake_quantize_rows(x), weight)


def grouped_linear(x: Tensor, weight: Tensor | QWeight) -> Tensor:
    """k group products: x (M, k·K), weight (k, N, K) -> (M, k, N) (group j reads x's j-th slice);
    a float weight as in :func:`linear`."""
    if isinstance(weight, QWeight):
        return int8.int8_grouped_linear(x, weight.q, weight.scale)
    k, _, cols = weight.shape
    x_q = fake_quantize_rows(x.reshape(x.shape[0], k, cols))  # (M, k, K)
    return torch.einsum("mkc,knc->mkn", x_q, weight)


def fake_quantize_pieces(pieces: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    """Float pieces with every weight matrix on its int8 grid (per row; per group and row), the
    bias, u and absent pieces unchanged: what :func:`run_layer` reads for fake quantization."""
    return {name: value if value is None or name in ("bias", "u") else fake_quantize_rows(value)
            for name, value in pieces.items()}


def _gate_major(gates: Tensor, num_gates: int) -> Tensor:
    """(B, k, G·n/k) group-major pre-activations -> (B, G·n) in gate order (factorlm.nn.reference._gate_major)."""
    batch, k, rows = gates.shape
    return gates.view(batch, k, num_gates, rows // num_gates).transpose(1, 2).reshape(batch, k * rows)


# ------------------------------------------------------------------ the layer
def run_layer(kind: str, pieces: dict, x: Tensor, h0: Tensor, c0: Tensor, forget_bias: float, num_gates: int,
              input_linear: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer over a sequence, the products quantized: x (T, B, p_in), h0 (B, p), c0 (B, n)
    -> output (T, B, p), h_T, c_T, the LSTMP (or with num_gates 3 the CIFG) step of
    factorlm.nn.reference, and the diagonal layer's recurrence for kind "diagonal".

    ``pieces``: float tensors (fake quantization: the weights already fake-quantized, see
    :func:`fake_quantize_pieces`) or QWeight (int8), see the module doc;
    ``input_linear``: what computes the input side (T·B, p_in) -> (T·B, ·) instead of
    :func:`linear` (the torchao backend's module), for the non-grouped kinds.
    """
    steps, batch, _ = x.shape
    flat = x.reshape(steps * batch, -1)
    grouped = kind in ("grouped", "grouped_factorized")
    first = pieces[INPUT_PIECE[kind]]
    if input_linear is not None and not grouped:
        pre = input_linear(flat)
    else:
        pre = grouped_linear(flat, first) if grouped else linear(flat, first)
    pre = pre.view(steps, batch, *pre.shape[1:])  # (T, B, ·) or (T, B, k, ·)
    bias, weight_hr, u = pieces["bias"], pieces["weight_hr"], pieces.get("u")
    h, c = h0, c0
    outputs = []
    for t in range(steps):
        if kind in ("dense", "circulant"):
            gates = pre[t] + linear(h, pieces["weight_hh"])
        elif kind == "diagonal":
            s = h if weight_hr is None else torch.tanh(c)  # factorlm.nn.diagonal: tanh(c) with a projection
            gates = pre[t] + (u.unsqueeze(0) * s.unsqueeze(1)).flatten(1)
        elif kind == "factorized":
            gates = linear(pre[t] + linear(h, pieces["weight_w1_h"]), pieces["weight_w2"])
        elif kind == "grouped":
            gates = _gate_major(pre[t] + grouped_linear(h, pieces["weight_hh"]), num_gates)
        else:  # grouped_factorized: z^(j) = W1_x^(j)·x^(j) + W1_h^(j)·h^(j), then W2^(j)·z^(j)
            z = pre[t] + grouped_linear(h, pieces["weight_w1_h"])  # (B, k, r)
            gates = _gate_major(grouped_linear(z.reshape(batch, -1), pieces["weight_w2"]), num_gates)
        if bias is not None:
            gates = gates + bias
        if num_gates == 3:
            i, g, o = gates.chunk(3, dim=1)
            input_gate = torch.sigmoid(i - forget_bias)
            c = (1 - input_gate) * c + input_gate * torch.tanh(g)
        else:
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f + forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if weight_hr is not None:
            h = linear(h, weight_hr)
        outputs.append(h)
    return torch.stack(outputs), h, c


def check_supported(module: LSTMBase) -> None:
    """NotImplementedError for the options the quantized layers do not run: bidirectional and
    batch_first layers (the language model uses neither)."""
    for option in ("bidirectional", "batch_first"):
        if getattr(module, option):
            raise NotImplementedError(f"int8 / quantization-aware {type(module).__name__}: {option}=True is not "
                                      f"supported (the language model's layers are unidirectional, time-major)")


def run_stack(module, kind: str, layer_pieces: Callable[[int], dict], input: Tensor, hx,
              input_linear: Callable[[int], Callable | None] = lambda layer: None):
    """All layers of a stack, torch.nn.LSTM's contract for a time-major input: input (T, B, p_in),
    hx (h_0 (L, B, p), c_0 (L, B, n)) or None for zeros -> output (T, B, p), (h_n, c_n); dropout
    between layers while training, as LSTMBase. ``module`` has num_layers, hidden_size, proj_size,
    forget_bias, num_gates, dropout, training."""
    name = getattr(module, "cell_name", type(module).__name__)
    if not isinstance(input, Tensor) or input.dim() != 3:
        got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise NotImplementedError(f"int8 / quantization-aware {name}: expects a (T, B, input_size) tensor, got {got}")
    if input.shape[-1] != module.input_size:
        raise ValueError(f"int8 / quantization-aware {name}: input.size(-1) must equal input_size="
                         f"{module.input_size}, got {input.shape[-1]}")
    if hx is None:
        shape = (module.num_layers, input.shape[1])
        h0 = input.new_zeros(*shape, module.proj_size or module.hidden_size)
        c0 = input.new_zeros(*shape, module.hidden_size)
    else:
        h0, c0 = hx
    x, hs, cs = input, [], []
    for layer in range(module.num_layers):
        if layer > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        x, h, c = run_layer(kind, layer_pieces(layer), x, h0[layer], c0[layer], module.forget_bias,
                            module.num_gates, input_linear(layer))
        hs.append(h)
        cs.append(c)
    return x, (torch.stack(hs), torch.stack(cs))


class QuantizedLSTM(nn.Module):
    """The int8 twin of one factorlm recurrent module (every layer of it): built by
    :meth:`from_float`, called as the float module, ``(input (T, B, p_in), (h_0, c_0)) ->
    (output, (h_n, c_n))``. Inference only (no gradient flows to int8 weights).

    State dict: per layer l and piece, ``{piece}_l{l}_int8`` and ``{piece}_l{l}_scale``; the float
    ``bias_l{l}`` and, for the diagonal layer, ``weight_hh_l{l}`` (u).

    ``backend``: "native" (every product through factorlm.quant.int8) or "torchao" (the input side's
    products over all T, for the non-grouped kinds, through a torchao-quantized nn.Linear).
    """

    def __init__(self, module: LSTMBase, backend: str = "native") -> None:
        super().__init__()
        check_supported(module)
        self.cell_name = type(module).__name__
        self.kind = layer_kind(module)
        self.num_layers, self.num_gates = module.num_layers, module.num_gates
        self.input_size, self.hidden_size, self.proj_size = module.input_size, module.hidden_size, module.proj_size
        self.forget_bias, self.dropout = module.forget_bias, module.dropout
        self.backend = backend
        self._names: list[list[str]] = []
        for layer in range(self.num_layers):
            names = []
            for name, value in float_pieces(module, layer).items():
                if value is None:
                    continue
                if name in ("bias", "u"):
                    attr = f"bias_l{layer}" if name == "bias" else f"weight_hh_l{layer}"
                    self.register_buffer(attr, value.detach().float().clone())
                    continue
                weight = quantize_piece(self.kind, name, value)
                self.register_buffer(f"{name}_l{layer}_int8", weight.q)
                self.register_buffer(f"{name}_l{layer}_scale", weight.scale)
                names.append(name)
            self._names.append(names)
        self._cache: dict = {}

    @classmethod
    def from_float(cls, module: LSTMBase, backend: str = "native") -> "QuantizedLSTM":
        return cls(module, backend)

    # the runtime forms (dense circulant matrices, torchao modules) are built from the buffers on
    # first use and dropped whenever the buffers change
    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def pieces(self, layer: int) -> dict:
        """Layer ``layer``'s pieces as QWeight (circulant: the dense int8 form), bias, u, weight_hr."""
        key = ("pieces", layer)
        if key not in self._cache:
            pieces = {}
            for name in self._names[layer]:
                weight = QWeight(getattr(self, f"{name}_l{layer}_int8"), getattr(self, f"{name}_l{layer}_scale"))
                pieces[name] = dense_circulant(weight) if self.kind == "circulant" and name != "weight_hr" else weight
            pieces.setdefault("weight_hr", None)
            pieces["bias"] = getattr(self, f"bias_l{layer}", None)
            pieces["u"] = getattr(self, f"weight_hh_l{layer}", None) if self.kind == "diagonal" else None
            self._cache[key] = pieces
        return self._cache[key]

    def input_linear(self, layer: int):
        """The torchao module computing layer ``layer``'s input side (backend "torchao"), else None."""
        if self.backend != "torchao" or self.kind in ("grouped", "grouped_factorized"):
            return None
        key = ("torchao", layer)
        if key not in self._cache:
            from factorlm.quant import _torchao

            weight = self.pieces(layer)[INPUT_PIECE[self.kind]]
            self._cache[key] = _torchao.quantized_linear(int8.dequantize_rows(weight.q, weight.scale), None)
        return self._cache[key]

    @torch.no_grad()
    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor]):
        return run_stack(self, self.kind, self.pieces, input, hx, self.input_linear)

    def extra_repr(self) -> str:
        return (f"{self.cell_name}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"proj_size={self.proj_size}, kind={self.kind!r}, backend={self.backend!r}")
