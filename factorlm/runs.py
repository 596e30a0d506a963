"""Loading what a training run produced: the model and vocabulary stored in a checkpoint."""

from __future__ import annotations

from factorlm.data import Vocabulary
from factorlm.models import LanguageModel, ModelConfig
from factorlm.errors import CheckpointError
from factorlm.train.checkpoint import load_checkpoint


def load_model(path, *, device="cpu", use_ema: bool = True) -> tuple[LanguageModel, Vocabulary, dict]:
    """(model in eval mode, vocabulary, checkpoint payload). With use_ema, the averaged weights if saved."""
    payload = load_checkpoint(path, map_location=device)
    config = ModelConfig.from_dict(payload["model_config"])
    model = LanguageModel(config).to(device)
    try:
        model.load_state_dict(payload["model"])
        if use_ema and payload.get("ema"):
            model.load_state_dict(payload["ema"], strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, Vocabulary.from_dict(payload["vocab"]), payload
