"""Training configuration: a plain dataclass saved in every checkpoint, with named presets.

Loss scale. Both recipes this project reproduces differentiate the per-token cross entropy
*summed over the unrolled steps and averaged over the batch* (Zaremba et al.'s PTB code; the
paper's code multiplies the per-token mean by num_steps). Learning rates and clipping norms
below are at that scale, so the published values apply unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from factorlm.models.config import MODEL_PRESETS, ModelConfig, config_from_dict

OPTIMIZERS = ("adagrad", "sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adagrad"  # "adagrad" (the paper), "sgd" (Zaremba et al.), "adam"
    lr: float = 0.2  # at the sum-over-time loss scale (module docstring)
    adagrad_initial_accumulator: float = 1.0  # the paper's code started Adagrad's accumulator at 1.0
    weight_decay: float = 0.0
    precondition_factors: bool = True  # SGD: scaled-GD steps on F-LSTM factors (FLSTM.precondition_factor_gradients_)
    sparse_gradients: bool = True  # sparse embedding/softmax gradients where exact (see optim.sparse_ok)
    batch_size: int = 128  # rows per batch (per process)
    num_steps: int = 20  # unrolled steps per batch (truncated BPTT window)
    batching: str = "streams"  # "streams": rows of shuffled sentences (the paper); "contiguous": the
    #                            split in corpus order cut into B rows (Zaremba et al.'s PTB setup)
    epochs: int | None = None  # passes over the training split (None: until another budget ends)
    max_steps: int | None = None  # optimizer steps
    max_time: float | None = None  # wall-clock seconds of training (summed over resumes)
    clip_norm: float | None = 1.0  # global-norm gradient clipping (None: off)
    clip_scope: str = "rnn"  # "rnn": recurrent parameters only, as the paper's code; "all"
    lr_decay: float = 1.0  # multiply lr by this once per epoch from lr_decay_start_epoch on
    lr_decay_start_epoch: int = 0  # first (0-based) epoch whose lr is decayed (Zaremba small: 4)
    ema_decay: float = 0.0  # exponential moving average of the weights, used to evaluate (paper: 0.999)
    eval_batch_size: int = 64  # evaluation is exact whatever this is (factorlm.evaluate)
    checkpoint_minutes: float = 30.0  # the paper's code checkpointed every 30 minutes
    log_every: int = 50  # optimizer steps between log records
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, float32 on CPU; "fp32"; "bf16"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.batching not in ("streams", "contiguous"):
            raise ValueError(f"batching must be 'streams' or 'contiguous', got {self.batching!r}")
        if self.clip_scope not in ("rnn", "all"):
            raise ValueError(f"clip_scope must be 'rnn' or 'all', got {self.clip_scope!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("batch_size", "num_steps", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be positive seconds or None, got {self.max_time!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return config_from_dict(cls, data, "train")


def _paper_train() -> TrainConfig:
    # Adagrad lr 0.2 (accumulator 1.0), clip the LSTM gradients at global norm 1.0, 20 steps,
    # batch 128 per GPU, EMA 0.999; the paper trained for a fixed wall-clock time (one week).
    return TrainConfig(optimizer="adagrad", lr=0.2, batch_size=128, num_steps=20, clip_norm=1.0,
                       clip_scope="rnn", ema_decay=0.999)


#: Training recipes by preset name (the model half is MODEL_PRESETS[name]).
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # seconds on a CPU, on the built-in corpus
    "debug": TrainConfig(optimizer="adam", lr=0.003, batch_size=32, num_steps=20, epochs=3,
                         clip_norm=5.0, clip_scope="all", checkpoint_minutes=5.0, log_every=20,
                         eval_batch_size=16),
    # Zaremba et al. 2014 small: SGD lr 1, halved each epoch after epoch 4, 13 epochs, batch 20,
    # 20 steps, clip 5 on all gradients (their loss is summed over time: the same scale as ours)
    "ptb-small": TrainConfig(optimizer="sgd", lr=1.0, batch_size=20, num_steps=20, batching="contiguous", epochs=13, clip_norm=5.0,
                             clip_scope="all", lr_decay=0.5, lr_decay_start_epoch=4, log_every=100),
    # medium: 39 epochs, lr / 1.2 after epoch 6, 35 steps
    "ptb-medium": TrainConfig(optimizer="sgd", lr=1.0, batch_size=20, num_steps=35, batching="contiguous", epochs=39, clip_norm=5.0,
                              clip_scope="all", lr_decay=1 / 1.2, lr_decay_start_epoch=6, log_every=100),
    # large: 55 epochs, lr / 1.15 after epoch 14, 35 steps, clip 10
    "ptb-large": TrainConfig(optimizer="sgd", lr=1.0, batch_size=20, num_steps=35, batching="contiguous", epochs=55, clip_norm=10.0,
                             clip_scope="all", lr_decay=1 / 1.15, lr_decay_start_epoch=14, log_every=100),
    "biglstm": _paper_train(),
    "biglstm-f512": _paper_train(),
    "biglstm-g2": _paper_train(),
    "biglstm-g4": _paper_train(),
    "biglstm-g8": _paper_train(),
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs of a named preset."""
    if name not in TRAIN_PRESETS or name not in MODEL_PRESETS:
        known = sorted(set(TRAIN_PRESETS) & set(MODEL_PRESETS)) or sorted(TRAIN_PRESETS)
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return MODEL_PRESETS[name], TRAIN_PRESETS[name]
