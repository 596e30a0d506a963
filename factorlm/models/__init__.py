"""Language models built from factorlm.nn layers: configs, presets, softmax heads."""

from factorlm.models.config import MODEL_PRESETS, PAPER_PRESETS, ModelConfig, build_rnn, model_preset
from factorlm.models.lm import LanguageModel, State, detach_state
from factorlm.models.softmax import CandidateSample, FullSoftmax, LogUniformSampler, SampledSoftmax, sampled_softmax_nll

__all__ = [
    "ModelConfig",
    "MODEL_PRESETS",
    "PAPER_PRESETS",
    "build_rnn",
    "model_preset",
    "LanguageModel",
    "State",
    "detach_state",
    "FullSoftmax",
    "SampledSoftmax",
    "LogUniformSampler",
    "CandidateSample",
    "sampled_softmax_nll",
]
