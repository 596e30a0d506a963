r"""Structured pruning: whole hidden units removed, so the layers shrink and stay dense.

Removing cell i of layer l deletes its row in every gate block (W_ih, W_hh, or an F-LSTM's W2, and
the bias) and its column of W_hr; without a projection the cell is also an output unit (below).
Removing output unit q of layer l (a projection unit, or a cell without projection) deletes its
row of W_hr, its column of the layer's own recurrent weights (W_hh, or the F-LSTM's W1 column
p_in + q) and its column of what reads the layer: the next layer's W_ih (W1 column q) or the
softmax weight. The result is an ordinary smaller model: every layer type keeps its dense fast
path, and time and memory drop with n and p.

Importance of a unit = ‖weights into it‖ · ‖weights out of it‖ (Frobenius norms; a cell's inputs
include its biases). A unit of importance zero does nothing, from the zero state on: with nothing
going out it reaches no output; with nothing coming in, a cell's candidate g = tanh(0) = 0 keeps
c = 0 and so h = 0, and a projection unit is 0. Removing such units leaves the model's outputs
unchanged.

The model config holds one hidden_size n and one proj_size p for every layer, so every layer
loses the same number of units (each layer its own least important ones). Output units that are
tied elsewhere are not removed: with ``tie_embeddings`` the last layer's output size must stay
the embedding size, and with ``residual`` every layer's output size must; with a projection those
models lose cells only, and without one they cannot be unit-pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm.compress.layers import model_layers, new_model_like, require_cell
from factorlm.compress.prune import check_sparsity
from factorlm.models import LanguageModel

__all__ = ["prune_units", "unit_importance"]

_CELLS = ("lstm", "flstm")


def _gate_rows(weight: Tensor, gates: int, keep: Tensor) -> Tensor:
    """The rows of cells ``keep`` in every gate block of a (G·n, ...) tensor."""
    return weight.unflatten(0, (gates, -1))[:, keep].flatten(0, 1)


def _incoming_cells(w: dict, gates: int, cell: str) -> Tensor:
    """(n,) squared norm of what enters each cell: its gate rows and biases."""
    parts = [w["weight_w2"]] if cell == "flstm" else [w["weight_ih"], w["weight_hh"]]
    total = sum((p.detach().double() ** 2).sum(1).unflatten(0, (gates, -1)).sum(0) for p in parts)
    if w.get("bias") is not None:
        total = total + (w["bias"].detach().double() ** 2).unflatten(0, (gates, -1)).sum(0)
    return total


def _recurrent_columns(w: dict, cell: str, p_in: int) -> Tensor:
    """(G·n or r, p): the layer's weights that read its own outputs."""
    return w["weight_w1"][:, p_in:] if cell == "flstm" else w["weight_hh"]


def _input_columns(w: dict, cell: str, p_in: int) -> Tensor:
    """(·, p_in): the layer's weights that read its input."""
    return w["weight_w1"][:, :p_in] if cell == "flstm" else w["weight_ih"]


def unit_importance(model: LanguageModel) -> list[dict[str, Tensor]]:
    """Per layer {"cells": (n,), "outputs": (p,) when projected}: ‖in‖·‖out‖ of each unit (module doc)."""
    require_cell(model.config, _CELLS, "unit pruning")
    cell, layers = model.config.cell, model_layers(model)
    weights = [m.layer_parameters(i) for m, i in layers]
    sizes = [m.layer_input_size(i) for m, i in layers]
    gates = layers[0][0].num_gates
    scores = []
    for l, w in enumerate(weights):
        # what reads layer l's outputs: its own recurrent weights and the next layer (or the softmax)
        reads = (_recurrent_columns(w, cell, sizes[l]).detach().double() ** 2).sum(0)
        after = (_input_columns(weights[l + 1], cell, sizes[l + 1]) if l + 1 < len(weights)
                 else model.softmax.weight).detach().double()
        reads = reads + (after**2).sum(0)
        into = _incoming_cells(w, gates, cell)
        if w.get("weight_hr") is not None:
            hr = w["weight_hr"].detach().double() ** 2  # (p, n)
            scores.append({"cells": (into * hr.sum(0)).sqrt(), "outputs": (hr.sum(1) * reads).sqrt()})
        else:
            scores.append({"cells": (into * reads).sqrt()})
    return scores


def _keep(score: Tensor, count: int) -> Tensor:
    """The indices of the ``count`` most important units, in their original order (ties: lower index)."""
    order = torch.sort(-score, stable=True).indices[:count]
    return order.sort().values


@torch.no_grad()
def prune_units(model: LanguageModel, fraction: float) -> tuple[LanguageModel, dict]:
    """Remove ``round(fraction · n)`` cells per layer, and ``round(fraction · p)`` projection units
    where they may go (module doc), the least important first: returns (smaller model in eval mode,
    report with the sizes before and after and the importance removed)."""
    fraction = check_sparsity(fraction, "the fraction of units to remove")
    config = model.config
    require_cell(config, _CELLS, "unit pruning")
    n, p = config.hidden_size, config.proj_size
    outputs_free = not (config.tie_embeddings or config.residual)
    if not p and not outputs_free:
        why = "tie_embeddings" if config.tie_embeddings else "residual"
        raise ValueError(f"unit pruning: without a projection the cells are the layers' outputs, whose size {why} "
                         f"ties to the embedding size {config.embedding_size}; such a model cannot lose units")
    new_n = n - int(round(fraction * n))
    new_p = p - int(round(fraction * p)) if p and outputs_free else p
    if new_n < 1 or (p and new_p < 1):
        raise ValueError(f"unit pruning: removing a fraction {fraction} of {n} cells leaves none; give a smaller "
                         f"fraction")
    if p and new_p >= new_n:
        raise ValueError(f"unit pruning: {new_n} cells would be left with {new_p} projection units, but a "
                         f"projection must be smaller than the cells; give a smaller fraction")
    scores = unit_importance(model)
    keep_cells = [_keep(s["cells"], new_n) for s in scores]
    keep_out = [_keep(s["outputs"], new_p) if p else cells for s, cells in zip(scores, keep_cells)]
    removed = [float(s["cells"].sum() - s["cells"][k].sum()) for s, k in zip(scores, keep_cells)]

    pruned_config = config.replace(hidden_size=new_n, proj_size=new_p)
    pruned = new_model_like(model, pruned_config)
    cell, gates = config.cell, model_layers(model)[0][0].num_gates
    for l, ((src, i), (dst, j)) in enumerate(zip(model_layers(model), model_layers(pruned))):
        w, v = src.layer_parameters(i), dst.layer_parameters(j)
        p_in = src.layer_input_size(i)
        keep_in = torch.arange(p_in) if l == 0 else keep_out[l - 1]
        cells, out = keep_cells[l], keep_out[l]
        if cell == "flstm":
            v["weight_w1"].copy_(w["weight_w1"][:, torch.cat([keep_in, p_in + out])])
            v["weight_w2"].copy_(_gate_rows(w["weight_w2"], gates, cells))
        else:
            v["weight_ih"].copy_(_gate_rows(w["weight_ih"], gates, cells)[:, keep_in])
            v["weight_hh"].copy_(_gate_rows(w["weight_hh"], gates, cells)[:, out])
        if w.get("bias") is not None:
            v["bias"].copy_(_gate_rows(w["bias"], gates, cells))
        if w.get("weight_hr") is not None:
            v["weight_hr"].copy_(w["weight_hr"][out][:, cells])
    if not config.tie_embeddings:
        pruned.softmax.weight.copy_(model.softmax.weight[:, keep_out[-1]])
    report = {"fraction": fraction, "hidden_size": [n, new_n], "proj_size": [p, new_p],
              "importance_removed": removed,
              "importance_total": [float(s["cells"].sum()) for s in scores]}
    return pruned.eval(), report


def format_units_report(report: dict) -> str:
    n, p = report["hidden_size"], report["proj_size"]
    lines = [f"cells per layer n: {n[0]} -> {n[1]}" + (f"; projection p: {p[0]} -> {p[1]}" if p[0] else "")]
    for l, (gone, total) in enumerate(zip(report["importance_removed"], report["importance_total"])):
        lines.append(f"layer {l}: removed cells hold {gone / total if total else 0:.2%} of the cells' importance "
                     f"(importance = |weights in| x |weights out|)")
    return "\n".join(lines)
