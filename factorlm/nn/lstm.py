"""factorlm.nn.LSTM: the paper's LSTMP baseline ("BIGLSTM" cell), a drop-in torch.nn.LSTM."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

from factorlm import ops
from factorlm.nn import reference
from factorlm.nn.base import LSTMBase, parameter_name
from factorlm.nn.cell_args import CellArg


# torch.lstm on CPU notes once per process that oneDNN has no projection kernel and its own one
# runs instead; that is expected here and says nothing the user can act on.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


class LSTM(LSTMBase):
    r"""Dense LSTM with optional projection (LSTMP), the same function as ``torch.nn.LSTM``.

    ``[i f g o] = W_ih·x_t + W_hh·h_{t-1} + b``;  ``c_t = σ(f + forget_bias)⊙c_{t-1} + σ(i)⊙tanh(g)``;
    ``h_t = W_hr·(σ(o)⊙tanh(c_t))`` when ``proj_size > 0``.

    Parameters per layer k: ``weight_ih_l{k}`` (4n, p_in), ``weight_hh_l{k}`` (4n, p),
    ``bias_l{k}`` (4n) and ``weight_hr_l{k}`` (p, n), gate rows ordered [i, f, g, o] as in
    torch.nn.LSTM, and with bidirectional=True the same again with ``_reverse``
    (``weight_ih_l{k}_reverse``, ...), torch.nn.LSTM's names. With shared_gates W_ih (n, p_in),
    W_hh (n, p) and ``gate_scale_l{k}`` (G, n) (LSTMBase): torch.lstm runs the materialised (G·n, ·)
    weights. A torch.nn.LSTM state_dict loads
    directly (its ``bias_ih + bias_hh`` is summed into ``bias``), and :meth:`from_lstm` copies an
    existing module.

    The fast path calls PyTorch's own fused LSTM kernel (``torch.lstm``, cuDNN on GPU), which
    takes bidirectional and packed batches itself. With ``coupled_gates=True`` (CIFG, see
    LSTMBase: rows [i, g, o], 3n of them) torch.lstm cannot compute the layer, and it runs as the
    G-LSTM of one group instead (:func:`factorlm.ops.glstm_layer` on the (1, 3n, ·) views of its
    weights), with every impl the G-LSTM has.
    """

    #: no arguments beyond torch.nn.LSTM's (factorlm.nn.cell_args)
    cell_args: tuple[CellArg, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_layers()
        self.register_load_state_dict_pre_hook(_accept_nn_lstm_state_dict)

    _shared_gate_layout = {"weight_ih": "rows", "weight_hh": "rows"}

    def _layer_parameter_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        rows = self.weight_gates * self.hidden_size  # G·n, or n with shared gates
        return {"weight_ih": (rows, self.layer_input_size(layer)), "weight_hh": (rows, self.output_size)}

    def _gate_fn(self, layer: int, w):
        return lambda x_t, h: reference.dense_gates(x_t, h, w["weight_ih"], w["weight_hh"], w["bias"])

    def _dense_gate_weights(self, layer: int, w):
        return w["weight_ih"], w["weight_hh"], w["bias"]

    def _layer_gate_macs(self, layer: int) -> int:
        return self.weight_gates * self.hidden_size * (self.layer_input_size(layer) + self.output_size)

    # The dense fast path is PyTorch's torch.lstm (its own C++ / cuDNN loop): "torch" and "auto"
    # both run it. "extension" and "triton" name F-LSTM/G-LSTM time loops this layer does not
    # have, and are refused when set rather than silently run as something else. With coupled
    # gates the layer runs on the G-LSTM's loops (k = 1), and takes all of them.
    @property
    def _implementations(self) -> tuple[str, ...]:
        if self.__dict__.get("coupled_gates"):
            return super()._implementations
        return ("reference", "torch", "auto")

    @property
    def _layer_function(self):
        """Coupled gates: the G-LSTM fast path with one group (None otherwise: torch.lstm runs)."""
        return _one_group_layer if self.__dict__.get("coupled_gates") else None

    @property
    def _step_function(self):
        """Coupled gates: the G-LSTM's one step with one group (None otherwise: torch.lstm runs)."""
        return _one_group_step if self.__dict__.get("coupled_gates") else None

    def _stack_forward(self, x: Tensor, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None):
        """impl "reference": the per-step oracle, layer by layer; "torch" / "auto": torch.lstm;
        coupled gates: the G-LSTM path with one group, layer by layer."""
        if self.impl == "reference" or self.coupled_gates:
            return super()._stack_forward(x, h0, c0, batch_sizes)
        # the arguments after the weights: has_biases, num_layers, dropout, train, bidirectional
        flags = (True, self.num_layers, self.dropout, self.training, self.bidirectional)
        rows = x.shape[0] * (x.shape[1] if batch_sizes is None else 1)
        with _native_cpu_lstm(x.device, rows):
            if batch_sizes is None:  # x is already (T, B, p_in): batch_first=False
                output, h_n, c_n = torch.lstm(x, (h0, c0), self._torch_flat_weights(x), *flags, False)
            else:
                output, h_n, c_n = torch.lstm(x, batch_sizes, (h0, c0), self._torch_flat_weights(x), *flags)
        return output, h_n, c_n

    def _torch_flat_weights(self, x: Tensor) -> list[Tensor]:
        """torch.lstm's flat list, per layer and direction: w_ih, w_hh, b_ih, b_hh[, w_hr].

        Our single gate bias goes in b_ih; b_hh carries the constant forget_bias.
        """
        n = self.hidden_size
        forget = torch.zeros(4 * n, dtype=x.dtype, device=x.device)
        forget[n : 2 * n] = self.forget_bias
        flat = []
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                w = self.effective_parameters(layer, direction)
                bias = w["bias"] if w["bias"] is not None else torch.zeros_like(forget)
                flat += [w["weight_ih"], w["weight_hh"], bias, forget]
                if self.proj_size:
                    flat.append(w["weight_hr"])
        return flat

    @classmethod
    @torch.no_grad()
    def from_lstm(cls, lstm: nn.LSTM, *, forget_bias: float = 0.0) -> "LSTM":
        """A factorlm LSTM computing the same function as ``lstm`` (weights are copied).

        With ``forget_bias`` set, the constant is subtracted from the stored forget-gate bias so
        that the function is unchanged.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects a torch.nn.LSTM, got {type(lstm).__name__}")
        ref = lstm.weight_ih_l0
        with torch.device("meta"):
            layer = cls(
                lstm.input_size,
                lstm.hidden_size,
                num_layers=lstm.num_layers,
                bias=lstm.bias or forget_bias != 0.0,
                batch_first=lstm.batch_first,
                dropout=lstm.dropout,
                bidirectional=lstm.bidirectional,
                proj_size=lstm.proj_size,
                forget_bias=forget_bias,
            )
        layer = layer.to_empty(device=ref.device).to(ref.dtype)
        layer.load_state_dict(lstm.state_dict())
        if forget_bias != 0.0:
            n = lstm.hidden_size
            for k in range(lstm.num_layers):
                for direction in range(layer.num_directions):
                    layer.layer_parameters(k, direction)["bias"][n : 2 * n] -= forget_bias
        layer.train(lstm.training)
        return layer


def _one_group_layer(x, h0, c0, weight_ih, weight_hh, bias, weight_hr, forget_bias, *, impl, batch_sizes,
                     num_gates):
    """A dense layer as the G-LSTM of one group: its (G·n, m) weights are the (1, G·n, m) group
    weights (views: the gradients reach the parameters)."""
    return ops.glstm_layer(x, h0, c0, weight_ih[None], weight_hh[None], bias, weight_hr, forget_bias, impl=impl,
                           batch_sizes=batch_sizes, num_gates=num_gates)


#: rows (T·B, or a packed batch's N) below which torch.lstm runs on the CPU with oneDNN switched off.
#: Without a projection, torch.lstm hands CPU float32 work to oneDNN's RNN primitive, which costs
#: about one pass over the weights per call (re-laid out each time): token-by-token generation pays it
#: every token. Measured (2-core AVX-512 Xeon, torch 2.13, 2 layers, no grad), oneDNN / PyTorch's own
#: loop, ms: n = 200, T·B = 1: 0.90 / 0.16; T·B = 32: 1.13 / 0.57; n = 650, T·B = 1: 11.2 / 0.97;
#: n = 1500, T·B = 1: 49 / 4.7. From T·B = 640 oneDNN wins at n = 200-650 (n = 200, 20 × 32: 6.2 /
#: 7.3), so larger calls keep it.
NATIVE_LSTM_MAX_ROWS = 64


@contextlib.contextmanager
def _native_cpu_lstm(device: torch.device, rows: int):
    """oneDNN off around a small CPU torch.lstm call (NATIVE_LSTM_MAX_ROWS); a no-op otherwise."""
    if device.type != "cpu" or rows >= NATIVE_LSTM_MAX_ROWS or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def _one_group_step(x, h0, c0, weight_ih, weight_hh, bias, weight_hr, forget_bias, num_gates):
    """One step of a dense layer as the G-LSTM of one group (see _one_group_layer)."""
    return ops.glstm_step(x, h0, c0, weight_ih[None], weight_hh[None], bias, weight_hr, forget_bias, num_gates)


def _accept_nn_lstm_state_dict(module: LSTM, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Let ``LSTM.load_state_dict`` take torch.nn.LSTM's keys: bias_ih + bias_hh -> bias (either
    direction: ``bias_ih_l0_reverse + bias_hh_l0_reverse -> bias_l0_reverse``)."""
    for layer in range(module.num_layers):
        for direction in range(module.num_directions):
            ih, hh, ours = (prefix + parameter_name(name, layer, direction) for name in ("bias_ih", "bias_hh", "bias"))
            if ih in state_dict and hh in state_dict and ours not in state_dict:
                state_dict[ours] = state_dict.pop(ih) + state_dict.pop(hh)
