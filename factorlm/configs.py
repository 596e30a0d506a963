"""The named presets, and the one way every command turns a preset, a config file and overrides
into the (ModelConfig, TrainConfig) of a run: ``resolve``.

    model, train = resolve("ptb-small")
    model, train = resolve(config_file="run.json")     # {"preset": "debug", "model": {...}, "train": {...}}
    model, train = resolve("biglstm", overrides={"model": {"cell": "glstm", "groups": 4}})

A config file and ``overrides`` have the same shape. In "model", a cell's arguments may be given
as ``"cell_args": {"rank": 512}`` or as top-level keys (``"rank": 512``, the form config files used
before cell_args existed).
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Mapping

from factorlm.errors import ConfigError
from factorlm.models.config import ModelConfig
from factorlm.nn.registry import cell_arg_declarations
from factorlm.train.config import TrainConfig

__all__ = ["PRESETS", "MODEL_PRESETS", "PAPER_PRESETS", "DEFAULT_PRESET", "preset", "model_preset",
           "read_config_file", "resolve"]

DEFAULT_PRESET = "debug"
#: the top-level keys of a config file (and of resolve's overrides, without "preset")
CONFIG_FILE_KEYS = ("preset", "model", "train")


def _paper(cell: str = "lstm", **cell_args) -> tuple[ModelConfig, TrainConfig]:
    """The paper's 1B Word models (Kuchaiev & Ginsburg 2017, Table 1): 2 layers, emb = proj = 1024,
    cells 8192, 8192 samples, vocabulary of the original code's vocab file; trained with Adagrad
    lr 0.2 (accumulator 1.0), the LSTM gradients clipped at global norm 1.0, 20 steps, batch 128 per
    GPU, EMA 0.999, for a fixed wall-clock time (one week)."""
    model = ModelConfig(vocab_size=793_470, embedding_size=1024, hidden_size=8192, proj_size=1024, num_layers=2,
                        cell=cell, cell_args=cell_args, forget_bias=1.0, dropout=0.1, num_sampled=8192)
    train = TrainConfig(optimizer="adagrad", lr=0.2, batch_size=128, num_steps=20, clip_norm=1.0, clip_scope="rnn",
                        ema_decay=0.999)
    return model, train


def _zaremba(size: int, dropout: float, init_scale: float, **train) -> tuple[ModelConfig, TrainConfig]:
    """Zaremba et al. 2014 (arXiv 1409.2329) on PTB: 2 plain LSTM layers of ``size`` cells without
    projection, no forget-gate constant, every parameter U(-init_scale, init_scale), full softmax;
    SGD lr 1 on the corpus in order (batch 20), every gradient clipped. vocab_size is a placeholder:
    training replaces it with the corpus's vocabulary."""
    model = ModelConfig(vocab_size=10_000, embedding_size=size, hidden_size=size, num_layers=2, dropout=dropout,
                        init_scale=init_scale)
    train = TrainConfig(optimizer="sgd", lr=1.0, batch_size=20, batching="contiguous", clip_scope="all",
                        log_every=100, **train)
    return model, train


#: name -> (model, training) configs: the one table of presets.
PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # seconds on a CPU, on the built-in corpus
    "debug": (
        ModelConfig(vocab_size=1_000, embedding_size=64, hidden_size=64, num_layers=2),
        TrainConfig(optimizer="adam", lr=0.003, batch_size=32, num_steps=20, epochs=3, clip_norm=5.0,
                    clip_scope="all", checkpoint_minutes=5.0, log_every=20, eval_batch_size=16),
    ),
    # small: 13 epochs, lr halved each epoch after epoch 4, 20 steps, clip 5
    "ptb-small": _zaremba(200, 0.0, 0.1, num_steps=20, epochs=13, clip_norm=5.0, lr_decay=0.5,
                          lr_decay_start_epoch=4),
    # medium: 39 epochs, lr / 1.2 after epoch 6, 35 steps
    "ptb-medium": _zaremba(650, 0.5, 0.05, num_steps=35, epochs=39, clip_norm=5.0, lr_decay=1 / 1.2,
                           lr_decay_start_epoch=6),
    # large: 55 epochs, lr / 1.15 after epoch 14, 35 steps, clip 10
    "ptb-large": _zaremba(1500, 0.65, 0.04, num_steps=35, epochs=55, clip_norm=10.0, lr_decay=1 / 1.15,
                          lr_decay_start_epoch=14),
    "biglstm": _paper(),
    "biglstm-f512": _paper("flstm", rank=512),
    "biglstm-g2": _paper("glstm", groups=2),
    "biglstm-g4": _paper("glstm", groups=4),
    "biglstm-g8": _paper("glstm", groups=8),
}

#: name -> model config of every preset
MODEL_PRESETS: dict[str, ModelConfig] = {name: model for name, (model, _) in PRESETS.items()}
#: the paper's models (Table 1), in its order
PAPER_PRESETS: dict[str, ModelConfig] = {
    name: MODEL_PRESETS[name] for name in ("biglstm", "biglstm-f512", "biglstm-g2", "biglstm-g4", "biglstm-g8")
}


def preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs of a named preset."""
    return _named(name)


def _named(name: str) -> tuple[ModelConfig, TrainConfig]:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def model_preset(name: str) -> ModelConfig:
    """The model config of a named preset."""
    return preset(name)[0]


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``: ``{"preset": NAME, "model": {...}, "train": {...}}``, each part
    optional. ConfigError (one line naming the file) when it is missing, unreadable, not JSON, not an
    object, or has other top-level keys or parts of the wrong kind. The parts' own keys are checked
    by resolve."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"config file {path} cannot be read: {reason}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    shape = '{"preset": NAME, "model": {...}, "train": {...}}'
    if not isinstance(spec, dict):
        raise ConfigError(f"config file {path} must hold a JSON object {shape}, got {_json_kind(spec)}")
    _check_keys(spec, CONFIG_FILE_KEYS, f"config file {path}", "top-level key")
    if "preset" in spec and not isinstance(spec["preset"], str):
        raise ConfigError(f"config file {path}: \"preset\" must be a preset name, got {_json_kind(spec['preset'])}")
    for part in ("model", "train"):
        if part in spec and not isinstance(spec[part], dict):
            raise ConfigError(f"config file {path}: \"{part}\" must be an object of settings, "
                              f"got {_json_kind(spec[part])}")
    return spec


def resolve(preset: str | None = None, config_file: str | os.PathLike | None = None,
            overrides: Mapping | None = None, *,
            base: tuple[ModelConfig, TrainConfig] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs of a run, in three layers, each applied on top of the one before:

    1. the preset ``preset``, else the one the config file names, else ``base`` (e.g. a trained
       run's configs: distillation starts from the teacher's), else ``DEFAULT_PRESET``;
    2. the config file's "model" and "train" settings (see read_config_file);
    3. ``overrides``, e.g. the command line's flags: ``{"model": {...}, "train": {...}}``.

    A layer that changes the cell starts the new cell without the old cell's arguments (a glstm
    preset switched to flstm does not keep its groups; the layer gives the rank). An override of
    max_steps or max_time without one of epochs also clears the preset's epochs: a budget given
    now replaces the recipe's. Errors are ConfigError (structure, unknown keys) or ValueError (a
    value, named), one line each.
    """
    spec = read_config_file(config_file) if config_file is not None else {}
    if preset is not None and spec.get("preset", preset) != preset:
        raise ConfigError(f"config file {config_file} names preset {spec['preset']!r}, but preset {preset!r} "
                          f"was asked for; give one")
    if base is not None and preset is None and "preset" not in spec:
        model, train = base
    else:
        model, train = _named(preset or spec.get("preset", DEFAULT_PRESET))
    if config_file is not None:
        source = f"config file {config_file}"
        try:
            model, train = _apply(model, train, spec, source)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f'overrides must be a mapping {{"model": {{...}}, "train": {{...}}}}, got {overrides!r}')
        _check_keys(overrides, CONFIG_FILE_KEYS[1:], "overrides", "key")
        budgets = dict(overrides.get("train") or {})
        if {"max_steps", "max_time"} & set(budgets) and "epochs" not in budgets:
            budgets["epochs"] = None
        model, train = _apply(model, train, {**overrides, "train": budgets}, "overrides")
    return model, train


def _apply(model: ModelConfig, train: TrainConfig, layer: Mapping, source: str) -> tuple[ModelConfig, TrainConfig]:
    """One layer's {"model": {...}, "train": {...}} applied on top of (model, train)."""
    changes = dict(layer.get("model") or {})
    _check_keys(changes, ModelConfig.accepted_keys(), source, "model key")
    cell = changes.pop("cell", model.cell)
    given = dict(changes.pop("cell_args", None) or {})
    given.update({name: changes.pop(name) for name in list(changes) if name in cell_arg_declarations()})
    # The one place a cell switch happens: the new cell does not inherit the old cell's arguments.
    kept = model.cell_args if cell == model.cell else {}
    cell_args = {name: value for name, value in {**kept, **given}.items() if value is not None}
    model = model.replace(cell=cell, cell_args=cell_args, **changes)
    settings = dict(layer.get("train") or {})
    _check_keys(settings, TrainConfig.accepted_keys(), source, "train key")
    return model, train.replace(**settings)


def _check_keys(data: Mapping, known, source: str, what: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = [match for key in unknown for match in difflib.get_close_matches(str(key), known, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"{source}: unknown {what}{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}{hint}; known: {', '.join(sorted(known))}")


def _json_kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")
