"""Plain, readable reference implementations of the cells' gate maps and the LSTMP step: the test oracle.

Everything here is a direct transcription of the paper's equations, one time step at a
time, with autograd doing the backward pass. It is deliberately slow and obvious; the
fast paths in :mod:`factorlm.ops` are tested against it.

Notation (Kuchaiev & Ginsburg 2017, arXiv 1703.10722):
    n      cell size (``hidden_size``)
    p      output size of a layer: ``proj_size`` if > 0, else n
    p_in   input size of the layer
    G      gate blocks (``num_gates``): 4, or 3 with coupled input and forget gates
    gates  pre-activations in torch.nn.LSTM's order [i, f, g, o] (G = 4) or [i, g, o] (G = 3),
           each n wide

LSTMP step (Jozefowicz et al. 2016; torch.nn.LSTM with proj_size):
    [i f g o] = gates(x_t, h_{t-1})
    c_t = σ(f + forget_bias) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
    h_t = P · (σ(o) ⊙ tanh(c_t))          (P omitted when proj_size == 0)

CIFG step (coupled input and forget gates, Greff et al. 2017), G = 3:
    [i g o] = gates(x_t, h_{t-1});  ι = σ(i − forget_bias)
    c_t = (1 − ι) ⊙ c_{t-1} + ι ⊙ tanh(g)   (the forget gate is 1 − ι = σ(forget_bias − i))
    h_t = P · (σ(o) ⊙ tanh(c_t))
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

GateFn = Callable[[Tensor, Tensor], Tensor]


def dense_gates(x_t: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None) -> Tensor:
    """LSTM gate map W·[x; h] + b with W = [weight_ih, weight_hh].

    x_t: (B, p_in), h: (B, p), weight_ih: (4n, p_in), weight_hh: (4n, p), bias: (4n,) -> (B, 4n)
    """
    gates = x_t @ weight_ih.t() + h @ weight_hh.t()
    return gates if bias is None else gates + bias


def factorized_gates(x_t: Tensor, h: Tensor, weight_w1: Tensor, weight_w2: Tensor, bias: Tensor | None) -> Tensor:
    """F-LSTM gate map W2·(W1·[x; h]) + b.

    x_t: (B, p_in), h: (B, p), weight_w1: (r, p_in + p), weight_w2: (4n, r), bias: (4n,) -> (B, 4n)
    """
    gates = torch.cat([x_t, h], dim=1) @ weight_w1.t() @ weight_w2.t()
    return gates if bias is None else gates + bias


def grouped_gates(x_t: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None,
                  num_gates: int = 4) -> Tensor:
    """G-LSTM gate map: k independent small LSTM gate maps over slices of x and h.

    x_t: (B, p_in), h: (B, p), weight_ih: (k, G·n/k, p_in/k), weight_hh: (k, G·n/k, p/k),
    bias: (G·n,) -> (B, G·n), G = num_gates.

    Group j reads x_t[:, j·p_in/k : (j+1)·p_in/k] and h[:, j·p/k : (j+1)·p/k] and produces the
    pre-activations of cells j·n/k … (j+1)·n/k of every gate; within a group the G·n/k rows are
    ordered [i, f, g, o] like nn.LSTM's ([i, g, o] for G = 3).
    """
    k = weight_ih.shape[0]
    x_slices = x_t.chunk(k, dim=1)
    h_slices = h.chunk(k, dim=1)
    per_group = [
        torch.cat([x_slices[j], h_slices[j]], dim=1) @ torch.cat([weight_ih[j], weight_hh[j]], dim=1).t()
        for j in range(k)
    ]
    gates = _gate_major(per_group, num_gates)
    return gates if bias is None else gates + bias


def grouped_factorized_gates(x_t: Tensor, h: Tensor, weight_w1: Tensor, weight_w2: Tensor,
                             bias: Tensor | None, num_gates: int = 4) -> Tensor:
    """G∘F-LSTM gate map: G-LSTM's groups, each an F-LSTM gate map W2^(j)·(W1^(j)·[x^(j); h^(j)]).

    x_t: (B, p_in), h: (B, p), weight_w1: (k, r, (p_in + p)/k), weight_w2: (k, G·n/k, r),
    bias: (G·n,) -> (B, G·n), G = num_gates. Group j reads the same slices and writes the same
    cells as in :func:`grouped_gates`.
    """
    k = weight_w1.shape[0]
    x_slices = x_t.chunk(k, dim=1)
    h_slices = h.chunk(k, dim=1)
    per_group = [
        torch.cat([x_slices[j], h_slices[j]], dim=1) @ weight_w1[j].t() @ weight_w2[j].t() for j in range(k)
    ]
    gates = _gate_major(per_group, num_gates)
    return gates if bias is None else gates + bias


def _gate_major(per_group: list[Tensor], num_gates: int = 4) -> Tensor:
    """k groups' (B, G·n/k) pre-activations, each [i f g o] (G = 4) or [i g o] (G = 3) of its cells
    -> the layer's (B, G·n) in the same gate order, group j's cells at j·n/k … (j+1)·n/k of every gate."""
    k = len(per_group)
    batch, g_nk = per_group[0].shape
    n_per_group = g_nk // num_gates
    gates = torch.stack(per_group, dim=1)  # (B, k, G·n/k): group-major
    gates = gates.view(batch, k, num_gates, n_per_group).transpose(1, 2)  # (B, G, k, n/k): gate-major
    return gates.reshape(batch, num_gates * k * n_per_group)  # (B, G·n) in gate order, cell j·n/k + m


def lstmp_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    gates: GateFn,
    weight_hr: Tensor | None,
    forget_bias: float = 0.0,
    batch_sizes: Sequence[int] | None = None,
    num_gates: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one LSTMP layer over a sequence, one step at a time: the LSTMP step, or with
    ``num_gates=3`` the CIFG step (module doc).

    x: (T, B, p_in), h0: (B, p), c0: (B, n), gates(x_t, h) -> (B, G·n), weight_hr: (p, n) or None.
    Returns output (T, B, p), h_T (B, p), c_T (B, n).

    With ``batch_sizes`` (ints, non-increasing, as a PackedSequence's), x is a packed batch's rows
    (N, p_in): step t is the next ``batch_sizes[t]`` rows, the first sequences (sorted longest
    first). A sequence that has ended drops out of the batch, and its final h and c are those of
    its own last step. Returns output (N, p), h_T (B, p), c_T (B, n).
    """
    if batch_sizes is None:
        steps = x.unbind(0)
    else:
        steps = x.split(list(batch_sizes), dim=0)
    h, c = h0, c0
    outputs, ended_h, ended_c = [], [], []
    for x_t in steps:
        size = x_t.shape[0]
        if size < h.shape[0]:  # the last rows' sequences ended at the step before
            ended_h.append(h[size:])
            ended_c.append(c[size:])
            h, c = h[:size], c[:size]
        if num_gates == 3:
            i, g, o = gates(x_t, h).chunk(3, dim=1)
            input_gate = torch.sigmoid(i - forget_bias)
            c = (1 - input_gate) * c + input_gate * torch.tanh(g)
        else:
            i, f, g, o = gates(x_t, h).chunk(4, dim=1)
            c = torch.sigmoid(f + forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if weight_hr is not None:
            h = h @ weight_hr.t()
        outputs.append(h)
    # rows that ended later come first: reverse the order in which they were set aside
    h_n = torch.cat([h, *reversed(ended_h)])
    c_n = torch.cat([c, *reversed(ended_c)])
    return torch.cat(outputs) if batch_sizes is not None else torch.stack(outputs), h_n, c_n
