"""A compressed bare layer as one file, and reading the input of the layer-level commands.

``factorlm compress svd|blocks|prune FILE.pt ... --out OUT.pt`` takes, beside a run, a bare layer:
``torch.save(lstm.state_dict())`` of a torch.nn.LSTM, or a file this module wrote (so conversions
chain: svd, then prune). Its output is one file, written atomically
(factorlm.train.checkpoint.save_checkpoint) and read with ``torch.load(weights_only=True)``:

    format, version        "factorlm-layer", 1
    cell                   the registered cell name of the layer ("lstm", "flstm", "glstm")
    kwargs                 its constructor arguments (input_size, hidden_size, ..., rank / groups)
    state_dict             its weights
    report                 the conversion's report as text (what the command printed)
    compression            every conversion the weights went through, oldest first (plain data)
    prune_masks            after magnitude pruning: {parameter name: bool tensor, True = kept}

:func:`load_layer` builds the module back. A torch.nn.LSTM state dict carries no batch_first or
dropout: the layer gets torch.nn.LSTM's defaults (sequence first, no dropout); set
``layer.batch_first = True`` after loading to feed (batch, time, features).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from factorlm.compress.layers import as_factorlm_lstm, cell_name, layer_kwargs
from factorlm.errors import CheckpointError, CLIError, ConfigWarning
from factorlm.nn.base import LSTMBase
from factorlm.nn.registry import cell_class
from factorlm.train.checkpoint import read_checkpoint, safe_load, save_checkpoint

__all__ = ["LAYER_FORMAT", "load_layer", "save_layer", "read_layer_source",
           "check_layer_output", "spectrum_path"]

LAYER_FORMAT = "factorlm-layer"


def save_layer(path, layer: LSTMBase, *, report: str = "", history: list | None = None,
               masks: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``layer`` as a factorlm layer file (module doc); returns the path."""
    payload = {"format": LAYER_FORMAT, "cell": cell_name(layer), "kwargs": layer_kwargs(layer),
               "state_dict": {name: t.detach().clone() for name, t in layer.state_dict().items()},
               "report": report, "compression": list(history or [])}
    if masks:
        payload["prune_masks"] = {name: m.detach().clone() for name, m in masks.items()}
    return save_checkpoint(payload, path)


def _build(payload: Mapping, path) -> LSTMBase:
    """The layer a layer file's payload describes, its weights loaded, in eval mode."""
    try:
        cls = cell_class(payload.get("cell"))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)  # said when the layer was made (a rank that saves nothing)
            layer = cls(**dict(payload["kwargs"]))
        weights = payload["state_dict"]
        first = next(iter(weights.values()))
        layer = layer.to_empty(device="cpu").to(first.dtype)
        layer.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError, StopIteration) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"layer file {path} does not describe a layer it can build ({text})") from None
    return layer.eval()


def load_layer(path: str | os.PathLike) -> LSTMBase:
    """The factorlm layer (factorlm.nn.LSTM / FLSTM / GLSTM, ...) saved in ``path`` by ``factorlm
    compress ... FILE.pt --out path``: on the CPU, in the saved dtype, in eval mode. Its pruning
    masks, if any, are ``torch.load(path, weights_only=True)["prune_masks"]``. One-line
    CheckpointError naming the file when it is not such a file."""
    payload, path = read_checkpoint(path, format=LAYER_FORMAT, writer="factorlm compress")
    return _build(payload, path)


def read_layer_source(path) -> tuple[LSTMBase, dict] | None:
    """What a compress command was given, when it is a bare layer: (the factorlm layer, the layer
    file's payload, {} for a torch.nn.LSTM state dict). None for a run directory or a factorlm
    checkpoint (the run commands read those), and for a missing path (they say so).

    The file is looked at with its tensors memory-mapped, so a large checkpoint costs no read here.
    Anything else is a CLIError naming the file and what was expected."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return None
    found = safe_load(path, writer="factorlm train, or torch.save(lstm.state_dict())", mmap=True)
    kind = found.get("format") if isinstance(found, Mapping) else None
    if kind == LAYER_FORMAT:
        payload, path = read_checkpoint(path, format=LAYER_FORMAT, writer="factorlm compress")
        return _build(payload, path), payload
    if isinstance(kind, str) and kind.startswith("factorlm-"):
        return None  # a checkpoint: the run commands read (or refuse) it
    if isinstance(found, Mapping) and "weight_ih_l0" in found and all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in found.items()):
        try:
            return as_factorlm_lstm(found), {}
        except ValueError as exc:
            raise CLIError(f"{path}: {exc}") from None
    what = (f"a mapping with keys {sorted(map(str, found))[:4]}" if isinstance(found, Mapping)
            else f"a {type(found).__name__}")
    raise CLIError(f"{path} holds {what}; expected a factorlm run directory or checkpoint, a factorlm layer file, "
                   f"or a torch.nn.LSTM state dict (torch.save(lstm.state_dict()): weight_ih_l0, weight_hh_l0, ...)")


def check_layer_output(source, out) -> Path:
    """The output file ``out`` of a layer input, checked before any work: named, not existing (so
    never the input itself, nor any other file)."""
    if not str(out).strip():
        raise CLIError(f"--out must name the output file, got {str(out)!r}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        same = out.resolve() == Path(source).resolve()
        raise CLIError(f"--out {out} " + ("is the input; it is never overwritten" if same else "exists") +
                       ": choose a new file name (a compressed layer is never written over an existing file)")
    return out


def spectrum_path(out: Path) -> Path:
    """Where svd puts the spectrum plot of a layer written to ``out``: beside it, OUT.spectrum.png."""
    return out.with_name(out.stem + ".spectrum.png")
