"""factorlm.nn.CirculantLSTM: C-LSTM, the LSTM whose gate matrices are made of circulant blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm import ops
from factorlm.nn import reference
from factorlm.nn.base import LSTMBase, per_layer, scale_gate_rows
from factorlm.nn.cell_args import CellArg
from factorlm.ops import circulant

#: what ``CirculantLSTM.method`` may be: how the block-circulant products are computed
METHODS = ("auto", "dense", "fft")


class CirculantLSTM(LSTMBase):
    r"""C-LSTM (Wang et al. 2018): every gate matrix made of b × b circulant blocks.

    The input matrix W_ih (G·n × p_in) and the recurrent matrix W_hh (G·n × p) are each a grid of
    b × b circulant blocks, block (r, s) defined by its FIRST COLUMN w[r, s] (b values):

        W[r·b + i, s·b + j] = w[r, s, (i − j) mod b]

    so a block times a b-vector is a circular convolution. b divides n, so every block lies within
    one gate: row block r holds cells (r mod n/b)·b … of gate r // (n/b), gates in torch.nn.LSTM's
    order [i, f, g, o] (G = 4; [i, g, o], G = 3, with coupled_gates). The cell, bias and projection are the LSTMP's (factorlm.nn.LSTM); the
    projection W_hr (p × n) stays dense, as in G-LSTM.

    Per layer k: ``weight_ih_l{k}`` (G·n/b, p_in/b, b), ``weight_hh_l{k}`` (G·n/b, p/b, b),
    ``bias_l{k}`` (G·n), ``weight_hr_l{k}`` (p, n); again with ``_reverse`` when bidirectional.
    Gate parameters: G·n·(p_in + p)/b, 1/b of the dense LSTM's.

    ``method`` chooses how the products run (the same function to rounding):
        "dense"  W materialised once per forward (one strided copy from the blocks), then the dense time
                 loop (factorlm.ops.glstm_layer with one group, whichever ``impl`` picks: the C++
                 loop on CPU); autograd carries W's gradient back to the blocks.
        "fft"    the weights' spectra (rfft of every first column) once per forward; the input
                 side for all time steps at once in the frequency domain, per step one rfft of
                 h_{t-1}, a product-sum per frequency, one irfft (factorlm.ops.circulant); a PyTorch
                 loop with autograd, run under impl "torch" or "auto".
        "auto"   the default: the rule of :func:`auto_method`, from measurements: FFT on a CPU for
                 b >= 32 on layers whose dense W has >= 2^20 entries, else dense.
    ``impl = "reference"`` runs the per-step oracle on the materialised W whatever the method.

    shared_gates=True: n/b block rows C (n × ·) shared by the gates, gate g's matrix diag(s_g)·C
    (LSTMBase), which is not block-circulant: such a layer always runs the dense method, with the
    scaled dense (G·n, ·) matrices materialised once per forward; method="fft" is refused.

    Args: as torch.nn.LSTM, plus ``block``: one int, or one int per layer. Each layer's input
    size, hidden_size and the output size must be multiples of that layer's block.
    """

    cell_args = (
        CellArg("block", "C-LSTM circulant block size b, one int or one per layer (4,8)", symbol="b",
                example=2, per_layer_example=(2, 4, 2)),
    )

    def __init__(self, *args, block, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block = per_layer("block", block, self.num_layers)
        self._check_divides("block", self.block)
        self._method = "auto"
        self._init_layers()

    # ------------------------------------------------------------- the method
    @property
    def method(self) -> str:
        """How the block-circulant products run: one of METHODS (class doc), "auto" by default."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        if value not in METHODS:
            raise ValueError(f"{type(self).__name__}.method must be one of {METHODS}, got {value!r}")
        self._method = value

    def layer_method(self, layer: int, x: Tensor | None = None) -> str:
        """"dense" or "fft": what runs layer ``layer`` for input x (None: a CPU float32 input)."""
        if self._method != "auto":
            return self._method
        if x is not None and x.dtype not in FFT_DTYPES:
            return "dense"
        if self.shared_gates:  # the per-gate scales diag(s_g)·C are not circulant: see the class doc
            return "dense"
        dense_entries = self.num_gates * self.hidden_size * (self.layer_input_size(layer) + self.output_size)
        return auto_method(self.block[layer], dense_entries, None if x is None else x.device.type)

    # ------------------------------------------------------------- parameters
    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        b = self.block[layer]
        rows = self.weight_gates * self.hidden_size // b  # R = G·n/b (n/b with shared gates)
        return {
            "weight_ih": (rows, self.layer_input_size(layer) // b, b),
            "weight_hh": (rows, self.output_size // b, b),
        }

    # ---------------------------------------------------------------- the maths
    def _expand_shared_gates(self, layer: int, weights):
        # circulant blocks scaled row by row are no longer circulant: the scales stay in ``weights``
        # and _dense_gate_weights applies them to the dense matrices it materialises
        return weights

    def _dense_gate_weights(self, layer: int, w):
        w_ih, w_hh = circulant.dense_matrix(w["weight_ih"]), circulant.dense_matrix(w["weight_hh"])
        if self.shared_gates:  # (n, ·) -> (G·n, ·): gate g's rows s_g ⊙ C's
            w_ih, w_hh = (scale_gate_rows(w["gate_scale"], m, "rows") for m in (w_ih, w_hh))
        return w_ih, w_hh, w["bias"]

    def _gate_fn(self, layer: int, w):
        # the oracle: the dense W, materialised once per forward, applied step by step
        w_ih, w_hh, bias = self._dense_gate_weights(layer, w)
        return lambda x_t, h: reference.dense_gates(x_t, h, w_ih, w_hh, bias)

    def _layer_forward(self, layer: int, direction: int, x: Tensor, h0: Tensor, c0: Tensor,
                       batch_sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.impl == "reference":
            return super()._layer_forward(layer, direction, x, h0, c0, batch_sizes)
        w = self.effective_parameters(layer, direction)
        if self.layer_method(layer, x) == "fft":
            if self.shared_gates:
                raise RuntimeError("CirculantLSTM: method='fft' does not compose with shared_gates (the per-gate "
                                   "scales diag(s_g)·C are not circulant); set method='dense' or 'auto'")
            if self.impl not in ("torch", "auto"):
                raise RuntimeError(f"CirculantLSTM: method='fft' runs its own PyTorch loop (impl 'torch' or "
                                   f"'auto'), got impl={self.impl!r}; set method='dense' to run the "
                                   f"{self.impl!r} loop")
            return circulant.circulant_fft_layer(x, h0, c0, w["weight_ih"], w["weight_hh"], w["bias"],
                                                 w["weight_hr"], self.forget_bias, batch_sizes)
        # one group of the G-LSTM scans is the dense LSTM, with its hand-written backward and every
        # time loop; W in the column-major layout those products read fastest
        if self.shared_gates:
            w_ih, w_hh, _ = self._dense_gate_weights(layer, w)
        else:
            w_ih = circulant.dense_matrix(w["weight_ih"], transposed=True)
            w_hh = circulant.dense_matrix(w["weight_hh"], transposed=True)
        return ops.glstm_layer(x, h0, c0, w_ih.unsqueeze(0), w_hh.unsqueeze(0), w["bias"], w["weight_hr"],
                               self.forget_bias, impl=self.impl, batch_sizes=batch_sizes, num_gates=self.num_gates)

    def _layer_gate_macs(self, layer: int) -> int:
        """Multiply-adds per token of the layer's gate map, as the method it runs on a CPU does them.

        "dense": G·n·(p_in + p), the dense LSTM's (materialising W is once per forward, not per
        token; G = num_gates). "fft", with R = G·n/b, S = (p_in + p)/b, F = b//2 + 1: S forward and
        R inverse real FFTs of length b, 2·b·⌈log2 b⌉ each (factorlm.ops.circulant.fft_macs), and
        R·S·F complex multiply-adds of 4 real ones: (S + R)·2·b·⌈log2 b⌉ + 4·F·R·S, about
        2G·n·(p_in + p)/b + O((p_in + p + G·n)·log b). The weights' spectra are once per forward,
        not per token.
        """
        n, p_in, p, b = self.hidden_size, self.layer_input_size(layer), self.output_size, self.block[layer]
        if self.layer_method(layer) == "dense":
            return self.weight_gates * n * (p_in + p)
        rows, cols = self.weight_gates * n // b, (p_in + p) // b
        return (cols + rows) * circulant.fft_macs(b) + 4 * (b // 2 + 1) * rows * cols

    def _extra_repr_parts(self) -> list[str]:
        block = self.block[0] if len(set(self.block)) == 1 else list(self.block)
        parts = [f"block={block}"]
        if self._method != "auto":
            parts.append(f"method={self._method!r}")
        return parts


#: the dtypes "auto" considers the FFT method for (torch.fft has no bfloat16 on CPU; half wants
#: power-of-two sizes on CUDA): any other input runs the dense method
FFT_DTYPES = (torch.float32, torch.float64)
#: "auto" runs the FFT method from this block size up ...
FFT_MIN_BLOCK = 32
#: ... on layers whose dense gate matrix G·n × (p_in + p) has at least this many entries
FFT_MIN_DENSE_ENTRIES = 1 << 20


def auto_method(block: int, dense_entries: int, device_type: str | None) -> str:
    """The product method "auto" picks for a layer: "dense" or "fft".

    ``dense_entries`` is G·n·(p_in + p), the dense gate matrix's size; ``device_type`` the input's
    ("cpu", "cuda", ...; None: a CPU input).

    Measured with benchmarks/circulant_speed.py, float32, one thread pinned to core 1 of the shared
    2-core Xeon (AVX512, under load: absolute times 1-3× an idle core's, ratios steadier), T = 20,
    p_in = p: FFT time / dense time, training (forward + backward) / inference, two runs:
        n = 256,  p = 64,  B = 32:  b = 4  3.1-3.3 / 4.0-5.0,  b = 16  2.3-2.4 / 2.4,  b = 64  2.0 / 2.1
        n = 1024, p = 256, B = 32:  b = 8  1.03-1.05 / 1.06-1.15,  b = 32  0.56-0.73 / 0.59-0.64,
                                    b = 128  0.56-0.59 / 0.50-0.55,  b = 256  0.39-0.56 / 0.42
        n = 1024, p = 256, B = 1:   b = 32  0.50-0.51 / 0.23-0.27,  b = 256  0.51-0.57 / 0.21-0.34
        n = 1024, p = 256, B = 128: b = 256  0.90-1.09 / 0.85-0.88
    A step of the FFT method is ~10 small ATen calls (rfft, a bmm, irfft, the cell) whatever the
    size, so on small layers the dense GEMM wins at every b; on the 2M-entry layer the FFT wins
    from b = 32 at batch 1 and 32, b = 8 is a tie, and so is b = 256 at batch 128, where the dense
    GEMMs run near their peak. Hence FFT from b >= FFT_MIN_BLOCK on layers of >=
    FFT_MIN_DENSE_ENTRIES (between the 131k-entry layer that lost and the 2.1M one that won), for
    every batch (the multiply-add count, which knows no batch, follows the same rule). Not
    measured on CUDA, where each of those calls is a kernel launch against one cuBLAS GEMM: dense
    there.
    """
    if device_type not in (None, "cpu"):
        return "dense"
    return "fft" if block >= FFT_MIN_BLOCK and dense_entries >= FFT_MIN_DENSE_ENTRIES else "dense"
