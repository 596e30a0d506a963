"""Block-circulant gate matrices (C-LSTM, Wang et al. 2018): the dense matrix they equal, and
their product through the FFT.

A block-circulant matrix W (R·b × S·b) is R × S blocks of b × b circulant matrices, stored as
``weight`` (R, S, b): block (r, s) is defined by its FIRST COLUMN c = weight[r, s], so

    W[r·b + i, s·b + j] = weight[r, s, (i − j) mod b]

and block (r, s) times a b-vector x is the circular convolution c ⊛ x, whose DFT is
DFT(c) · DFT(x) element-wise. Hence, with F = b//2 + 1 real-FFT frequencies,

    y_r = Σ_s C_(r,s) · x_s   =   irfft( Σ_s rfft(weight[r, s]) · rfft(x_s) )

one rfft per b-slice of x, one complex product-sum per frequency (a (·, S) × (S, R) matrix
product for each of the F frequencies), one irfft per b-slice of y. The weight's spectrum
(``spectrum``) depends on the weights only: a layer computes it once per forward and every time
step reuses it (published C-LSTM code transforms the weights at every step).

Two ways to apply W, the same function to rounding (factorlm.nn.CirculantLSTM chooses):
    ``dense_matrix``  W itself, copied out of ``weight`` (a strided view, one copy; autograd
                      carries the gradient back), then the dense LSTM path;
    ``circulant_fft_layer``  the whole layer in the frequency domain (input side for all rows at
                      once, recurrent side per step), autograd through torch.fft.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def blocks(weight: Tensor) -> Tensor:
    """(R, S, b, b): every b × b circulant block of ``weight`` (R, S, b), entry [r, s, i, j] =
    weight[r, s, (i − j) mod b].

    Row i of a block is a window of b consecutive entries of z = reverse(c ‖ c): z[m] =
    c[(2b − 1 − m) mod b], so z[b − 1 − i + j] = c[(i − j) mod b], the window starting at b − 1 − i.
    ``unfold`` takes those windows as a strided view and one copy writes them (autograd sums the
    gradient back along the wrapped diagonals); an index gather of the same entries measured 1.3-4×
    slower forward on the Xeon (13-18 ms against 4-14 ms for 0.5-1M entries, 1 thread, under load).
    """
    b = weight.shape[-1]
    z = torch.cat([weight, weight], dim=-1).flip(-1)  # (R, S, 2b)
    return z.unfold(-1, b, 1)[..., :b, :].flip(-2)  # window s = z[s : s + b]; row i = window b − 1 − i


def dense_matrix(weight: Tensor, transposed: bool = False) -> Tensor:
    """The dense (R·b, S·b) matrix of block-circulant ``weight`` (R, S, b) (module doc).

    With ``transposed``, the same matrix is returned as the transposed view of a contiguous
    (S·b, R·b) tensor (column-major), the layout the G-LSTM scans' products read fastest
    (factorlm.nn.GLSTM._empty_parameter); values and shape are the same either way.
    """
    rows, cols, b = weight.shape
    entries = blocks(weight)  # (R, S, i, j)
    if transposed:  # (S, j, R, i) -> contiguous (S·b, R·b), returned as its (R·b, S·b) view
        return entries.permute(1, 3, 0, 2).reshape(cols * b, rows * b).t()
    return entries.permute(0, 2, 1, 3).reshape(rows * b, cols * b)


# The frequency-domain products are complex, but held as real tensors, [real parts, imaginary parts]
# side by side: PyTorch's CPU complex bmm does not reach MKL's batched GEMM (one small addmm per
# frequency: a (9, 32, 4) × (9, 4, 64) baddbmm took 118 µs against 15 µs for the same product as
# one real bmm of twice the width), and the real form makes it one real bmm per step.


def spectrum(weight: Tensor) -> Tensor:
    """(F, 2S, 2R) real: the DFT of every block's first column (F = b//2 + 1 frequencies) of
    ``weight`` (R, S, b), as the real matrices [[Re, Im], [−Im, Re]] that multiply the
    [Re, Im] rows of :func:`to_frequency` into the [Re, Im] rows of the product."""
    freq = torch.fft.rfft(weight, dim=-1).permute(2, 1, 0)  # (F, S, R)
    re, im = freq.real, freq.imag
    return torch.cat([torch.cat([re, im], dim=2), torch.cat([-im, re], dim=2)], dim=1)


def to_frequency(x: Tensor, b: int) -> Tensor:
    """(F, M, 2S) real: the rfft of every b-slice of every row of x (M, S·b), [Re, Im] per row."""
    rows = x.shape[0]
    freq = torch.view_as_real(torch.fft.rfft(x.reshape(rows, -1, b), dim=-1))  # (M, S, F, 2)
    return freq.permute(2, 0, 3, 1).reshape(freq.shape[2], rows, -1)


def to_time(freq: Tensor, b: int) -> Tensor:
    """(M, R·b) real: the irfft of every frequency-domain row of ``freq`` (F, M, 2R), [Re, Im]."""
    num_freq, rows, width = freq.shape
    parts = freq.view(num_freq, rows, 2, width // 2).permute(1, 3, 0, 2).contiguous()  # (M, R, F, 2)
    return torch.fft.irfft(torch.view_as_complex(parts), n=b, dim=-1).reshape(rows, -1)


def apply_fft(x: Tensor, spec: Tensor, b: int) -> Tensor:
    """W·x for every row of x (M, S·b) -> (M, R·b), W given by its ``spectrum`` (F, 2S, 2R)."""
    return to_time(torch.bmm(to_frequency(x, b), spec), b)


def fft_macs(b: int) -> int:
    """The multiply-adds counted for one real FFT (forward or inverse) of length b: 2·b·⌈log2 b⌉
    (b/2·log2 b complex butterflies of 4 real multiply-adds each), 0 for b = 1."""
    return 2 * b * math.ceil(math.log2(b)) if b > 1 else 0


def circulant_fft_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                        bias: Tensor | None, weight_hr: Tensor | None, forget_bias: float = 0.0,
                        batch_sizes: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One block-circulant LSTM layer over a sequence in the frequency domain, autograd for the
    backward (every operation is a differentiable torch op: no hand-written backward).

    x (T, B, p_in), or with ``batch_sizes`` (ints, non-increasing) a packed batch's rows (N, p_in);
    h0 (B, p), c0 (B, n); weight_ih (G·n/b, p_in/b, b), weight_hh (G·n/b, p/b, b) block-circulant in
    the module's layout, rows in nn.LSTM's gate order [i, f, g, o] (G = 4), or [i, g, o] (G = 3:
    coupled input and forget gates, f = 1 − i, forget_bias lowering i; factorlm.nn.reference); G is
    read off the shapes (gate rows / n); bias (G·n,) or None; weight_hr (p, n) or None. Returns
    output (T, B, p) (packed: (N, p)), h_T (B, p), c_T (B, n), the final states taken at each
    sequence's own last step.

    Both spectra are computed once, here, and the input side W_ih·x + b of all rows at once, kept in
    the frequency domain (the bias as its blocks' DFT); per step one rfft of h_{t-1}, F complex
    (B, p/b) × (p/b, G·n/b) products added to the step's input side, and one irfft.
    """
    b = weight_ih.shape[-1]
    num_gates = weight_ih.shape[0] * b // c0.shape[-1]
    padded = batch_sizes is None
    rows = x.reshape(-1, x.shape[-1])
    input_freq = torch.bmm(to_frequency(rows, b), spectrum(weight_ih))  # (F, N, 2R)
    if bias is not None:  # DFT of each b-slice of the bias, added at every row: (F, 1, 2R)
        input_freq = input_freq + to_frequency(bias.unsqueeze(0), b)
    spec_hh = spectrum(weight_hh)
    sizes = [x.shape[1]] * x.shape[0] if padded else list(batch_sizes)
    h, c = h0, c0
    outputs, ended_h, ended_c = [], [], []
    for step_freq in input_freq.split(sizes, dim=1):
        size = step_freq.shape[1]
        if size < h.shape[0]:  # the last rows' sequences ended at the step before
            ended_h.append(h[size:])
            ended_c.append(c[size:])
            h, c = h[:size], c[:size]
        gates = to_time(torch.baddbmm(step_freq, to_frequency(h, b), spec_hh), b)
        if num_gates == 3:  # coupled: c + ι·(tanh g − c) = (1 − ι)·c + ι·tanh g
            i, g, o = gates.chunk(3, dim=1)
            c = torch.lerp(c, torch.tanh(g), torch.sigmoid(i - forget_bias))
        else:
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f + forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if weight_hr is not None:
            h = F.linear(h, weight_hr)
        outputs.append(h)
    # rows that ended later come first: reverse the order in which they were set aside
    h_n = torch.cat([h, *reversed(ended_h)])
    c_n = torch.cat([c, *reversed(ended_c)])
    out = torch.cat(outputs)
    return (out.view(x.shape[0], x.shape[1], -1) if padded else out), h_n, c_n
