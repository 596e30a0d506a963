"""Training configuration: a plain dataclass saved in every checkpoint (presets: factorlm.configs).

Loss scale. Both recipes this project reproduces differentiate the per-token cross entropy
*summed over the unrolled steps and averaged over the batch* (Zaremba et al.'s PTB code; the
paper's code multiplies the per-token mean by num_steps). The presets' learning rates and clipping
norms (factorlm.configs) are at that scale, so the published values apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from factorlm.config_base import ConfigBase
from factorlm.validate import check_fraction, check_int, check_real

OPTIMIZERS = ("adagrad", "sgd", "adam")


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    kind: ClassVar[str] = "train"

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
    qat: bool = False  # quantization-aware training: the int8 model's rounding in the forward (factorlm.quant.qat)
    # gradual magnitude pruning on Zhu & Gupta's cubic schedule (factorlm.compress.masks); off when prune_to is None
    prune_to: float | None = None  # s_f: the final sparsity of each pruned matrix, in (0, 1)
    prune_from: float = 0.0  # s_i: the sparsity of the first pruning event, in [0, prune_to)
    prune_start: int = 0  # t0: the step after which the first event prunes (0: before the first step)
    prune_steps: int = 1000  # n·Δt: steps from the first event to the last, where s_f is reached
    prune_every: int = 100  # Δt: steps between pruning events
    prune_scope: str = "rnn"  # "rnn": the recurrent layers' weight matrices; "all": embedding and softmax too

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
            check_int(name, getattr(self, name))
        check_real("lr", self.lr)
        check_real("lr_decay", self.lr_decay)
        check_int("lr_decay_start_epoch", self.lr_decay_start_epoch, 0)
        check_real("weight_decay", self.weight_decay, strict=False)
        check_real("adagrad_initial_accumulator", self.adagrad_initial_accumulator, strict=False)
        check_real("clip_norm", self.clip_norm, optional=True, note="(None: no clipping)")
        check_fraction("ema_decay", self.ema_decay, include_one=False)  # 1 would never move the average
        for name in ("epochs", "max_steps"):
            check_int(name, getattr(self, name), optional=True)
        check_real("max_time", self.max_time, optional=True, allow_inf=True, note="(seconds)")
        check_real("checkpoint_minutes", self.checkpoint_minutes, strict=False, allow_inf=True,
                   note="(0: after every step; inf: only at the end)")
        check_int("seed", self.seed, 0)
        if not isinstance(self.qat, bool):
            raise ValueError(f"qat must be true or false, got {self.qat!r}")
        if self.prune_to is not None:
            if check_fraction("prune_to", self.prune_to, include_one=False) == 0:
                raise ValueError("prune_to must be a sparsity in (0, 1), got 0 (None: no pruning)")
            if not 0 <= check_fraction("prune_from", self.prune_from, include_one=False) < self.prune_to:
                raise ValueError(f"prune_from must be in [0, prune_to={self.prune_to}), got {self.prune_from!r}")
        check_int("prune_start", self.prune_start, 0)
        check_int("prune_steps", self.prune_steps)
        check_int("prune_every", self.prune_every)
        if self.prune_scope not in ("rnn", "all"):
            raise ValueError(f"prune_scope must be 'rnn' or 'all', got {self.prune_scope!r}")
