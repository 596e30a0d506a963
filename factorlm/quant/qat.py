"""Quantization-aware training: a LanguageModel whose forward sees the int8 model's rounding.

``enable_qat(model)`` makes, in place and without changing a parameter or a state-dict key:

- every factorlm recurrent module run :func:`factorlm.quant.layers.run_layer` on its own
  parameters with fake quantization (per-output-channel weights, per-token activations, the
  pieces and grids of the int8 model; the per-step PyTorch loop with autograd);
- the embedding's output rows fake-quantized (its int8 table is quantized per row);
- the full softmax's logits computed from the fake-quantized hidden and weight.

Gradients pass the rounding straight through (factorlm.quant.fake). Training is then on the
function that ``factorlm compress quantize`` will compute in int8, to float rounding. Enabled by the
training option ``qat`` (``factorlm train --qat``), typically for a short fine-tuning budget after
float training (``factorlm train --resume --qat`` continues a float run that way). With sampled
softmax the training loss reads the float softmax rows; evaluation (the exact softmax) is
fake-quantized. The state dict is unchanged, so checkpoints, resuming and EMA work as before.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from factorlm.models.softmax import FullSoftmax
from factorlm.nn.base import LSTMBase
from factorlm.ops import circulant
from factorlm.quant.fake import fake_quantize_rows
from factorlm.quant.layers import check_supported, fake_quantize_pieces, float_pieces, layer_kind, run_stack
from factorlm.quant.softmax_ops import check_targets, chunked_nll


def fake_pieces(module: LSTMBase, layer: int) -> dict:
    """The layer's float pieces as the fake-quantized products read them, each weight on its int8
    grid (once per forward); a circulant layer's as dense matrices, whose per-row grids are its
    block rows' (factorlm.quant.layers)."""
    pieces = float_pieces(module, layer)
    if layer_kind(module) == "circulant":
        pieces["weight_ih"] = circulant.dense_matrix(pieces["weight_ih"])
        pieces["weight_hh"] = circulant.dense_matrix(pieces["weight_hh"])
    return fake_quantize_pieces(pieces)


def qat_forward(module: LSTMBase, input: Tensor, hx=None):
    """A recurrent module's forward with fake-quantized products (the int8 model's, in float)."""
    return run_stack(module, layer_kind(module), lambda layer: fake_pieces(module, layer), input, hx)


def _qat_logits(softmax: FullSoftmax, hidden: Tensor) -> Tensor:
    return nn.functional.linear(fake_quantize_rows(hidden), fake_quantize_rows(softmax.weight), softmax.bias)


def _qat_log_probs(softmax: FullSoftmax, hidden: Tensor) -> Tensor:
    return torch.log_softmax(softmax.logits(hidden), dim=-1)


def _qat_nll(softmax: FullSoftmax, hidden: Tensor, targets: Tensor) -> Tensor:
    check_targets(type(softmax).__name__, softmax.in_features, hidden, targets)
    return chunked_nll(softmax.logits, hidden, targets, softmax.vocab_size)


def _fake_quantize_output(module, inputs, output):
    return fake_quantize_rows(output)


def enable_qat(model: nn.Module) -> nn.Module:
    """Switch ``model`` (a LanguageModel) to quantization-aware training in place (module doc);
    returns it. NotImplementedError for a layer the int8 path does not run (bidirectional)."""
    if getattr(model, "_qat_enabled", False):
        return model
    layers = [m for m in model.modules() if isinstance(m, LSTMBase)]
    for layer in layers:  # all checked before any is changed
        check_supported(layer)
    for layer in layers:
        layer.forward = types.MethodType(qat_forward, layer)
    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, nn.Embedding):
        model._qat_hook = embedding.register_forward_hook(_fake_quantize_output)
    softmax = getattr(model, "softmax", None)
    if isinstance(softmax, FullSoftmax):
        softmax.logits = types.MethodType(_qat_logits, softmax)
        softmax.log_probs = types.MethodType(_qat_log_probs, softmax)
        softmax.nll = types.MethodType(_qat_nll, softmax)
    model._qat_enabled = True
    return model


def disable_qat(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_qat` (the float forward again); returns ``model``."""
    if not getattr(model, "_qat_enabled", False):
        return model
    for module in model.modules():
        for name in ("forward", "logits", "log_probs", "nll"):
            module.__dict__.pop(name, None)
    hook = model.__dict__.pop("_qat_hook", None)
    if hook is not None:
        hook.remove()
    model._qat_enabled = False
    return model
