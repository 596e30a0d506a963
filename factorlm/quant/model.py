"""The int8 language model: a LanguageModel whose embedding, recurrent layers and softmax hold int8.

``quantize_model(model)`` converts a trained float :class:`~factorlm.models.LanguageModel` (after
QAT or not) into a :class:`QuantizedLanguageModel` for CPU inference: the embedding table and the
softmax weight (V, p) per row, every recurrent layer's gate and projection matrices per output
channel (factorlm.quant.layers), biases and the diagonal layer's u in float. It has the float
model's interface (forward, loss, log_probs, init_state), so factorlm.evaluate scores, evaluates
and samples it unchanged. Inference only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from factorlm.models.lm import LanguageModel
from factorlm.nn.base import LSTMBase
from factorlm.quant import int8
from factorlm.quant.layers import QuantizedLSTM
from factorlm.quant.softmax_ops import check_targets, chunked_nll

#: how the products run: every one through factorlm.quant.int8 ("native"), or those over a whole
#: sequence (softmax, the layers' input side) through torchao's int8 nn.Linear ("torchao")
BACKENDS = ("torchao", "native")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class QuantizedEmbedding(nn.Module):
    """An embedding table (V, E) in int8, one scale per row: ids (...) -> vectors (..., E) float32."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        q, scale = int8.quantize_rows(weight.detach().float())
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)


class QuantizedSoftmax(nn.Module):
    """The full softmax with its weight (V, p) in int8 per row (output channel), the hidden state
    quantized per token at each call; the bias (V,) stays a float Parameter.

    ``logits``, ``log_probs`` and ``nll`` as factorlm.models.FullSoftmax's (nll in row chunks)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, backend: str = "native",
                 quantized: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        # quantized: the weight's (q, scale) already made (tied embeddings: the embedding's, one tensor)
        q, scale = quantized if quantized is not None else int8.quantize_rows(weight.detach().float())
        self.vocab_size, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.backend = check_backend(backend)
        self._torchao: nn.Module | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._torchao = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._torchao = None
        return super()._apply(fn, *args, **kwargs)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., p) -> logits (..., V)."""
        if self.backend == "torchao":
            if self._torchao is None:
                from factorlm.quant import _torchao

                self._torchao = _torchao.quantized_linear(int8.dequantize_rows(self.weight_int8, self.weight_scale),
                                                          self.bias)
            return self._torchao(hidden)
        return int8.int8_linear(hidden, self.weight_int8, self.weight_scale, self.bias)

    def log_probs(self, hidden: Tensor) -> Tensor:
        return torch.log_softmax(self.logits(hidden), dim=-1)

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        check_targets(type(self).__name__, self.in_features, hidden, targets)
        return chunked_nll(self.logits, hidden, targets, self.vocab_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, backend={self.backend!r}"


class QuantizedLanguageModel(LanguageModel):
    """A LanguageModel in int8 (module doc): ``embedding`` QuantizedEmbedding, ``rnn`` one
    QuantizedLSTM (or a ModuleList of them with residual connections), ``softmax`` QuantizedSoftmax.
    Built from a float model by :func:`quantize_model`; ``config`` is the float model's."""

    def __init__(self, model: LanguageModel, backend: str = "native") -> None:
        nn.Module.__init__(self)
        if not isinstance(model, LanguageModel) or isinstance(model, QuantizedLanguageModel):
            raise TypeError(f"QuantizedLanguageModel converts a float factorlm LanguageModel, got {type(model).__name__}")
        self.config = model.config
        self.backend = check_backend(backend)
        self.embedding = QuantizedEmbedding(model.embedding.weight)
        self.drop = nn.Dropout(model.drop.p)
        if isinstance(model.rnn, nn.ModuleList):
            self.rnn = nn.ModuleList(QuantizedLSTM(layer, backend) for layer in model.rnn)
        else:
            self.rnn = QuantizedLSTM(model.rnn, backend)
        tied = (self.embedding.weight_int8, self.embedding.weight_scale) if model.config.tie_embeddings else None
        self.softmax = QuantizedSoftmax(model.softmax.weight, model.softmax.bias, backend, tied)
        self.eval()

    def init_state(self, batch_size: int, *, device=None, dtype=None):
        """Zero state (h (L, B, p), c (L, B, n)), float32 on the model's device by default."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        kw = dict(device=device or self.embedding.weight_scale.device, dtype=dtype or torch.float32)
        L, p, n = self.config.num_layers, self.config.output_size, self.config.hidden_size
        return torch.zeros(L, batch_size, p, **kw), torch.zeros(L, batch_size, n, **kw)

    def reset_parameters(self) -> None:
        raise NotImplementedError("an int8 model is converted from a trained one (quantize_model), not initialised")

    def loss(self, hidden: Tensor, targets: Tensor, *, sampled: bool | None = None, generator=None) -> Tensor:
        """The exact per-token loss (the int8 model has no sampled softmax: it does not train)."""
        if sampled:
            raise ValueError("an int8 model has the exact softmax only; sampled=True is for training")
        return self.softmax.nll(hidden, targets)

    def train(self, mode: bool = True):
        if mode:
            raise NotImplementedError("an int8 model runs inference only; fine-tune the float model with --qat "
                                      "and quantize it again")
        return super().train(False)

    def rnn_macs_per_token(self) -> int:
        raise NotImplementedError("count the float model's multiply-adds")


def quantize_model(model: LanguageModel, backend: str = "native") -> QuantizedLanguageModel:
    """The int8 model of a trained float LanguageModel (module doc); ``model`` is left unchanged.

    ``backend`` "torchao" needs torchao (the extra ``quant``); "native" runs on PyTorch alone."""
    check_backend(backend)
    if backend == "torchao":
        from factorlm.quant import _torchao

        _torchao.require()
    layers = [m for m in model.modules() if isinstance(m, LSTMBase)]
    if not layers:
        raise TypeError(f"quantize_model expects a factorlm LanguageModel, got {type(model).__name__}")
    return QuantizedLanguageModel(model, backend)


def _plain_tensors(tensor: Tensor):
    """The plain tensors a state-dict value holds: itself, or for a tensor subclass (torchao's int8
    weights) the inner tensors it flattens to (int8 data, scales), whose storage is real."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(tensor, name))
    else:
        yield tensor


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's state dict's tensors (a tensor shared by two names counted once; a tensor
    subclass by the tensors it is made of)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        for tensor in _plain_tensors(value):
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total
