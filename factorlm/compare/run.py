"""Train every model of a comparison under the same budget, one after the other, resumably.

    OUT/compare.json             the plan: data, budget, machine, each model's configs
    OUT/runs/NAME/               one ordinary training run per model (factorlm.train.Trainer):
        checkpoint.pt, metrics.jsonl, results.json, ...
        row.json                 the model's finished row (written after its exact evaluation)
    OUT/results.md, results.csv, loss_vs_time.png, loss_vs_steps.png, ppl_vs_params.png
                                 (factorlm.compare.report; rewritten after every model)

A model whose row.json matches the requested configs is skipped; one with a checkpoint continues
from it (Trainer.resume), so a re-run of the same command after Ctrl-C, a kill or a crash goes on
where it stopped. The comparison adds nothing to a model's training step: each model is trained
by the same Trainer as ``factorlm train``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from factorlm.compare.family import Entry, describe, fit_to_vocabulary
from factorlm.compare.report import write_report
from factorlm.count import count_model
from factorlm.data import Corpus
from factorlm.errors import ConfigError, Interrupted
from factorlm.machine import machine_info
from factorlm.progress import format_duration
from factorlm.train.checkpoint import load_checkpoint
from factorlm.train.loop import Trainer, pick_device
from factorlm.train.resume import BUDGETS

PLAN_FORMAT = "factorlm-compare/1"


@dataclass(frozen=True)
class Budget:
    """The per-model training budget: wall-clock seconds of training, or optimizer steps."""

    max_time: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if (self.max_time is None) == (self.max_steps is None):
            raise ValueError("give exactly one budget per model: max_time (seconds) or max_steps")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"max_time must be positive seconds, got {self.max_time!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")

    def overrides(self) -> dict:
        """The TrainConfig budget fields (epochs cleared: the budget alone ends training)."""
        return {"max_time": self.max_time, "max_steps": self.max_steps, "epochs": None}

    def text(self) -> str:
        return f"{self.max_time:g} s of training" if self.max_time is not None else f"{self.max_steps:,} steps"


def run_comparison(entries: list[Entry], corpus: Corpus, out_dir, budget: Budget, *, device: str | None = None,
                   show_progress: bool = True, say: Callable[[str], None] | None = None) -> list[dict]:
    """Train, evaluate and tabulate every entry under ``budget``; returns the rows (see write_report)."""
    if say is None:
        say = (lambda text: print(text, file=sys.stderr, flush=True)) if show_progress else (lambda text: None)
    out_dir = Path(out_dir)
    device = pick_device(device)
    vocab_size = len(corpus.vocab)
    plan = []
    for entry in entries:
        model, note = fit_to_vocabulary(entry.model, vocab_size)
        plan.append((Entry(entry.name, model, entry.train.replace(**budget.overrides())), note))
    meta = {"format": PLAN_FORMAT, "data": getattr(corpus, "path", None) or f"built-in corpus {corpus.name!r}",
            "corpus": corpus.name, "vocab_size": vocab_size, "budget": budget.text(), "device": str(device),
            "machine": machine_info(device),
            "models": [{"name": e.name, "model": e.model.to_dict(), "train": e.train.to_dict(), "note": note}
                       for e, note in plan]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(meta, indent=2) + "\n")

    rows: list[dict] = []
    started = time.monotonic()
    for index, (entry, note) in enumerate(plan):
        run_dir = out_dir / "runs" / entry.name
        row = _finished_row(run_dir, entry)
        header = f"[{index + 1}/{len(plan)}] {entry.name} ({describe(entry.model)})"
        if row is not None:
            say(f"{header}: done before, skipped")
        else:
            say(f"{header}: training for {budget.text()}{_time_left(budget, plan[index:], rows, started)}")
            row = _train_one(entry, note, corpus, run_dir, budget, device, show_progress)
            say(f"{entry.name}: {row['split']} perplexity {row['perplexity']:.2f} after {row['steps']:,} steps, "
                f"{row['words_per_sec']:,.0f} words/s")
        rows.append(row)
        write_report(rows, meta, out_dir)
    return rows


def _finished_row(run_dir: Path, entry: Entry) -> dict | None:
    """The row saved by an earlier run of this model with the same configs, if any."""
    path = run_dir / "row.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("model_config") == entry.model.to_dict() and saved.get("train_config") == entry.train.to_dict():
        return saved
    return None


def _train_one(entry: Entry, note: str | None, corpus: Corpus, run_dir: Path, budget: Budget, device,
               show_progress: bool) -> dict:
    """Train one model (or continue its checkpoint) under the budget, evaluate it; its row."""
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        payload = load_checkpoint(checkpoint_path)
        _check_same_recipe(payload, entry, run_dir)
        (run_dir / "row.json").unlink(missing_ok=True)
        trainer = Trainer.resume(run_dir, corpus, checkpoint=payload, budgets=budget.overrides(), device=str(device),
                                 show_progress=show_progress)
    else:
        trainer = Trainer(entry.model, entry.train, corpus, run_dir, device=str(device), show_progress=show_progress)
    try:
        results = trainer.fit()
    except Interrupted as exc:  # Ctrl-C / SIGTERM: the model's checkpoint is saved
        raise Interrupted(f"{exc}".split(";")[0] + f" while training {entry.name}; its checkpoint is saved: "
                          "run the same command again to continue the comparison", exc.signum) from None
    counts = count_model(entry.model)
    split = "test" if "test" in results else "valid"
    row = {
        "model": entry.name,
        "description": describe(entry.model),
        "split": split,
        "perplexity": results[split]["perplexity"] if split in results else float("nan"),
        "rnn_params": counts["rnn_params"],
        "total_params": counts["total_params"],
        "steps": results["steps"],
        "words_per_sec": results["words_per_sec"] or 0.0,
        "train_seconds": results["train_seconds"],
        "note": note or "",
        "metrics": str((run_dir / "metrics.jsonl").resolve()),
        "model_config": entry.model.to_dict(),
        "train_config": entry.train.to_dict(),
    }
    (run_dir / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def _check_same_recipe(payload: dict, entry: Entry, run_dir: Path) -> None:
    """A checkpoint is continued only when it was started with this model and recipe (budget aside)."""
    saved_train = {k: v for k, v in payload["train_config"].items() if k not in BUDGETS}
    wanted_train = {k: v for k, v in entry.train.to_dict().items() if k not in BUDGETS}
    saved_model = json.loads(json.dumps(payload["model_config"]))
    wanted_model = json.loads(json.dumps(entry.model.to_dict()))
    for what, saved, wanted in (("model", saved_model, wanted_model), ("training", saved_train, wanted_train)):
        differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        if differ:
            key = differ[0]
            raise ConfigError(f"{run_dir} holds a run of {entry.name} with another {what} config "
                              f"({key}={saved.get(key)!r}, now {wanted.get(key)!r}); "
                              f"use another --out, or delete {run_dir} to start that model again")


def _time_left(budget: Budget, remaining: list, rows: list[dict], started: float) -> str:
    """'; about 1h05m left for the comparison' (training only; evaluation adds a little)."""
    if budget.max_time is not None:
        seconds = budget.max_time * len(remaining)
    elif rows and time.monotonic() > started:
        per_step = sum(r["train_seconds"] for r in rows) / max(1, sum(r["steps"] for r in rows))
        seconds = per_step * budget.max_steps * len(remaining)
    else:
        return ""
    return f"; about {format_duration(seconds)} of training left in the comparison"
