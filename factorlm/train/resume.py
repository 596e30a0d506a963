"""What may change when a run is resumed, and the check that nothing else does.

A resumed run continues the saved one exactly (same model, data order, optimizer, seed), so its
losses are those of an uninterrupted run. Settings that do not change what is computed may be
given anew:

    max_steps, max_time, epochs     the budgets: a longer (or shorter) run
    log_every, checkpoint_minutes   how often it reports and saves
    eval_batch_size                 evaluation is exact whatever it is
    qat                             quantization-aware fine-tuning from here on (factorlm.quant.qat):
                                    it changes the forward, not the state, and is announced

Any other setting asked for with a resume must equal the saved one: a different value is refused
(one ConfigError naming each), never silently ignored. Repeating a run's original options with
``--resume`` added is therefore fine.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from factorlm.errors import ConfigError
from factorlm.models.config import ModelConfig
from factorlm.nn.registry import cell_arg_declarations
from factorlm.train.config import TrainConfig

__all__ = ["BUDGETS", "ADJUSTABLE", "resumed_config", "resume_request", "changed_settings"]

BUDGETS = ("max_steps", "max_time", "epochs")
# qat: switching quantization-aware training on for the rest of a run is how a float run is
# fine-tuned for int8 (factorlm.quant.qat); it changes the forward, not the state
ADJUSTABLE = (*BUDGETS, "log_every", "checkpoint_minutes", "eval_batch_size", "qat")


def resumed_config(saved: TrainConfig, changes: Mapping | None) -> TrainConfig:
    """``saved`` with the adjustable ``changes`` applied; ConfigError for any other key."""
    unknown = sorted(set(changes or {}) - set(ADJUSTABLE))
    if unknown:
        raise ConfigError(f"a resumed run can change only {', '.join(ADJUSTABLE)}; not {', '.join(unknown)}")
    return saved.replace(**(changes or {}))


def resume_request(saved_model: ModelConfig, saved_train: TrainConfig, *, model: Mapping | None = None,
                   train: Mapping | None = None, base: tuple[ModelConfig, TrainConfig] | None = None,
                   source: str = "the request") -> dict:
    """The adjustable train settings among ``train`` (to pass on as changes), after checking that
    nothing else asked for differs from the saved run; else one ConfigError listing every difference.

    model / train: settings given explicitly, e.g. ``{"cell": "glstm", "rank": 8}``, ``{"lr": 50.0}``.
    base: the (model, train) configs of a preset or config file named with the resume: compared
    setting by setting as well, except its adjustable ones (its budgets are not a request).
    source: what asked, for the message ("the command line").
    """
    differences = []
    if base is not None:
        base_model, base_train = base
        base_model = base_model.replace(vocab_size=saved_model.vocab_size)  # a preset's is a placeholder
        differences += _differences(base_model.to_dict(), saved_model, ())
        differences += _differences(base_train.to_dict(), saved_train, ADJUSTABLE)
    differences += _differences(dict(model or {}), saved_model, ())
    differences += _differences(dict(train or {}), saved_train, ADJUSTABLE)
    if differences:
        unique = list(dict.fromkeys(differences))
        raise ConfigError(
            f"a resumed run continues the saved one unchanged, but {source} asks for {'; '.join(unique)}; "
            f"start a new run (another output directory) to change them (a resume may change only "
            f"{', '.join(ADJUSTABLE)})"
        )
    return {name: value for name, value in (train or {}).items() if name in ADJUSTABLE}


def changed_settings(saved: TrainConfig, resumed: TrainConfig) -> list[str]:
    """``name value (was old)`` for each setting a resume changed: what to tell the user."""
    return [f"{f.name} {getattr(resumed, f.name)!r} (was {getattr(saved, f.name)!r})"
            for f in dataclasses.fields(saved) if getattr(resumed, f.name) != getattr(saved, f.name)]


def _differences(asked: Mapping, saved, skip) -> list[str]:
    """``name=value (saved: value)`` for every setting in ``asked`` that the saved config does not have."""
    out = []
    num_layers = getattr(saved, "num_layers", 1)
    for name, value in asked.items():
        if name in skip:
            continue
        if name == "cell_args":  # compare argument by argument, as the flat form below
            for arg, arg_value in dict(value or {}).items():
                out += _differences({arg: arg_value}, saved, skip)
            for arg in set(saved.cell_args) - set(value or {}):
                out += _differences({arg: None}, saved, skip)
            continue
        have = saved.cell_args.get(name) if name in cell_arg_declarations() else getattr(saved, name)
        if _normalized(name, value, num_layers) != _normalized(name, have, num_layers):
            out.append(f"{name}={value!r} (saved: {have!r})")
    return out


def _normalized(name: str, value, num_layers: int):
    """A cell argument as one value per layer (8 and (8, 8) are the same rank); lists as tuples."""
    if name == "proj_rank" and isinstance(value, int) and not isinstance(value, bool):
        return (value,) * num_layers  # one value for every layer, as a per-layer tuple
    arg = cell_arg_declarations().get(name)
    if arg is not None and value is not None and arg.per_layer:
        try:
            return tuple(arg.for_layer(value, k, num_layers) for k in range(num_layers))
        except (ValueError, TypeError):
            return value
    return tuple(value) if isinstance(value, list) else value
