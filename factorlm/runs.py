"""Loading what a training run produced: the model and vocabulary stored in a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from factorlm.data import Vocabulary
from factorlm.errors import CheckpointError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.train.checkpoint import load_checkpoint, saved_model_config


def load_model(path, *, device="cpu", use_ema: bool = True, checkpoint: dict | None = None
               ) -> tuple[LanguageModel, Vocabulary, dict]:
    """(model in eval mode, vocabulary, checkpoint payload). With use_ema, the averaged weights if saved.

    checkpoint: ``path``'s payload already loaded by the caller (read once, not twice). An int8
    checkpoint (factorlm.quant.checkpoint) gives its factorlm.quant.QuantizedLanguageModel; a run
    trained with ``qat`` its float model with the fake-quantized forward it trained with. A ``.onnx``
    file written by ``factorlm export onnx`` gives its graph in onnxruntime
    (factorlm.export.OnnxLanguageModel, with the vocabulary kept in it) and the payload
    ``{"onnx": path}``."""
    if checkpoint is None and str(path).endswith(".onnx"):
        return _load_onnx(path)
    payload = checkpoint if checkpoint is not None else load_checkpoint(path, map_location=device)
    config = saved_model_config(payload, path)
    vocab = Vocabulary.from_dict(payload["vocab"])
    if payload.get("quantization") is not None:  # an int8 run, written by factorlm.quant
        from factorlm.quant.checkpoint import load_quantized_model

        return load_quantized_model(payload, config, path, device=device), vocab, payload
    check_weights_fit(config, payload, path, vocab_size=len(vocab))
    model = LanguageModel(config).to(device)
    try:
        model.load_state_dict(payload["model"])
        if use_ema and payload.get("ema"):
            model.load_state_dict(payload["ema"], strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config ({str(exc).splitlines()[0]})") from None
    model.eval()
    if (payload.get("train_config") or {}).get("qat"):  # a QAT run is scored as it trained: fake-quantized
        from factorlm.quant.qat import enable_qat

        enable_qat(model)
    return model, vocab, payload


def _load_onnx(path):
    from factorlm.export.runtime import OnnxLanguageModel

    try:
        model = OnnxLanguageModel(path)
    except (FileNotFoundError, ValueError) as exc:  # a missing file, or one that is no factorlm graph
        raise CheckpointError(str(exc)) from None
    if model.vocab is None:
        raise CheckpointError(f"{path} holds no vocabulary (exported by to_onnx without vocab=); export it again "
                              f"with factorlm export onnx, which keeps the run's")
    return model, model.vocab, {"onnx": str(path)}


def check_weights_fit(config: ModelConfig, payload: dict, path, *, vocab_size: int | None = None) -> None:
    """CheckpointError unless the weights stored in ``payload`` are exactly those ``config``
    describes (names and shapes; the EMA's a subset of them).

    Runs before the model is allocated: the shapes come from a model built on the meta device,
    so a damaged or forged config (a vocabulary of 10^11 words) is refused by comparison with the
    tensors actually stored, instead of by trying to allocate terabytes.
    """
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise CheckpointError(f"checkpoint {path}: its vocabulary has {vocab_size:,} words but its model config "
                              f"says vocab_size={config.vocab_size:,}; the file is damaged or was edited")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LanguageModel(config).state_dict().items()}
    for key, strict in (("model", True), ("ema", False)):
        weights = payload.get(key)
        if weights is None and key == "ema":
            continue
        if not isinstance(weights, Mapping) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise CheckpointError(f"checkpoint {path}: {key!r} is not a mapping of weight tensors")
        problems = [f"{name} is not part of the model" for name in weights if name not in expected]
        if strict:
            problems += [f"{name} is missing" for name in expected if name not in weights]
        problems += [f"{name} is stored as {_shape(weights[name].shape)} but the config needs {_shape(shape)}"
                     for name, shape in expected.items() if name in weights and tuple(weights[name].shape) != shape]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"checkpoint {path}: its {key} weights do not fit its model config: "
                                  f"{problems[0]}{more}; the file is damaged or was edited")


def _shape(shape) -> str:
    return " x ".join(f"{n:,}" for n in shape) or "a scalar"
