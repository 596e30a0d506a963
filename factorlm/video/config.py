"""The settings of a ``factorlm video`` run: one frozen dataclass, saved in its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from factorlm.config_base import ConfigBase
from factorlm.data.moving_digits import SOURCES
from factorlm.errors import ConfigError
from factorlm.nn.convlstm import GATES
from factorlm.validate import check_int, check_real


@dataclass(frozen=True)
class VideoConfig(ConfigBase):
    kind: ClassVar[str] = "video"

    # data (factorlm.data.moving_digits)
    source: str = "auto"  # "digits" (scikit-learn's), "shapes" (procedural), "auto": digits if installed
    canvas: int = 64  # frame side in pixels; a multiple of patch
    digit_size: int | None = None  # sprite side (None: 24 on a 64 canvas, scaled with it)
    num_digits: int = 2  # sprites per sequence
    frames_in: int = 10  # frames seen
    frames_out: int = 10  # frames predicted
    valid_sequences: int = 128  # fixed valid sequences (indices 0 …), evaluated at the end
    test_sequences: int = 256  # fixed test sequences, evaluated at the end
    # model (factorlm.video.model)
    gates: str = "dense"  # ConvLSTM gate map: dense, separable, grouped, bottleneck
    hidden_channels: tuple[int, ...] = (32, 32)  # one per ConvLSTM layer
    kernel_size: int = 5  # odd
    groups: int | None = None  # gates="grouped" only
    rank: int | None = None  # gates="bottleneck" only
    peephole: bool = False
    patch: int = 4  # frames enter as patch × patch pixel blocks (space to depth), as PredRNN does
    encoder_channels: int = 16  # channels of the 3×3 encoder convolution over the patches
    # training
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    clip_norm: float | None = 1.0  # global gradient norm clipping (None: off)
    seed: int = 0  # data (sprite split and every sequence) and initial weights
    max_steps: int | None = None  # budgets: whichever ends first stops training
    max_time: float | None = None  # training seconds, summed over resumes
    checkpoint_minutes: float = 10.0
    log_every: int = 20  # steps between log records

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.gates not in GATES:
            raise ConfigError(f"gates must be one of {', '.join(GATES)}, got {self.gates!r}")
        for name in ("canvas", "num_digits", "frames_in", "frames_out", "valid_sequences", "test_sequences",
                     "kernel_size", "patch", "encoder_channels", "batch_size", "log_every"):
            check_int(name, getattr(self, name))
        check_int("digit_size", self.digit_size, optional=True)
        check_int("seed", self.seed, 0)
        check_int("max_steps", self.max_steps, optional=True)
        check_real("max_time", self.max_time, optional=True)
        check_real("lr", self.lr)
        check_real("clip_norm", self.clip_norm, optional=True)
        check_real("checkpoint_minutes", self.checkpoint_minutes, 0.0, strict=False, allow_inf=True)
        hidden = self.hidden_channels
        if not isinstance(hidden, tuple) or not hidden:
            raise ConfigError(f"hidden_channels must be a tuple of one int per layer, got {hidden!r}")
        for i, c in enumerate(hidden):
            check_int(f"hidden_channels[{i}]", c)
        if self.canvas % self.patch:
            raise ConfigError(f"canvas {self.canvas} must be a multiple of patch {self.patch}")
