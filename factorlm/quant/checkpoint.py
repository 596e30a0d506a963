"""int8 runs on disk: the one checkpoint format (factorlm.train.checkpoint), marked as quantized.

An int8 checkpoint is a float run's checkpoint with ``model`` replaced by the int8 model's state
dict (int8 tensors and float32 scales and biases), no optimizer, EMA or training position, and

    quantization   {"scheme": "int8-dynamic", "weights": "per-channel symmetric",
                    "activations": "per-token dynamic symmetric", "backend": "native" | "torchao",
                    "source": the float checkpoint's path, "float_bytes": ..., "int8_bytes": ...}

Whatever loads a model (factorlm.runs.load_model: evaluate, score, generate) sees the marker and
rebuilds the int8 model: the float model's skeleton on the meta device (nothing allocated), its
int8 conversion, then the stored tensors. A resumed run refuses the file (no optimizer state).
"""

from __future__ import annotations

import torch

from factorlm.errors import CheckpointError
from factorlm.models import LanguageModel
from factorlm.quant.model import BACKENDS, QuantizedLanguageModel, state_bytes

#: the key that marks a checkpoint as int8
KEY = "quantization"
SCHEME = "int8-dynamic"


def quantized_payload(model: QuantizedLanguageModel, source: dict, source_path, float_bytes: int) -> dict:
    """The checkpoint dict of ``model``, converted from the float run ``source`` (its loaded payload)."""
    kept = {key: source[key] for key in ("model_config", "train_config", "vocab", "data_path", "step", "epoch",
                                         "elapsed", "tokens") if key in source}
    info = {"scheme": SCHEME, "weights": "per-channel symmetric int8",
            "activations": "per-token dynamic symmetric int8", "backend": model.backend,
            "source": str(source_path), "float_bytes": float_bytes, "int8_bytes": state_bytes(model)}
    return {**kept, "model": model.state_dict(), "ema": None, KEY: info}


def is_quantized(payload: dict) -> bool:
    return payload.get(KEY) is not None


def load_quantized_model(payload: dict, config, path, device="cpu") -> QuantizedLanguageModel:
    """The int8 model stored in ``payload`` (a loaded checkpoint), on ``device``, in eval mode.

    CheckpointError (one line, naming the file) for an unknown scheme or backend, or tensors that
    do not fit the config; SetupError naming the extra when the backend is torchao and it is missing.
    """
    info = payload[KEY]
    vocab_size = len(payload["vocab"].get("words", ())) if isinstance(payload["vocab"], dict) else None
    if vocab_size != config.vocab_size:
        raise CheckpointError(f"checkpoint {path}: its vocabulary has {vocab_size} words but its model config says "
                              f"vocab_size={config.vocab_size}; the file is damaged or was edited")
    if not isinstance(info, dict) or info.get("scheme") != SCHEME or info.get("backend") not in BACKENDS:
        raise CheckpointError(f"checkpoint {path}: unknown quantization {info!r}; this factorlm reads scheme "
                              f"{SCHEME!r} with a backend in {BACKENDS}")
    if info["backend"] == "torchao":
        from factorlm.quant import _torchao

        _torchao.require()
    with torch.device("meta"):
        model = QuantizedLanguageModel(LanguageModel(config), info["backend"])
    _check_tensors(model, payload["model"], path)  # before anything is allocated
    model = model.to_empty(device=device)
    model.load_state_dict(payload["model"])
    if config.tie_embeddings:  # to_empty gave the two names their own tensors: one again, as saved
        model.softmax.weight_int8, model.softmax.weight_scale = model.embedding.weight_int8, model.embedding.weight_scale
    return model.eval()


def _check_tensors(model: QuantizedLanguageModel, stored, path) -> None:
    """CheckpointError naming the first problem unless ``stored`` has exactly the model's tensors
    (names, shapes, dtypes)."""
    expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    if not isinstance(stored, dict) or not all(isinstance(t, torch.Tensor) for t in stored.values()):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a mapping of weight tensors")
    problems = [f"{name} is missing" for name in expected if name not in stored]
    problems += [f"{name} is not part of the model" for name in stored if name not in expected]
    problems += [f"{name} is stored as {tuple(stored[name].shape)} {stored[name].dtype} but the config needs "
                 f"{shape} {dtype}" for name, (shape, dtype) in expected.items()
                 if name in stored and (tuple(stored[name].shape), stored[name].dtype) != (shape, dtype)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {path}: its int8 weights do not fit its model config: {problems[0]}{more}; "
                              f"the file is damaged or was edited")
