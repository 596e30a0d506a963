"""One-shot unstructured magnitude pruning of the recurrent weight matrices, with masks.

Every weight matrix of the recurrent layers (the gate matrices W_ih / W_hh, an F-LSTM's factors, a
G-LSTM's group blocks, the projection W_hr: every recurrent parameter with two or more dimensions;
biases are left whole) loses its ``round(sparsity · size)`` entries of smallest magnitude: they
are set to zero and a mask records them. Each matrix gets the same sparsity (layer-wise uniform,
as Zhu & Gupta 2017), so no matrix is emptied by a global threshold that another matrix sets.

The masks are {parameter name (as in ``model.state_dict()``): bool tensor of the parameter's shape,
True = kept}; a compressed run stores them in its checkpoint under ``"prune_masks"``, and
fine-tuning keeps the pruned entries at zero with them. Pruning an already pruned model keeps
its earlier zeros pruned (they have the smallest magnitude).

Zeros alone buy no speed: the dense kernels multiply them all the same (benchmarks/sparse_speed.py
measures where torch's sparse kernels would pay). Removing whole units does
(factorlm.compress.units).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from factorlm.compress import masks as _masks
from factorlm.models import LanguageModel
from factorlm.nn.base import LSTMBase

__all__ = ["MASKS_KEY", "check_sparsity", "prunable_parameters", "magnitude_masks", "magnitude_prune", "apply_masks"]

#: the checkpoint key of the masks, the one fine-tuning reads (factorlm.compress.masks)
MASKS_KEY = _masks.KEY


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """``sparsity`` as a float strictly inside (0, 1); ValueError naming the value otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1 (the share removed), got {sparsity!r}")
    return float(sparsity)


def prunable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the recurrent weight matrices: a LanguageModel's as gradual pruning
    chooses them (factorlm.compress.masks, named as in its state dict, ``rnn.weight_hh_l0``), or
    those of a layer itself."""
    if isinstance(module, LanguageModel):
        return _masks.prunable_parameters(module, "rnn")
    if isinstance(module, LSTMBase):
        return {name: p for name, p in module.named_parameters() if p.dim() >= 2}
    raise TypeError(f"expected a factorlm LanguageModel or layer, got {type(module).__name__}")


def magnitude_masks(parameters: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Per matrix, a bool mask keeping all but its ``round(sparsity · numel)`` smallest-magnitude
    entries (the rule gradual pruning applies at each event, factorlm.compress.masks.magnitude_mask)."""
    sparsity = check_sparsity(sparsity)
    return {name: _masks.magnitude_mask(weight, sparsity) for name, weight in parameters.items()}


@torch.no_grad()
def apply_masks(module: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the entries ``masks`` marks as pruned, in place (names as in ``module.named_parameters()``)."""
    parameters = dict(module.named_parameters())
    for name, mask in masks.items():
        parameters[name].mul_(mask.to(parameters[name].device))


def magnitude_prune(module: nn.Module, sparsity: float) -> tuple[nn.Module, dict[str, Tensor], dict]:
    """A pruned copy of ``module`` (a LanguageModel or a factorlm layer; the original is untouched):
    returns (copy, masks, report). ``report``: per matrix its size and the fraction now zero."""
    check_sparsity(sparsity)
    pruned = copy.deepcopy(module)
    masks = magnitude_masks(prunable_parameters(pruned), sparsity)
    apply_masks(pruned, masks)
    rows = [{"parameter": name, "shape": list(mask.shape), "size": mask.numel(),
             "sparsity": 1.0 - mask.float().mean().item()} for name, mask in masks.items()]
    size = sum(r["size"] for r in rows)
    zeros = sum(mask.numel() - int(mask.sum()) for mask in masks.values())
    return pruned, masks, {"sparsity": sparsity, "matrices": rows, "zeros": zeros, "size": size}


def format_prune_report(report: dict) -> str:
    """The report of :func:`magnitude_prune` as a text table."""
    lines = [f"{'parameter':<28}{'shape':>14}{'sparsity':>10}"]
    for r in report["matrices"]:
        lines.append(f"{r['parameter']:<28}{' x '.join(map(str, r['shape'])):>14}{r['sparsity']:>10.4f}")
    lines.append(f"{report['zeros']:,} of {report['size']:,} recurrent matrix weights are zero "
                 f"({report['zeros'] / report['size']:.2%}); biases, embedding and softmax are whole. The dense "
                 "kernels still multiply the zeros: no speed is gained without sparse kernels "
                 "(benchmarks/sparse_speed.py) or unit pruning (--units)")
    return "\n".join(lines)
