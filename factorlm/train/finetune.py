"""Fine-tuning: a new run that starts from the weights of any checkpoint.

    trainer = finetune_trainer("runs/f-lstm-by-svd", corpus, "runs/f-lstm-tuned", changes={"max_steps": 500, "lr": 0.05})
    trainer.fit()

The source may hold any model factorlm builds (a dense run, an F-LSTM made by SVD, a G-LSTM
made by blocks, a pruned model, a distilled student): its model config is used as it is. The
new run gets the source's training recipe (its TrainConfig; a checkpoint without one gets
TrainConfig's defaults) with the source's budgets dropped and ``changes`` applied, a fresh
optimizer, EMA and data position, and step 0. Pruning masks saved in the source ("prune_masks")
are kept through training (factorlm.compress.masks), and a ``prune_to`` in ``changes`` prunes
further on Zhu & Gupta's schedule. The new run is an ordinary run directory: ``evaluate`` reads
it and ``Trainer.resume`` (``factorlm train --resume``) continues it. The source is only read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from factorlm.data import Corpus, Vocabulary
from factorlm.errors import ConfigError
from factorlm.models import ModelConfig
from factorlm.runs import check_weights_fit
from factorlm.train.checkpoint import load_checkpoint, saved_model_config, saved_train_config
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer
from factorlm.train.resume import BUDGETS

__all__ = ["finetune_config", "finetune_trainer", "start_from", "checkpoint_file", "without_pruning", "without_budgets",
           "require_budget", "PRUNE_SETTINGS"]

#: the TrainConfig settings of gradual pruning
PRUNE_SETTINGS = ("prune_to", "prune_from", "prune_start", "prune_steps", "prune_every", "prune_scope")


def checkpoint_file(source) -> Path:
    """The checkpoint file a run directory or a file path names."""
    path = Path(source)
    return path / "checkpoint.pt" if path.is_dir() else path


def without_pruning(config: TrainConfig) -> TrainConfig:
    """``config`` with the default (no) pruning schedule: a trained run's schedule is not repeated by
    a run that starts from it (its masks are kept anyway), unless that run asks for one."""
    defaults = TrainConfig()
    return config.replace(**{name: getattr(defaults, name) for name in PRUNE_SETTINGS})


def without_budgets(config: TrainConfig) -> TrainConfig:
    """``config`` with no budget: a source's budgets were for training it, not for a run started from it."""
    return config.replace(**{name: None for name in BUDGETS})


def require_budget(config: TrainConfig, what: str) -> TrainConfig:
    """``config`` if it has a budget (max_steps, max_time or epochs), else ConfigError naming ``what``."""
    if all(getattr(config, name) is None for name in BUDGETS):
        raise ConfigError(f"{what} needs a budget of its own: give max_steps, max_time or epochs "
                          "(--max-steps, --max-time, --epochs)")
    return config


def finetune_config(payload: Mapping, path, changes: Mapping | None = None) -> TrainConfig:
    """The fine-tuning run's TrainConfig: the source's recipe without its budgets and its pruning
    schedule (:func:`without_pruning`), with ``changes``.

    ConfigError when no budget (max_steps, max_time, epochs) is given: the source's budget was
    for training from scratch, not for this run.
    """
    base = saved_train_config(payload, path) if payload.get("train_config") is not None else TrainConfig()
    config = without_budgets(without_pruning(base))
    try:
        config = config.replace(**dict(changes or {}))
    except TypeError as exc:
        raise ConfigError(f"fine-tuning: {exc}") from None
    return require_budget(config, "fine-tuning")


def finetune_trainer(source, corpus: Corpus, out_dir, *, changes: Mapping | None = None, use_ema: bool = True,
                     checkpoint: dict | None = None, device: str | None = None, show_progress: bool = True,
                     trainer_class: type[Trainer] = Trainer) -> Trainer:
    """A new run in ``out_dir`` starting from the model in ``source`` (a run directory or checkpoint file).

    use_ema: start from the averaged weights when the source kept them (those ``evaluate``
    scores); else its raw weights. checkpoint: ``source``'s payload already loaded. The corpus
    must have the source's vocabulary. ``out_dir`` may not be the source's directory.
    """
    path = checkpoint_file(source)
    payload = checkpoint if checkpoint is not None else load_checkpoint(path)
    model_config, init = start_from(path, corpus, out_dir, use_ema=use_ema, checkpoint=payload)
    train_config = finetune_config(payload, path, changes)
    return trainer_class(model_config, train_config, corpus, out_dir, device=device, show_progress=show_progress,
                         init_from=init)


def start_from(source, corpus: Corpus, out_dir, *, use_ema: bool = True, checkpoint: dict | None = None,
               what: str = "fine-tuning") -> tuple[ModelConfig, dict]:
    """(model config, ``init_from``) of a new run in ``out_dir`` that starts from the model in
    ``source`` (a run directory or checkpoint file): its architecture, its weights (the averaged
    ones when kept and ``use_ema``) and its pruning masks, for ``Trainer(..., init_from=...)``.

    Refused (one-line ConfigError / CheckpointError): an ``out_dir`` that is the source's directory,
    weights that do not fit the saved config, a vocabulary that is not the corpus's. ``what``: the
    run being started, for the messages.
    """
    path = checkpoint_file(source)
    payload = checkpoint if checkpoint is not None else load_checkpoint(path)
    if Path(out_dir).resolve() == path.parent.resolve():
        raise ConfigError(f"{what} writes a new run: --out {out_dir} is the directory of the checkpoint "
                          f"{path} it starts from, which is never overwritten; choose another --out")
    model_config = saved_model_config(payload, path)
    vocab = Vocabulary.from_dict(payload["vocab"])
    check_weights_fit(model_config, payload, path, vocab_size=len(vocab))
    vocab.check_same(corpus.vocab, name=f"checkpoint {path}", other_name=f"the corpus {corpus.name!r}",
                     hint=f"; {what} runs on the data it was trained with")
    weights = dict(payload["model"])
    averaged = bool(use_ema and payload.get("ema"))
    if averaged:
        weights.update(payload["ema"])
    origin = {"checkpoint": str(path.resolve()), "step": payload.get("step"), "weights": "ema" if averaged else "raw"}
    return model_config, {"model": weights, "prune_masks": payload.get("prune_masks"), "origin": origin}
