"""Model configuration: a plain dataclass saved in every checkpoint, plus named presets."""

from __future__ import annotations

import dataclasses
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
    residual: bool = False  # add each layer's input to its output (when sizes agree)
    extra: dict = field(default_factory=dict, compare=False)  # room for later options

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.cell == "flstm" and self.rank is None:
            raise ValueError("cell='flstm' needs a rank (one int, or one per layer)")
        if self.cell == "glstm" and self.groups is None:
            raise ValueError("cell='glstm' needs groups (one int, or one per layer)")

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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(names)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


def build_rnn(config: ModelConfig, **overrides) -> nn.Module:
    """The stack of recurrent layers the config describes, as one factorlm.nn module."""
    kwargs = dict(
        num_layers=config.num_layers,
        dropout=config.dropout if config.num_layers > 1 else 0.0,
        proj_size=config.proj_size,
        forget_bias=config.forget_bias,
    )
    kwargs.update(overrides)
    args = (config.embedding_size, config.hidden_size)
    if config.cell == "flstm":
        return FLSTM(*args, rank=config.rank, **kwargs)
    if config.cell == "glstm":
        return GLSTM(*args, groups=config.groups, **kwargs)
    return LSTM(*args, **kwargs)


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

MODEL_PRESETS: dict[str, ModelConfig] = dict(PAPER_PRESETS)


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}") from None
