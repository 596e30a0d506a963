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
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from factorlm.errors import CheckpointError, ConfigError, OutputError
from factorlm.models.config import ModelConfig
from factorlm.train.config import TrainConfig

__all__ = ["CheckpointError", "FORMAT", "VERSION", "load_checkpoint", "read_checkpoint", "save_checkpoint",
           "saved_model_config", "saved_train_config", "require_resumable", "remove_stale_temp_files",
           "safe_load"]

FORMAT = "factorlm-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model_config", "vocab", "model")
#: what resuming a run needs beyond REQUIRED (exported, final-only files may lack it)
RESUME_KEYS = ("train_config", "optimizer", "data_state", "rng", "step", "epoch", "elapsed", "tokens")


def _temp_pattern(path: Path) -> str:
    """The names save_checkpoint gives its temporary files next to ``path``."""
    return f".{path.name}.*.tmp"


def save_checkpoint(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same directory, fsync, rename.

    A crash at any moment leaves either the previous file or the new one, never a torn one (a
    kill during the write leaves a temp file: remove_stale_temp_files). When the write fails (a
    full disk), the temp file is removed, ``path`` is untouched and an OutputError says why.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = "the previous checkpoint is unchanged" if path.exists() else "no checkpoint was written"
            raise OutputError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}", path) from None
        raise
    return path


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a save of checkpoint ``path`` left when its process was killed
    (the rename never happened, so nothing refers to them); returns what was removed."""
    path = Path(path)
    stale = sorted(path.parent.glob(_temp_pattern(path))) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a checkpoint; every failure is a one-line CheckpointError naming the file.

    Loading never runs code from the file (``weights_only=True``); a file holding anything but
    plain data and tensors is refused as such, without suggesting an unsafe way to load it.
    """
    payload, path = read_checkpoint(path, map_location)
    _require(payload, REQUIRED, path)
    for key in ("model_config", "vocab", "model"):
        if not isinstance(payload[key], Mapping):
            raise CheckpointError(f"checkpoint {path}: {key!r} must be a mapping, got {type(payload[key]).__name__}")
    return payload


def read_checkpoint(path: str | os.PathLike, map_location="cpu", *, format: str = FORMAT,
                    writer: str = "factorlm train") -> tuple[dict, Path]:
    """(payload, the file read): a checkpoint file (or ``path``/checkpoint.pt for a directory) safely
    loaded and checked for the ``format`` marker and VERSION, nothing more; one-line CheckpointErrors
    naming the file. ``writer``: the command that writes such files, for the messages. Other formats
    (factorlm video's) use it with their own marker, so that each loader refuses the other's files."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoint.pt"
        if not candidate.exists():
            raise CheckpointError(f"{path} is a directory without checkpoint.pt")
        path = candidate
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    payload = safe_load(path, map_location, writer=writer)
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != format:
        if isinstance(found, str) and found.startswith("factorlm-"):  # another factorlm command's file
            raise CheckpointError(f"{path} is a {found!r} file, not a {format!r} one; expected a file written by {writer}")
        raise CheckpointError(f"{path} is not a factorlm checkpoint (no '{format}' format marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')!r}; this factorlm reads {VERSION}")
    return payload, path


def safe_load(path: Path, map_location="cpu", *, writer: str = "factorlm train", mmap: bool = False):
    """``torch.load(path, weights_only=True)``: whatever the file holds, never running code from it;
    every failure a one-line CheckpointError naming the file (``writer``: the command that writes
    such files, for the messages). mmap: map the tensors instead of reading them (cheap to look
    at a large file's keys); a file of torch's old format, which cannot be mapped, is read."""
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap" in str(exc)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the safe unpickler met an object it will not build
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not found:  # bytes that are no pickle it reads: any file, or a damaged one
            raise CheckpointError(f"{path} could not be read by a safe load (it is not a file torch.save wrote, is "
                                  f"damaged, or holds objects a safe load refuses); expected a file written by "
                                  f"{writer}") from None
        raise CheckpointError(
            f"{path} is not a factorlm checkpoint: it holds objects a safe load refuses ({found.group(1)}), "
            f"so it was not loaded (factorlm checkpoints hold only plain data and tensors)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_reason(exc)}); expected a file written by {writer}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} could not be loaded as a checkpoint ({_reason(exc)})") from None


def require_resumable(payload: dict, path) -> None:
    """CheckpointError unless ``payload`` holds everything a resumed run restores."""
    _require(payload, RESUME_KEYS, path, " to resume a run (a file written by factorlm train has it)")


def saved_model_config(payload: dict, path) -> ModelConfig:
    """The checkpoint's ModelConfig; a config that does not build is a CheckpointError naming the file."""
    return _config(ModelConfig, payload, "model_config", path)


def saved_train_config(payload: dict, path) -> TrainConfig:
    """The checkpoint's TrainConfig, as saved_model_config."""
    return _config(TrainConfig, payload, "train_config", path)


def _config(cls, payload: dict, key: str, path):
    try:
        return cls.from_dict(payload[key])
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its {key} is invalid ({_reason(exc)})") from None


def _require(payload: dict, keys, path, purpose: str = "") -> None:
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}{purpose}")


def _reason(exc: BaseException) -> str:
    """The first line of an error's text, without torch's advice to load unsafely."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "weights_only" in first or "arbitrary code" in first:
        return "content a safe load refuses"
    return first
