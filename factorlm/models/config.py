"""Model configuration: a plain dataclass saved in every checkpoint (presets: factorlm.configs)."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from torch import nn

from factorlm.config_base import ConfigBase
from factorlm.errors import ConfigError
from factorlm.nn.registry import cell_arg_declarations, cell_class, check_cell_args
from factorlm.validate import check_fraction, check_int


def _cell_arg_keywords(cls):
    """Let ``ModelConfig(cell="flstm", rank=512)`` stand for ``cell_args={"rank": 512}``.

    The config had ``rank`` and ``groups`` fields before ``cell_args``; code and checkpoints that
    use them keep working. A keyword that names an argument of any registered cell goes into
    cell_args when ``cell`` takes it (replacing a value there), and is dropped when it is None or
    an argument of another cell, which is what the old fields meant. ``cell_args`` itself is strict.
    """
    generated = cls.__init__
    fields = {f.name for f in dataclasses.fields(cls)}
    default_cell = cls.__dataclass_fields__["cell"].default

    @functools.wraps(generated)
    def __init__(self, **kwargs):
        declared = cell_arg_declarations()
        loose = {name: kwargs.pop(name) for name in list(kwargs) if name not in fields and name in declared}
        if loose:
            takes = {arg.name for arg in cell_class(kwargs.get("cell", default_cell)).cell_args}
            given = {name: value for name, value in loose.items() if value is not None and name in takes}
            kwargs["cell_args"] = {**(kwargs.get("cell_args") or {}), **given}
        generated(self, **kwargs)

    cls.__init__ = __init__
    return cls


@_cell_arg_keywords
@dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigBase):
    """A word-level LSTM language model: embedding -> recurrent layers -> softmax.

    ``config.rank``, ``config.groups`` (any registered cell's argument name) read
    ``cell_args.get(name)``: None when this cell does not take it.
    """

    kind: ClassVar[str] = "model"

    vocab_size: int = 10_000  # V, including the sentence boundary and <UNK>
    embedding_size: int = 200  # E = p_in of the first layer
    hidden_size: int = 200  # n: cells per layer
    proj_size: int = 0  # p: LSTMP projection size (0: none, h has n units)
    num_layers: int = 2
    # a name in factorlm.nn.CELLS: "lstm" (LSTMP baseline), "flstm" (F-LSTM), "glstm" (G-LSTM), "gflstm" (G∘F-LSTM),
    # "circulant" (C-LSTM), "diagonal" (IndyLSTM)
    cell: str = "lstm"
    # the cell's own constructor arguments, as its class declares them (factorlm.nn.cell_args):
    # {"rank": r} for flstm, {"groups": k} for glstm, both for gflstm, an int or one per layer; {} for lstm
    cell_args: Mapping = field(default_factory=dict, hash=False)
    forget_bias: float = 0.0  # constant added to the forget gate (the paper's code: 1.0)
    # couple the input and forget gates (CIFG, Greff et al. 2017: f = 1 - i, 3 gate blocks instead of 4,
    # any cell type); forget_bias then lowers the input gate's pre-activation (factorlm.nn.base.LSTMBase)
    coupled_gates: bool = False
    # one gate map of n rows for all gates, each gate g scaled per cell and shifted: s_g ⊙ a + b_g (any cell
    # type, G× fewer gate weights; factorlm.nn.base.LSTMBase)
    shared_gates: bool = False
    # rank r of the projection's factors W_hr = P2·P1 (an int or one per layer; needs proj_size > 0 and
    # 0 < r < min(hidden_size, proj_size)); None: a dense projection
    proj_rank: int | tuple[int, ...] | None = None
    dropout: float = 0.0  # dropout on the embedding and every layer output (paper: 1 - keep_prob = 0.1)
    num_sampled: int = 0  # sampled-softmax candidates for training (0: full softmax)
    tie_embeddings: bool = False  # share the input embedding with the softmax weights (needs p == E)
    residual: bool = False  # add each layer's input to its output (needs embedding_size == output size)
    init_scale: float | None = None  # every parameter ~ U(-s, s) as Zaremba et al.; None: per-part defaults

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell_args", check_cell_args(self.cell, self.cell_args))
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers"):
            check_int(name, getattr(self, name))
        check_int("proj_size", self.proj_size, 0)
        check_int("num_sampled", self.num_sampled, 0, note="(0: full softmax)")
        # [0, 1): the dropout also applies to the embedding, and p = 1 would feed the model zeros
        check_fraction("dropout", self.dropout, include_one=False)
        if not isinstance(self.coupled_gates, bool):
            raise ValueError(f"coupled_gates must be true or false, got {self.coupled_gates!r}")
        if not isinstance(self.shared_gates, bool):
            raise ValueError(f"shared_gates must be true or false, got {self.shared_gates!r}")
        if isinstance(self.proj_rank, list):  # JSON has no tuples
            object.__setattr__(self, "proj_rank", tuple(self.proj_rank))
        if self.proj_rank is not None and not self.proj_size:
            raise ValueError(f"proj_rank={self.proj_rank!r} factors the projection, which needs proj_size > 0; "
                             f"got proj_size=0")
        if self.init_scale is not None and (
            isinstance(self.init_scale, bool)
            or not isinstance(self.init_scale, (int, float))
            or not math.isfinite(self.init_scale)
            or self.init_scale <= 0
        ):
            raise ValueError(f"init_scale must be a positive number or None, got {self.init_scale!r}")

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails: config.rank and the like read cell_args.
        if name in cell_arg_declarations():
            return self.__dict__.get("cell_args", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def output_size(self) -> int:
        """Size of the last layer's output, the softmax input."""
        return self.proj_size or self.hidden_size

    @classmethod
    def accepted_keys(cls) -> set[str]:
        """The fields, and every registered cell's argument names (the old flat form, "rank": 512)."""
        return super().accepted_keys() | set(cell_arg_declarations())

    @classmethod
    def from_dict(cls, data: Mapping) -> "ModelConfig":
        """As ConfigBase.from_dict; also reads the dicts of checkpoints written before cell_args, whose
        ``rank`` / ``groups`` keys become cell_args and whose (always empty) ``extra`` is dropped."""
        if isinstance(data, Mapping) and "extra" in data:
            data = dict(data)
            extra = data.pop("extra")
            if extra:
                raise ConfigError(f"model config key 'extra' is no longer used, got extra={extra!r}")
        return super().from_dict(data)


def build_rnn(config: ModelConfig, **overrides) -> nn.Module:
    """The stack of recurrent layers the config describes, as one factorlm.nn module.

    ``overrides`` replace constructor arguments (``num_layers``, ``dropout``, a cell argument such
    as ``rank``, ...); ``input_size`` (default: the embedding size) sets the first layer's input size.
    """
    kwargs = dict(
        num_layers=config.num_layers,
        dropout=config.dropout if config.num_layers > 1 else 0.0,
        proj_size=config.proj_size,
        forget_bias=config.forget_bias,
        coupled_gates=config.coupled_gates,
        shared_gates=config.shared_gates,
        proj_rank=config.proj_rank,
        **config.cell_args,
    )
    kwargs.update(overrides)
    input_size = kwargs.pop("input_size", config.embedding_size)
    return cell_class(config.cell)(input_size, config.hidden_size, **kwargs)
