"""The one checkpoint format: written atomically, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain data and tensors:

    format, version                  "factorlm-checkpoint", 1
    model_config, train_config       ModelConfig / TrainConfig as dicts
    vocab                            {"words", "counts", "boundary", "unk", "fingerprint"}
    model, ema                       state dicts (ema None when disabled)
    optimizer                        optimizer state dict (None in exported / final-only files)
    data_state, rnn_state            exact data position and the carried recurrent state
    rng                              torch (and CUDA) generator states
    step, epoch, elapsed, tokens     progress counters (elapsed = training seconds so far)
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch

from factorlm.errors import CheckpointError

__all__ = ["CheckpointError", "FORMAT", "VERSION", "load_checkpoint", "save_checkpoint"]

FORMAT = "factorlm-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model_config", "vocab", "model")


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same directory, fsync, rename.

    A crash at any moment leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a checkpoint; every failure is a one-line CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoint.pt"
        if not candidate.exists():
            raise CheckpointError(f"{path} is a directory without checkpoint.pt")
        path = candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason}); expected a file written by factorlm train"
        ) from None
    except Exception as exc:  # weights_only unpickler rejects foreign objects with pickle errors
        raise CheckpointError(f"checkpoint {path} could not be loaded safely: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a factorlm checkpoint (no '{FORMAT}' format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')!r}; this factorlm reads {VERSION}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return payload
