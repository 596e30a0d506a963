"""The models a comparison trains: the paper's family at any scale, presets and config files.

The paper's family (Kuchaiev & Ginsburg 2017, Table 1) is BIGLSTM, F512, G2, G4 and G8: two
layers with embedding = projection p = 1024, n = 8 p = 8192 cells, F-LSTM rank r = p / 2 = 512,
and 8192 sampled-softmax candidates. ``scale_paper_model(config, S)`` keeps those ratios at
p = S · 1024 (rounded to a multiple of 8, so that every group count divides p and n), so that the
same experiment fits a CPU: at S = 1/8, p = 128, n = 1024, r = 64 and 1024 candidates.
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from pathlib import Path

from factorlm.configs import PAPER_PRESETS, PRESETS, resolve
from factorlm.errors import ConfigError
from factorlm.models.config import ModelConfig
from factorlm.nn.registry import CELLS
from factorlm.train.config import TrainConfig

#: the paper's projection (= embedding) size and candidate count, which --scale multiplies
PAPER_PROJ, PAPER_SAMPLES = 1024, 8192
#: every size of a scaled model is a multiple of this (the largest group count, G8)
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class Entry:
    """One model of a comparison: a name (its row and run folder) and its configs, budget not yet set."""

    name: str
    model: ModelConfig
    train: TrainConfig


def parse_scale(text: str) -> float:
    """``--scale``: a fraction of the paper's sizes, as 0.125 or 1/8; in (0, 1]."""
    try:
        value = float(fractions.Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--scale must be a number such as 0.125 or 1/8, got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"--scale must be in (0, 1] (a fraction of the paper's sizes), got {text!r}")
    return value


def scaled_proj(scale: float) -> int:
    """p at ``scale``: 1024 · scale rounded to a multiple of 8 (at least 8)."""
    return max(SIZE_MULTIPLE, round(PAPER_PROJ * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def scale_paper_model(config: ModelConfig, scale: float) -> ModelConfig:
    """A paper model at ``scale``: embedding = projection p, n = 8 p, F-LSTM rank p / 2, the same
    group counts, candidates 8192 · scale; everything else (dropout, forget bias, ...) unchanged."""
    if scale == 1:
        return config
    p = scaled_proj(scale)
    cell_args = dict(config.cell_args)
    if "rank" in cell_args:
        cell_args["rank"] = p // 2
    samples = max(1, round(PAPER_SAMPLES * scale)) if config.num_sampled else 0
    return config.replace(embedding_size=p, proj_size=p, hidden_size=8 * p, cell_args=cell_args, num_sampled=samples)


def fit_to_vocabulary(config: ModelConfig, vocab_size: int) -> tuple[ModelConfig, str | None]:
    """The config for a corpus of ``vocab_size`` words, and a note when it had to change.

    Sampled softmax draws distinct candidates, so it needs fewer of them than there are words; a
    small corpus (PTB has 10,000) with as many candidates gets the full softmax instead, which is
    exact and, at that size, no slower.
    """
    config = config.replace(vocab_size=vocab_size)
    if config.num_sampled and config.num_sampled >= vocab_size:
        note = f"full softmax: {config.num_sampled} candidates would not be fewer than the {vocab_size:,} words"
        return config.replace(num_sampled=0), note
    return config, None


def build_entries(presets: list[str], config_files: list[str], scale: float, cells: list[str] | None = None,
                  cell_args: dict | None = None) -> list[Entry]:
    """The comparison's models: each preset (the paper's scaled to ``scale``, others as they are),
    then each config file (named after the file). Names must be unique: they name run folders.

    ``cells`` (``--cells``): each preset once per cell type instead, named ``PRESET-CELL``, with the
    arguments in ``cell_args`` that the cell takes (``--rank 64 --groups 4 --block 8`` serve a family
    at once); a cell whose argument is given nowhere is refused, naming the option.
    """
    entries = []
    for name in presets:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r} in --presets; known presets: {', '.join(PRESETS)}")
        model, train = resolve(name)
        if name in PAPER_PRESETS:
            model = scale_paper_model(model, scale)
        if not cells:
            entries.append(Entry(name, model, train))
            continue
        for cell in cells:
            entries.append(Entry(f"{name}-{cell}", _with_cell(model, cell, cell_args or {}), train))
    for path in config_files:
        model, train = resolve(config_file=path)
        entries.append(Entry(Path(path).stem, model, train))
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"each model of a comparison needs its own name; repeated: {', '.join(repeated)} "
                          f"(rename a config file)")
    if not entries:
        raise ConfigError("nothing to compare: give --presets or --config")
    return entries


def _with_cell(model: ModelConfig, cell: str, given: dict) -> ModelConfig:
    """``model`` with cell type ``cell`` and, of ``given``, the arguments that cell takes (the
    model's own where it already has that cell)."""
    if cell not in CELLS:
        raise ConfigError(f"unknown cell {cell!r} in --cells; known cells: {', '.join(CELLS)}")
    args = dict(model.cell_args) if cell == model.cell else {}
    for arg in CELLS[cell].cell_args:
        if arg.name in given:
            args[arg.name] = given[arg.name]
        elif arg.name not in args:
            raise ConfigError(f"--cells {cell} needs --{arg.name.replace('_', '-')} ({arg.help})")
    return model.replace(cell=cell, cell_args=args)


def describe(model: ModelConfig) -> str:
    """A short description of a model's sizes, e.g. 'flstm r=64, p=128 n=1024'."""
    args = " ".join(f"{'r' if k == 'rank' else 'k' if k == 'groups' else k}={_per_layer(v)}"
                    for k, v in sorted(model.cell_args.items()))
    sizes = f"E={model.embedding_size} n={model.hidden_size}" + (f" p={model.proj_size}" if model.proj_size else "")
    coupled = (" cifg" if model.coupled_gates else "") + (" shared" if model.shared_gates else "")
    if model.proj_rank is not None:
        coupled += f" hr={_per_layer(model.proj_rank)}"
    return f"{model.cell}{' ' + args if args else ''}{coupled}, {sizes}"


def _per_layer(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
