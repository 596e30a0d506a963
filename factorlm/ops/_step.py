"""One time step of an F-LSTM / G-LSTM / G∘F-LSTM layer in plain PyTorch, without autograd: the
PyTorch loop's path for token-by-token generation.

At batch 1 a step is three or four small products and O(n) gate maths, and what it costs is the
number of calls from Python: the whole-sequence path (:func:`factorlm.ops.flstm_layer`, its
argument checks, the autograd Function's ``infer``, the scan's buffers and per-step views, the
cell's eight in-place kernels) made about 30 ATen calls and 15 Python frames of a token. Here a
step is 12 (F-LSTM) or 17 (G-LSTM) ATen calls in one frame, on freshly allocated outputs (nothing
is preallocated for one step); the layers call it from their own single-step path
(:meth:`factorlm.nn.base.LSTMBase.forward`), which also skips what a one-step call does not need.
The results equal the scans' to rounding.

Arguments as the whole-sequence functions take them, for one step: x (B, p_in), h0 (B, p),
c0 (B, n), the layer's two gate weights in nn.LSTM's [i, f, g, o] row order (F-LSTM: W1
(r, p_in + p), W2 (4n, r); G-LSTM: W_ih (k, 4n/k, p_in/k), W_hh (k, 4n/k, p/k); G∘F-LSTM: W1
(k, r, (p_in + p)/k), W2 (k, 4n/k, r)), bias (4n,) or None, W_hr (p, n) or None, the constant
forget_bias, and num_gates, G: 4, or 3 for coupled input and forget gates (CIFG: 3n gate rows
[i, g, o] for the 4n above; the cell maths of factorlm.nn.reference). All return (h (B, p),
c (B, n)), new tensors. Under autocast they run in the autocast dtype, their tensors cast once on
entry (:func:`factorlm.ops._function.runs_in_autocast_dtype`).
Shapes are not checked beyond what the ATen calls check themselves: the layers' parameters were
made with the right ones, and a wrong one raises in the first product that reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from factorlm.ops._function import runs_in_autocast_dtype


@runs_in_autocast_dtype
def flstm_step(x: Tensor, h0: Tensor, c0: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None,
               w_hr: Tensor | None, forget_bias: float, num_gates: int = 4) -> tuple[Tensor, Tensor]:
    """One F-LSTM step: z = W1·[x; h0] (B, r), gates = W2·z + b (B, G·n), then the cell."""
    z = F.linear(torch.cat((x, h0), 1), w1)  # one product with W1 whole: one call fewer than two halves
    gates = F.linear(z, w2, bias)
    return _cell(gates.view(gates.shape[0], num_gates, -1), c0, w_hr, forget_bias, grouped=False)


@runs_in_autocast_dtype
def glstm_step(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None,
               w_hr: Tensor | None, forget_bias: float, num_gates: int = 4) -> tuple[Tensor, Tensor]:
    """One G-LSTM step: group j's gates W_ih^(j)·x^(j) + W_hh^(j)·h0^(j) + b^(j), two bmms over the
    k groups on (k, B, ·) views of x and h0, then the cell."""
    k, four_nk, _ = w_ih.shape
    batch = x.shape[0]
    nk = four_nk // num_gates
    if batch == 1:  # (1, m) -> (k, 1, m/k): one view call
        xg, hg, cg = x.view(k, 1, -1), h0.view(k, 1, -1), c0.view(k, 1, -1)
    else:
        xg, hg, cg = _by_group(x, k), _by_group(h0, k), _by_group(c0, k)
    if bias is None:
        gates = torch.bmm(xg, w_ih.mT)
    else:
        # (G·n,) gate-major -> (k, 1, G·nk), group j's [i f g o]: a copy of G·n values, which
        # baddbmm then broadcasts over the batch as the product's starting value
        by_group = bias.as_strided((k, 1, num_gates, nk), (nk, 0, k * nk, 1),
                                   bias.storage_offset()).reshape(k, 1, four_nk)
        gates = torch.baddbmm(by_group, xg, w_ih.mT)
    gates.baddbmm_(hg, w_hh.mT)  # (k, B, 4nk)
    return _cell(gates.view(k, batch, num_gates, nk), cg, w_hr, forget_bias, grouped=True)


@runs_in_autocast_dtype
def gflstm_step(x: Tensor, h0: Tensor, c0: Tensor, w1: Tensor, w2: Tensor, bias: Tensor | None,
                w_hr: Tensor | None, forget_bias: float, num_gates: int = 4) -> tuple[Tensor, Tensor]:
    """One G∘F-LSTM step: group j's z^(j) = W1^(j)·[x^(j); h0^(j)] (k, B, r), then gates
    W2^(j)·z^(j) + b^(j), two bmms over the k groups, then the cell. k = 1 is F-LSTM's step on
    the (r, p_in + p), (G·n, r) views, as the whole-sequence path runs F-LSTM's function there."""
    k, four_nk = w1.shape[0], w2.shape[1]
    if k == 1:
        return flstm_step(x, h0, c0, w1[0], w2[0], bias, w_hr, forget_bias, num_gates)
    batch = x.shape[0]
    nk = four_nk // num_gates
    if batch == 1:
        xh = torch.cat((x.view(k, 1, -1), h0.view(k, 1, -1)), 2)  # (k, 1, (p_in + p)/k)
        cg = c0.view(k, 1, -1)
    else:
        xh = torch.cat((_by_group(x, k), _by_group(h0, k)), 2)
        cg = _by_group(c0, k)
    z = torch.bmm(xh, w1.mT)  # (k, B, r)
    if bias is None:
        gates = torch.bmm(z, w2.mT)
    else:  # group j's [i f g o] ([i g o]) of the bias, as in glstm_step
        by_group = bias.as_strided((k, 1, num_gates, nk), (nk, 0, k * nk, 1),
                                   bias.storage_offset()).reshape(k, 1, four_nk)
        gates = torch.baddbmm(by_group, z, w2.mT)
    return _cell(gates.view(k, batch, num_gates, nk), cg, w_hr, forget_bias, grouped=True)


def _by_group(t: Tensor, k: int) -> Tensor:
    """(B, m) -> its (k, B, m/k) view, group j's slice of every row."""
    return t.view(t.shape[0], k, -1).transpose(0, 1)


def _cell(gates: Tensor, c0: Tensor, w_hr: Tensor | None, forget_bias: float, grouped: bool) -> tuple[Tensor, Tensor]:
    """gates (…, G, nk) pre-activations [i, f, g, o] (G = 4) or [i, g, o] (G = 3, f = 1 - i), c0
    (…, nk) -> (h (B, p), c (B, n)): the cell maths on new tensors, then the projection. ``…`` is
    (B,) for F-LSTM (k = 1), (k, B) for G-LSTM, whose (k, B, nk) results are put back in the
    layer's (B, n) order (a view when B = 1)."""
    if gates.shape[-2] == 3:  # coupled: forget_bias lowers i (f = 1 - i = σ(forget_bias - a_i))
        if forget_bias != 0.0:
            gates.select(-2, 0).sub_(forget_bias)
        act = gates.sigmoid()  # all three in one call; g's slot is not used
        i, _, o = act.unbind(-2)
        c = torch.lerp(c0, gates.select(-2, 1).tanh(), i)  # c0 + i·(tanh g - c0) = (1 - i)·c0 + i·tanh g
    else:
        if forget_bias != 0.0:
            gates.select(-2, 1).add_(forget_bias)
        act = gates.sigmoid()  # all four in one call; g's slot is not used
        i, f, _, o = act.unbind(-2)
        c = torch.addcmul(f * c0, i, gates.select(-2, 2).tanh())
    m = torch.tanh(c).mul_(o)
    if grouped:  # (k, B, nk) -> (B, n): at B = 1 a view (k = 1 too: a dense coupled LSTM runs as one group)
        batch = c.shape[1]
        if batch == 1:
            c, m = c.view(1, -1), m.view(1, -1)
        else:
            c, m = c.transpose(0, 1).reshape(batch, -1), m.transpose(0, 1).reshape(batch, -1)
    return (m if w_hr is None else F.linear(m, w_hr)), c
