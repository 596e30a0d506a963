"""Convolutional LSTM (Shi et al. 2015) with factorized gate convolutions.

Each gate map is a k×k convolution over [x_t; h_{t-1}] (C_in + C_h channels) to the 4·C_h gate
pre-activations [i, f, g, o]:

    [a_i, a_f, a_g, a_o] = W * [x_t; h_{t-1}] + b          (* : 2-D convolution, padding k // 2)
    i = σ(a_i + w_ci ⊙ c_{t-1}),  f = σ(a_f + forget_bias + w_cf ⊙ c_{t-1}),  g = tanh(a_g)
    c_t = f ⊙ c_{t-1} + i ⊙ g,    o = σ(a_o + w_co ⊙ c_t),   h_t = o ⊙ tanh(c_t)

(the w_c terms only with ``peephole=True``). ``gates`` says how W is parameterized, the
convolutional analogues of the factorization tricks of arXiv:1703.10722; C = C_in + C_h:

    "dense"       W: (4C_h, C, k, k), one convolution                        4C_h·C·k² weights
    "separable"   depthwise k×k per channel (C, 1, k, k), then pointwise 1×1 (4C_h, C):
                  the composed kernel is W[o, c] = P[o, c]·D[c]                C·k² + 4C_h·C
    "grouped"     G channel groups (the G-LSTM analogue): group j's 4C_h/G gates (those of its
                  own cells j·C_h/G … (j+1)·C_h/G) come from its own slices of x and h only:
                  W is block-diagonal, stored (4C_h, C/G, k, k) group by group   4C_h·C·k²/G
    "bottleneck"  k×k to ``rank`` r channels, then 1×1 to the gates (the F-LSTM analogue):
                  W[o, c] = Σ_r W2[o, r]·W1[r, c]                             r·C·k² + 4C_h·r

One gate bias b (4C_h, only on the last map: a bias before a linear map is redundant) when
``bias=True``. Peepholes are **per channel**: w_c is (3, C_h), one weight per gate and channel,
broadcast over the image (Shi et al. use one per channel and pixel; per channel keeps the layer
independent of the image size). Every parameter is used in the forward; nothing is built that is
not called.

Shapes (L = num_layers, C_l = hidden_channels of layer l):
    input   (T, N, C_in, H, W), or (N, T, C_in, H, W) with batch_first
    output  (T, N, C_{L-1}, H, W) (or batch first): the last layer's h_t
    h_n/c_n (L, N, C_h, H, W) when every layer has the same hidden_channels, else a tuple of L
            tensors (N, C_l, H, W); h_0/c_0 in either form (the tuple form is always accepted)

Speed: the input side of every step (the part of the gate map over x_t) does not depend on the
state, so a layer computes it for all T frames in one batched convolution, and each step convolves
only h_{t-1}.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factorlm.errors import ConfigWarning, InputShapeError
from factorlm.nn.base import per_layer
from factorlm.validate import check_fraction, check_int

__all__ = ["ConvLSTM", "ConvLSTMCell", "GATES"]

GATES = ("dense", "separable", "grouped", "bottleneck")


def _odd_kernel(name: str, value) -> int:
    k = check_int(name, value)
    if k % 2 == 0:
        raise ValueError(f"{name} must be odd (padding k // 2 keeps the image size only for odd k), got {k}")
    return k


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: ``cell(x_t, (h, c)) -> (h', c')``; x_t (N, C_in, H, W), h, c (N, C_h, H, W)
    (hx None: zeros). Module docstring: the equations and the ``gates`` parameterizations.

    Parameters: dense ``weight`` (4C_h, C, k, k); separable ``weight_depthwise`` (C, 1, k, k) and
    ``weight_pointwise`` (4C_h, C); grouped ``weight`` (4C_h, C/G, k, k); bottleneck ``weight_w1``
    (r, C, k, k) and ``weight_w2`` (4C_h, r); ``bias`` (4C_h) in the order [i, f, g, o];
    ``weight_peephole`` (3, C_h) for [i, f, o]. C = C_in + C_h, input channels first.
    """

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, bias: bool = True, *,
                 gates: str = "dense", groups: int | None = None, rank: int | None = None, peephole: bool = False,
                 forget_bias: float = 1.0) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.hidden_channels = check_int("hidden_channels", hidden_channels)
        self.kernel_size = _odd_kernel("kernel_size", kernel_size)
        if gates not in GATES:
            raise ValueError(f"gates must be one of {', '.join(GATES)}, got {gates!r}")
        if groups is not None and gates != "grouped":
            raise ValueError(f"groups={groups!r} applies to gates='grouped' only, not gates={gates!r}")
        if rank is not None and gates != "bottleneck":
            raise ValueError(f"rank={rank!r} applies to gates='bottleneck' only, not gates={gates!r}")
        if not isinstance(forget_bias, numbers.Real) or isinstance(forget_bias, bool) or not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        self.gates, self.peephole, self.forget_bias = gates, bool(peephole), float(forget_bias)
        self.groups = self.rank = None
        c_in, c_h, k = self.in_channels, self.hidden_channels, self.kernel_size
        c, rows = c_in + c_h, 4 * c_h
        if gates == "dense":
            self.weight = nn.Parameter(torch.empty(rows, c, k, k))
        elif gates == "separable":
            self.weight_depthwise = nn.Parameter(torch.empty(c, 1, k, k))
            self.weight_pointwise = nn.Parameter(torch.empty(rows, c))
        elif gates == "grouped":
            if groups is None:
                raise ValueError("gates='grouped' needs groups (the number of channel groups)")
            g = check_int("groups", groups)
            if c_in % g or c_h % g:
                raise ValueError(f"groups={g} must divide in_channels {c_in} and hidden_channels {c_h}; "
                                 f"here {', '.join(str(d) for d in range(1, math.gcd(c_in, c_h) + 1) if math.gcd(c_in, c_h) % d == 0)}")
            self.groups = g
            self.weight = nn.Parameter(torch.empty(rows, c // g, k, k))
        else:
            if rank is None:
                raise ValueError("gates='bottleneck' needs rank (the channels between the k×k and the 1×1 map)")
            self.rank = check_int("rank", rank)
            if self.rank * (c * k * k + rows) >= rows * c * k * k:
                warnings.warn(f"bottleneck rank {self.rank} has {self.rank * (c * k * k + rows):,} gate weights, "
                              f"not fewer than the dense map's {rows * c * k * k:,}", ConfigWarning, stacklevel=2)
            self.weight_w1 = nn.Parameter(torch.empty(self.rank, c, k, k))
            self.weight_w2 = nn.Parameter(torch.empty(rows, self.rank))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.weight_peephole = nn.Parameter(torch.empty(3, c_h)) if self.peephole else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each map U(-1/√fan_in, 1/√fan_in) (fan_in of that map, as torch's convolutions); biases and
        peepholes U(-1/√(C·k²), ...) of the whole gate map's fan-in."""
        fan = (self.in_channels + self.hidden_channels) * self.kernel_size ** 2
        for name, p in self.named_parameters():
            if name in ("bias", "weight_peephole"):
                bound = 1 / math.sqrt(fan)
            elif p.dim() == 2:  # a 1×1 map: fan-in its columns
                bound = 1 / math.sqrt(p.shape[1])
            else:
                bound = 1 / math.sqrt(p[0].numel())
            with torch.no_grad():
                p.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
        if self.gates != "dense":
            text += f", gates={self.gates!r}"
        if self.groups is not None:
            text += f", groups={self.groups}"
        if self.rank is not None:
            text += f", rank={self.rank}"
        if self.bias is None:
            text += ", bias=False"
        if self.peephole:
            text += ", peephole=True"
        if self.forget_bias != 1.0:
            text += f", forget_bias={self.forget_bias:g}"
        return text

    # ------------------------------------------------------------ the gate map
    def _conv(self, z: Tensor, part: str) -> Tensor:
        """The gate map's part over x (part "x": z has C_in channels) or over h ("h": C_h channels),
        without the bias. Both parts summed are the map over [x; h] (it is linear). For "grouped" the
        result is group-major, (N, G·4·C_h/G, H, W); :meth:`_split` reads it."""
        cin, pad = self.in_channels, self.kernel_size // 2
        cols = slice(0, cin) if part == "x" else slice(cin, None)
        if self.gates == "dense":
            return F.conv2d(z, self.weight[:, cols], padding=pad)
        if self.gates == "separable":
            depth = self.weight_depthwise[cols]
            z = F.conv2d(z, depth, padding=pad, groups=depth.shape[0])
            return F.conv2d(z, self.weight_pointwise[:, cols, None, None])
        if self.gates == "grouped":
            g = self.groups
            per = cin // g
            cols = slice(0, per) if part == "x" else slice(per, None)
            return F.conv2d(z, self.weight[:, cols], padding=pad, groups=g)
        z = F.conv2d(z, self.weight_w1[:, cols], padding=pad)
        return z  # bottleneck: the r channels; W2 is applied to the sum of both parts (see step)

    def input_map(self, x: Tensor) -> Tensor:
        """The state-independent part of the gate map, for any number of frames at once: x (M, C_in, H, W)
        -> (M, 4C_h, H, W) (bottleneck: (M, r, H, W), before W2)."""
        return self._conv(x, "x")

    def _split(self, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gate pre-activations a (N, 4C_h, H, W) -> a_i, a_f, a_g, a_o, each (N, C_h, H, W)."""
        if self.gates != "grouped":
            return a.chunk(4, dim=1)
        n, _, height, width = a.shape
        a = a.view(n, self.groups, 4, self.hidden_channels // self.groups, height, width)  # group-major
        return tuple(a[:, :, j].reshape(n, self.hidden_channels, height, width) for j in range(4))

    def _bias(self) -> Tensor | None:
        """The bias in the layout of the gate map's output ([i, f, g, o] gate-major; grouped: group-major)."""
        if self.bias is None or self.gates != "grouped":
            return self.bias
        g = self.groups
        return self.bias.view(4, g, -1).transpose(0, 1).reshape(-1)

    def step(self, xa: Tensor, hx: tuple[Tensor, Tensor], bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step from the input side ``xa`` (one frame of :meth:`input_map`) and the state (h, c).
        ``bias``: :meth:`_bias` (a layer reads it once per sequence)."""
        h, c = hx
        a = xa + self._conv(h, "h")
        if self.gates == "bottleneck":
            a = F.conv2d(a, self.weight_w2[:, :, None, None])
        if bias is not None:
            a = a + bias[:, None, None]
        a_i, a_f, a_g, a_o = self._split(a)
        a_f = a_f + self.forget_bias
        if self.peephole:
            w = self.weight_peephole[:, :, None, None]
            a_i, a_f = a_i + w[0] * c, a_f + w[1] * c
        c = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
        if self.peephole:
            a_o = a_o + w[2] * c
        return torch.sigmoid(a_o) * torch.tanh(c), c

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (N, C_in, H, W), hx (h, c) each (N, C_h, H, W) or None -> (h', c')."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputShapeError(f"ConvLSTMCell expects x of shape (N, {self.in_channels}, H, W), "
                                  f"got {tuple(x.shape)}")
        expected = (x.shape[0], self.hidden_channels, *x.shape[2:])
        if hx is None:
            zeros = x.new_zeros(expected)
            hx = (zeros, zeros)
        for name, t in zip(("h", "c"), hx):
            if tuple(t.shape) != expected:
                raise InputShapeError(f"ConvLSTMCell {name} must have shape {expected}, got {tuple(t.shape)}")
        return self.step(self.input_map(x), hx, self._bias())

    # ------------------------------------------------------------------ counts
    def gate_weights(self) -> int:
        """The gate map's weights (without bias and peepholes)."""
        c, rows, k2 = self.in_channels + self.hidden_channels, 4 * self.hidden_channels, self.kernel_size ** 2
        if self.gates == "dense":
            return rows * c * k2
        if self.gates == "separable":
            return c * k2 + rows * c
        if self.gates == "grouped":
            return rows * c * k2 // self.groups
        return self.rank * (c * k2 + rows)

    def num_parameters(self) -> int:
        """Exact parameter count, from the formulas (a test checks it against the real tensors)."""
        return (self.gate_weights() + (4 * self.hidden_channels if self.bias is not None else 0)
                + (3 * self.hidden_channels if self.peephole else 0))

    def macs_per_frame(self, height: int, width: int) -> int:
        """Multiply-adds of one step on an H×W frame: the gate convolutions (padding counted as if it
        were data: zero-padded taps are still computed) and the peephole products; the rest of the
        element-wise gate math is not counted (as factorlm count does for the LSTM layers)."""
        pixels = check_int("height", height) * check_int("width", width)
        return pixels * (self.gate_weights() + (3 * self.hidden_channels if self.peephole else 0))


class ConvLSTM(nn.Module):
    """A stack of ConvLSTM layers with the torch.nn.LSTM calling convention (module docstring).

    hidden_channels, kernel_size, groups, rank: one int for every layer, or one per layer. Layer l's
    cell is ``self.cells[l]`` (a :class:`ConvLSTMCell`; layer l > 0 reads layer l-1's h). dropout:
    applied to every layer's output but the last, in training, as torch.nn.LSTM does.
    """

    def __init__(self, in_channels: int, hidden_channels: int | Sequence[int], kernel_size: int | Sequence[int],
                 num_layers: int = 1, bias: bool = True, batch_first: bool = False, dropout: float = 0.0, *,
                 gates: str = "dense", groups: int | Sequence[int] | None = None,
                 rank: int | Sequence[int] | None = None, peephole: bool = False, forget_bias: float = 1.0) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.num_layers = check_int("num_layers", num_layers)
        self.hidden_channels = per_layer("hidden_channels", hidden_channels, self.num_layers)
        kernels = per_layer("kernel_size", kernel_size, self.num_layers)
        self.kernel_size = tuple(_odd_kernel(f"kernel_size[{i}]" if len(set(kernels)) > 1 else "kernel_size", k)
                                 for i, k in enumerate(kernels))
        groups_l = per_layer("groups", groups, self.num_layers) if groups is not None else (None,) * self.num_layers
        rank_l = per_layer("rank", rank, self.num_layers) if rank is not None else (None,) * self.num_layers
        self.dropout = check_fraction("dropout", dropout, include_one=True)
        self.batch_first, self.gates = bool(batch_first), gates
        cells = []
        for layer in range(self.num_layers):
            c_in = self.in_channels if layer == 0 else self.hidden_channels[layer - 1]
            try:
                cells.append(ConvLSTMCell(c_in, self.hidden_channels[layer], self.kernel_size[layer], bias,
                                          gates=gates, groups=groups_l[layer], rank=rank_l[layer],
                                          peephole=peephole, forget_bias=forget_bias))
            except ValueError as exc:
                raise ValueError(f"ConvLSTM layer {layer}: {exc}" if self.num_layers > 1 else str(exc)) from None
        self.cells = nn.ModuleList(cells)

    def extra_repr(self) -> str:
        one = lambda v: v[0] if len(set(v)) == 1 else list(v)  # noqa: E731
        text = f"{self.in_channels}, {one(self.hidden_channels)}, kernel_size={one(self.kernel_size)}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout:g}"
        return text

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same hidden_channels (then h_n, c_n are stacked tensors)."""
        return len(set(self.hidden_channels)) == 1

    def num_parameters(self) -> int:
        return sum(cell.num_parameters() for cell in self.cells)

    def macs_per_frame(self, height: int, width: int) -> int:
        """Multiply-adds per frame of every layer (ConvLSTMCell.macs_per_frame)."""
        return sum(cell.macs_per_frame(height, width) for cell in self.cells)

    def _initial_state(self, hx, n: int, height: int, width: int, like: Tensor) -> list[tuple[Tensor, Tensor]]:
        shapes = [(n, c, height, width) for c in self.hidden_channels]
        if hx is None:
            return [(like.new_zeros(s), like.new_zeros(s)) for s in shapes]
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise InputShapeError("hx must be a pair (h_0, c_0)")
        layers = []
        for name, t in zip(("h_0", "c_0"), hx):
            if isinstance(t, Tensor):
                if not self.uniform:
                    raise InputShapeError(f"{name} must be a tuple of {self.num_layers} tensors (one per layer: the "
                                          f"layers have different hidden_channels {list(self.hidden_channels)})")
                expected = (self.num_layers, *shapes[0])
                if tuple(t.shape) != expected:
                    raise InputShapeError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
                layers.append(list(t.unbind(0)))
            else:
                if len(t) != self.num_layers:
                    raise InputShapeError(f"{name} has {len(t)} tensors, expected one per layer ({self.num_layers})")
                for layer, (u, s) in enumerate(zip(t, shapes)):
                    if tuple(u.shape) != s:
                        raise InputShapeError(f"{name}[{layer}] must have shape {s}, got {tuple(u.shape)}")
                layers.append(list(t))
        return list(zip(*layers))

    def forward(self, input: Tensor, hx=None):
        """input (T, N, C_in, H, W) (batch_first: (N, T, ...)), hx (h_0, c_0) or None ->
        output (T, N, C_{L-1}, H, W), (h_n, c_n) (shapes: module docstring)."""
        if not isinstance(input, Tensor) or input.dim() != 5:
            shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise InputShapeError(f"ConvLSTM expects a 5-D input ({'N, T' if self.batch_first else 'T, N'}, C, H, W), "
                                  f"got {shape}")
        x = input.transpose(0, 1) if self.batch_first else input
        steps, n, c, height, width = x.shape
        if c != self.in_channels:
            raise InputShapeError(f"ConvLSTM expects {self.in_channels} input channels, got {c} "
                                  f"(input shape {tuple(input.shape)})")
        state = self._initial_state(hx, n, height, width, x)
        h_n, c_n = [], []
        for layer, cell in enumerate(self.cells):
            h, c_state = state[layer]
            xa = cell.input_map(x.reshape(steps * n, *x.shape[2:]))  # every frame at once
            xa = xa.view(steps, n, *xa.shape[1:])
            bias = cell._bias()
            outputs = []
            for t in range(steps):
                h, c_state = cell.step(xa[t], (h, c_state), bias)
                outputs.append(h)
            x = torch.stack(outputs) if outputs else x.new_zeros(0, n, cell.hidden_channels, height, width)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
            h_n.append(h)
            c_n.append(c_state)
        output = x.transpose(0, 1) if self.batch_first else x
        if self.uniform:
            return output, (torch.stack(h_n), torch.stack(c_n))
        return output, (tuple(h_n), tuple(c_n))
