"""Language models built from factorlm.nn layers: the model config, softmax heads (presets: factorlm.configs)."""

from factorlm.models.config import ModelConfig, build_rnn
from factorlm.models.lm import LanguageModel, State, detach_state
from factorlm.models.softmax import CandidateSample, FullSoftmax, LogUniformSampler, SampledSoftmax, sampled_softmax_nll

__all__ = [
    "ModelConfig",
    "build_rnn",
    "LanguageModel",
    "State",
    "detach_state",
    "FullSoftmax",
    "SampledSoftmax",
    "LogUniformSampler",
    "CandidateSample",
    "sampled_softmax_nll",
]
