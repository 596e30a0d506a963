"""Model configuration: a plain dataclass saved in every checkpoint, plus named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import nn

from factorlm.nn import FLSTM, GLSTM, LSTM

CELLS = ("lstm", "flstm", "glstm")


@dataclass(frozen=True)
class ModelConfig:
    """A word-level LSTM language model: embedding -> recurrent layers -> softmax."""

    vocab_size: int = 10_000  # V, including the sentence boundary and <UNK>
    embedding_size: int = 200  # E = p_in of the first layer
    hidden_size: int = 200  # n: cells per layer
    proj_size: int = 0  # p: LSTMP projection size (0: none, h has n units)
    num_layers: int = 2
    cell: str = "lstm"  # "lstm" (LSTMP baseline), "flstm" (F-LSTM) or "glstm" (G-LSTM)
    rank: int | tuple[int, ...] | None = None  # F-LSTM factorization rank r (per layer allowed)
    groups: int | tuple[int, ...] | None = None  # G-LSTM groups k (per layer: hierarchical groups)
    forget_bias: float = 0.0  # constant added to the forget gate (the paper's code: 1.0)
    dropout: float = 0.0  # dropout on the embedding and every layer output (paper: 1 - keep_prob = 0.1)
    num_sampled: int = 0  # sampled-softmax candidates for training (0: full softmax)
    tie_embeddings: bool = False  # share the input embedding with the softmax weights (needs p == E)
    residual: bool = False  # add each layer's input to its output (needs embedding_size == output size)
    init_scale: float | None = None  # every parameter ~ U(-s, s) as Zaremba et al.; None: per-part defaults
    extra: dict = field(default_factory=dict, compare=False)  # room for later options

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.cell == "flstm" and self.rank is None:
            raise ValueError("cell='flstm' needs a rank (one int, or one per layer)")
        if self.cell == "glstm" and self.groups is None:
            raise ValueError("cell='glstm' needs groups (one int, or one per layer)")
        if self.init_scale is not None and (
            isinstance(self.init_scale, bool)
            or not isinstance(self.init_scale, (int, float))
            or not math.isfinite(self.init_scale)
            or self.init_scale <= 0
        ):
            raise ValueError(f"init_scale must be a positive number or None, got {self.init_scale!r}")

    @property
    def output_size(self) -> int:
        """Size of the last layer's output, the softmax input."""
        return self.proj_size or self.hidden_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return config_from_dict(cls, data, "model")


def config_from_dict(cls, data: dict, kind: str):
    """A config dataclass from a dict (a checkpoint's or a JSON file's); unknown keys are errors.

    Lists become tuples (JSON has no tuples; per-layer ranks/groups are tuples).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {kind} config keys {unknown}; known keys: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_rnn(config: ModelConfig, **overrides) -> nn.Module:
    """The stack of recurrent layers the config describes, as one factorlm.nn module.

    ``overrides`` replace constructor arguments (``num_layers``, ``dropout``, ``rank``, ...);
    ``input_size`` (default: the embedding size) sets the first layer's input size.
    """
    kwargs = dict(
        num_layers=config.num_layers,
        dropout=config.dropout if config.num_layers > 1 else 0.0,
        proj_size=config.proj_size,
        forget_bias=config.forget_bias,
    )
    if config.cell == "flstm":
        kwargs["rank"] = config.rank
    elif config.cell == "glstm":
        kwargs["groups"] = config.groups
    kwargs.update(overrides)
    input_size = kwargs.pop("input_size", config.embedding_size)
    layer_class = {"lstm": LSTM, "flstm": FLSTM, "glstm": GLSTM}[config.cell]
    return layer_class(input_size, config.hidden_size, **kwargs)


def _paper(cell: str = "lstm", **kw) -> ModelConfig:
    """The paper's 1B Word models: 2 layers, emb = proj = 1024, cells 8192, 8192 samples."""
    return ModelConfig(
        vocab_size=793_470,
        embedding_size=1024,
        hidden_size=8192,
        proj_size=1024,
        num_layers=2,
        cell=cell,
        forget_bias=1.0,
        dropout=0.1,
        num_sampled=8192,
        **kw,
    )


#: The paper's models (Kuchaiev & Ginsburg 2017, Table 1), vocabulary of the original code's vocab file.
PAPER_PRESETS: dict[str, ModelConfig] = {
    "biglstm": _paper(),
    "biglstm-f512": _paper("flstm", rank=512),
    "biglstm-g2": _paper("glstm", groups=2),
    "biglstm-g4": _paper("glstm", groups=4),
    "biglstm-g8": _paper("glstm", groups=8),
}

#: Small models. vocab_size is a placeholder: training replaces it with the corpus's vocabulary.
#: The PTB models are Zaremba et al. 2014 (arXiv 1409.2329): plain LSTM cells without projection,
#: no forget-gate constant, every parameter U(-init_scale, init_scale), full softmax.
SMALL_PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU for the built-in corpus
    "debug": ModelConfig(vocab_size=1_000, embedding_size=64, hidden_size=64, num_layers=2),
    "ptb-small": ModelConfig(vocab_size=10_000, embedding_size=200, hidden_size=200, num_layers=2, init_scale=0.1),
    "ptb-medium": ModelConfig(
        vocab_size=10_000, embedding_size=650, hidden_size=650, num_layers=2, dropout=0.5, init_scale=0.05
    ),
    "ptb-large": ModelConfig(
        vocab_size=10_000, embedding_size=1500, hidden_size=1500, num_layers=2, dropout=0.65, init_scale=0.04
    ),
}

MODEL_PRESETS: dict[str, ModelConfig] = {**SMALL_PRESETS, **PAPER_PRESETS}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}") from None
