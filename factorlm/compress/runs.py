"""Reading the run to compress and writing the compressed one: an ordinary factorlm run directory.

The output's checkpoint.pt has what ``factorlm evaluate`` / ``generate`` / ``score`` read (format,
model_config with the new cell, cell arguments and sizes, vocab, model) plus the source's
train_config and data_path, so that fine-tuning can start from it with the source's recipe.
It is not a resumable training checkpoint (no optimizer state, data position or RNG: those of the
source belong to other weights). ``compression`` lists every conversion the weights went through,
oldest first (plain data: method, source and its settings); unstructured pruning adds
``prune_masks`` {parameter name: bool tensor, True = kept}.

The source is never written to; an output directory that already holds a checkpoint is refused,
as ``factorlm train`` refuses one.
"""

from __future__ import annotations

import json
from pathlib import Path

from factorlm.data import Vocabulary
from factorlm.errors import CLIError
from factorlm.models import LanguageModel
from factorlm.outputs import ensure_directory
from factorlm.runs import load_model
from factorlm.train.checkpoint import save_checkpoint

__all__ = ["load_source", "check_output", "write_run"]


def load_source(run, *, use_ema: bool = True) -> tuple[LanguageModel, Vocabulary, dict]:
    """(model in eval mode, vocabulary, checkpoint payload) of run directory or checkpoint ``run``;
    the averaged (EMA) weights when the run kept them and ``use_ema``: those ``evaluate`` scores.
    An int8 run (factorlm compress quantize) is refused: compress its float source."""
    model, vocab, payload = load_model(run, device="cpu", use_ema=use_ema)
    if payload.get("quantization") is not None:
        raise CLIError(f"{run} is an int8 run; compress its float source {payload['quantization'].get('source')} "
                       f"(and quantize the result)")
    return model, vocab, payload


def _run_dir(path) -> Path:
    path = Path(path)
    return path.parent if path.suffix == ".pt" else path


def check_output(source, out) -> Path:
    """The output run directory ``out``, checked before any work: not the source's, not holding a
    checkpoint already. CLIError naming the directory otherwise."""
    if not str(out).strip():
        raise CLIError(f"--out must name the output run directory, got {str(out)!r}")
    out = Path(out)
    if out.resolve() == _run_dir(source).resolve():
        raise CLIError(f"--out {out} is the source run's directory; the source is never overwritten: choose "
                       f"another --out")
    if (out / "checkpoint.pt").exists():
        raise CLIError(f"{out / 'checkpoint.pt'} exists: choose another --out (a compressed run is never written "
                       f"over an existing one)")
    return out


def write_run(out, model: LanguageModel, source_payload: dict, step: dict, *, report: str = "",
              extra: dict | None = None) -> Path:
    """Write ``model`` as run directory ``out``: checkpoint.pt, compress.txt (``report``) and
    compress.json (``step``, this conversion's plain-data record). ``extra``: more checkpoint keys
    (prune_masks). Returns the checkpoint's path."""
    out = ensure_directory(out, "run directory")
    history = list(source_payload.get("compression") or []) + [step]
    payload = {
        "model_config": model.config.to_dict(),
        "vocab": source_payload["vocab"],
        "model": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "ema": None,
        "compression": history,
        **(extra or {}),
    }
    for key in ("train_config", "data_path"):
        if source_payload.get(key) is not None:
            payload[key] = source_payload[key]
    path = save_checkpoint(payload, out / "checkpoint.pt")
    (out / "compress.json").write_text(json.dumps(history, indent=2) + "\n")
    if report:
        (out / "compress.txt").write_text(report.rstrip("\n") + "\n")
    return path
