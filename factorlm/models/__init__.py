"""Language models built from factorlm.nn layers: configs, presets, softmax heads."""

from factorlm.models.config import MODEL_PRESETS, PAPER_PRESETS, ModelConfig, build_rnn, model_preset

__all__ = ["ModelConfig", "MODEL_PRESETS", "PAPER_PRESETS", "build_rnn", "model_preset"]
