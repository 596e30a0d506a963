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
loses the same number of units (each layer its own least important ones). A G-LSTM / G∘F-LSTM
layer loses the same number from each of its groups (the groups stay equal), in its grouped
weights (W_ih / W_hh blocks, or each group's W1 columns and W2 rows); every layer must then have
the same group count, since a layer's outputs are split by its own groups and the next layer's. Output units that are
tied elsewhere are not removed: with ``tie_embeddings`` the last layer's output size must stay
the embedding size, and with ``residual`` every layer's output size must; with a projection those
models lose cells only, and without one they cannot be unit-pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm.compress.layers import (as_factorlm_lstm, cell_name, layer_kwargs, layer_views, model_layers,
                                     new_model_like, require_cell)
from factorlm.compress.prune import check_sparsity
from factorlm.models import LanguageModel
from factorlm.nn.base import LSTMBase

__all__ = ["prune_units", "unit_importance"]

#: the cell types whose units can be removed, and the group count of a layer (units go per group)
_CELLS = ("lstm", "flstm", "glstm", "gflstm")


def _groups(module, index: int) -> int:
    return module.groups[index] if hasattr(module, "groups") else 1


def _gate_rows(weight: Tensor, gates: int, keep: Tensor) -> Tensor:
    """The rows of cells ``keep`` in every gate block of a (G·n, ...) tensor."""
    return weight.unflatten(0, (gates, -1))[:, keep].flatten(0, 1)


def _per_group(keep: Tensor, size: int, k: int) -> list[Tensor]:
    """Balanced kept indices of a space of ``size`` units in k groups -> each group's local indices."""
    return [chunk - j * (size // k) for j, chunk in enumerate(keep.chunk(k))]


def unit_importance(model: LanguageModel) -> list[dict[str, Tensor]]:
    """Per layer {"cells": (n,), "outputs": (p,) when projected}: ‖in‖·‖out‖ of each unit (module doc),
    read off each layer's dense equivalent (the same for every cell type: a grouped or factored
    layer's missing weights are zeros there)."""
    require_cell(model.config, _CELLS, "unit pruning")
    return _importance(model_layers(model), model.softmax.weight)


def _importance(layers, last_reader: Tensor | None) -> list[dict[str, Tensor]]:
    """unit_importance of the layers (module, index), the last layer's outputs read by
    ``last_reader`` (the softmax weight; None: by the caller, beyond these weights)."""
    dense = [m.dense_gate_weights(i) for m, i in layers]  # (W_ih (G·n, p_in), W_hh (G·n, p), bias)
    gates = layers[0][0].num_gates
    scores = []
    for l, ((module, index), (w_ih, w_hh, bias)) in enumerate(zip(layers, dense)):
        # what reads layer l's outputs: its own recurrent weights and the next layer (or the softmax)
        after = dense[l + 1][0] if l + 1 < len(dense) else last_reader
        reads = (w_hh.detach().double() ** 2).sum(0)
        if after is not None:
            reads = reads + (after.detach().double() ** 2).sum(0)
        into = sum((w.detach().double() ** 2).sum(1).unflatten(0, (gates, -1)).sum(0) for w in (w_ih, w_hh))
        if bias is not None:
            into = into + (bias.detach().double() ** 2).unflatten(0, (gates, -1)).sum(0)
        hr = module.layer_parameters(index).get("weight_hr")
        if hr is not None:
            hr = hr.detach().double() ** 2  # (p, n)
            scores.append({"cells": (into * hr.sum(0)).sqrt(), "outputs": (hr.sum(1) * reads).sqrt()})
        else:
            scores.append({"cells": (into * reads).sqrt()})
    return scores


def _keep(score: Tensor, count: int, k: int = 1) -> Tensor:
    """The indices of the ``count`` most important units, ``count / k`` from each of the k equal
    groups, in their original order (ties: the lower index)."""
    size = score.numel()
    kept = []
    for j, part in enumerate(score.chunk(k)):
        order = torch.sort(-part, stable=True).indices[: count // k]
        kept.append(order.sort().values + j * (size // k))
    return torch.cat(kept)


def _slice_layer(cell: str, w: dict, v: dict, gates: int, k: int, sizes, keep_in: Tensor, cells: Tensor,
                 out: Tensor) -> None:
    """Copy the kept part of one layer's tensors ``w`` into the smaller layer's ``v``.
    sizes: (p_in, n, p) of the source layer."""
    p_in, n, p = sizes
    if cell == "lstm":
        v["weight_ih"].copy_(_gate_rows(w["weight_ih"], gates, cells)[:, keep_in])
        v["weight_hh"].copy_(_gate_rows(w["weight_hh"], gates, cells)[:, out])
    elif cell == "flstm":
        v["weight_w1"].copy_(w["weight_w1"][:, torch.cat([keep_in, p_in + out])])
        v["weight_w2"].copy_(_gate_rows(w["weight_w2"], gates, cells))
    else:  # grouped: group j keeps its own share of each space, in local indices
        groups = zip(_per_group(keep_in, p_in, k), _per_group(cells, n, k), _per_group(out, p, k))
        for j, (inp_j, cells_j, out_j) in enumerate(groups):
            if cell == "glstm":
                v["weight_ih"][j].copy_(_gate_rows(w["weight_ih"][j], gates, cells_j)[:, inp_j])
                v["weight_hh"][j].copy_(_gate_rows(w["weight_hh"][j], gates, cells_j)[:, out_j])
            else:  # gflstm: W1 (k, r, (p_in + p)/k), columns [x^(j); h^(j)]; W2 (k, G·n/k, r)
                v["weight_w1"][j].copy_(w["weight_w1"][j][:, torch.cat([inp_j, p_in // k + out_j])])
                v["weight_w2"][j].copy_(_gate_rows(w["weight_w2"][j], gates, cells_j))
    if w.get("bias") is not None:
        v["bias"].copy_(_gate_rows(w["bias"], gates, cells))
    if w.get("weight_hr") is not None:
        v["weight_hr"].copy_(w["weight_hr"][out][:, cells])


def _one_group_count(layers) -> int:
    groups = {_groups(m, i) for m, i in layers}
    if len(groups) > 1:
        raise ValueError(f"unit pruning: the layers have different group counts {sorted(groups)}; a layer's outputs "
                         f"are split into the groups of two layers, so every layer must have the same groups")
    return groups.pop()


def _new_cells(fraction: float, n: int, k: int) -> int:
    """n less ``round(fraction · n / k)`` cells from each of k groups; ValueError when none are left."""
    new_n = n - k * int(round(fraction * n / k))
    if new_n < 1:
        raise ValueError(f"unit pruning: removing a fraction {fraction} of {n} cells leaves none; give a smaller "
                         f"fraction")
    return new_n


def _report(fraction, k, n, new_n, p, new_p, scores, keep_cells) -> dict:
    removed = [float(s["cells"].sum() - s["cells"][kept].sum()) for s, kept in zip(scores, keep_cells)]
    return {"fraction": fraction, "groups": k, "hidden_size": [n, new_n], "proj_size": [p, new_p],
            "importance_removed": removed, "importance_total": [float(s["cells"].sum()) for s in scores]}


@torch.no_grad()
def prune_units(source, fraction: float):
    """Remove ``round(fraction · n / k)`` cells from each of a layer's k groups (k = 1 but for G-LSTM
    and G∘F-LSTM), and likewise projection units where they may go (module doc), the least
    important first: returns (smaller model in eval mode, report with the sizes before and after
    and the share of importance removed).

    source: a LanguageModel, or a bare layer (a factorlm layer of those cell types, a torch.nn.LSTM
    or its state dict), whose input and output h are the caller's: only the cells behind its
    projection go (every layer the same number), p and the layers' inputs stay, and c_n becomes
    (L, N, n'). A bare layer without a projection has no such cells (its cells are the h it
    returns) and is refused, as is a bidirectional one.
    """
    fraction = check_sparsity(fraction, "the fraction of units to remove")
    if not isinstance(source, LanguageModel):
        return _prune_layer_units(as_factorlm_lstm(source), fraction)
    model = source
    config = model.config
    require_cell(config, _CELLS, "unit pruning")
    layers = model_layers(model)
    k = _one_group_count(layers)
    n, p = config.hidden_size, config.proj_size
    outputs_free = not (config.tie_embeddings or config.residual)
    if not p and not outputs_free:
        why = "tie_embeddings" if config.tie_embeddings else "residual"
        raise ValueError(f"unit pruning: without a projection the cells are the layers' outputs, whose size {why} "
                         f"ties to the embedding size {config.embedding_size}; such a model cannot lose units")
    new_n = _new_cells(fraction, n, k)
    new_p = p - k * int(round(fraction * p / k)) if p and outputs_free else p
    if p and new_p < 1:
        raise ValueError(f"unit pruning: removing a fraction {fraction} of {p} projection units leaves none; give "
                         f"a smaller fraction")
    if p and new_p >= new_n:
        raise ValueError(f"unit pruning: {new_n} cells would be left with {new_p} projection units, but a "
                         f"projection must be smaller than the cells; give a smaller fraction")
    scores = unit_importance(model)
    keep_cells = [_keep(s["cells"], new_n, k) for s in scores]
    keep_out = [_keep(s["outputs"], new_p, k) if p else cells for s, cells in zip(scores, keep_cells)]

    pruned = new_model_like(model, config.replace(hidden_size=new_n, proj_size=new_p))
    gates = layers[0][0].num_gates
    for l, ((src, i), (dst, j)) in enumerate(zip(layers, model_layers(pruned))):
        p_in = src.layer_input_size(i)
        keep_in = torch.arange(p_in) if l == 0 else keep_out[l - 1]
        _slice_layer(config.cell, src.layer_parameters(i), dst.layer_parameters(j), gates, k,
                     (p_in, n, src.output_size), keep_in, keep_cells[l], keep_out[l])
    if not config.tie_embeddings:
        pruned.softmax.weight.copy_(model.softmax.weight[:, keep_out[-1]])
    return pruned.eval(), _report(fraction, k, n, new_n, p, new_p, scores, keep_cells)


def _prune_layer_units(layer: LSTMBase, fraction: float) -> tuple[LSTMBase, dict]:
    """prune_units of a bare layer: the cells behind its projection only (prune_units' doc)."""
    cell = cell_name(layer)
    if cell not in _CELLS:
        raise ValueError(f"unit pruning needs a layer of cell {' or '.join(map(repr, _CELLS))}, got a "
                         f"{type(layer).__name__}")
    if layer.bidirectional:
        raise ValueError("unit pruning: a bidirectional layer is not supported; prune a unidirectional one")
    if not layer.proj_size:
        raise ValueError("unit pruning of a bare layer removes only cells hidden behind a projection; this layer "
                         "has none (proj_size=0), so its cells are the output h the caller reads (and all layers "
                         "share one hidden_size): nothing can be removed without changing its outputs")
    if layer.shared_gates or layer.proj_rank:
        raise ValueError("unit pruning needs a layer with its own gate matrices and a dense projection "
                         "(no shared_gates, no proj_rank)")
    layers = layer_views(layer)
    k = _one_group_count(layers)
    n, p = layer.hidden_size, layer.proj_size
    new_n = _new_cells(fraction, n, k)
    if new_n <= p:
        raise ValueError(f"unit pruning: {new_n} cells would be left with the {p} projection units the caller "
                         f"reads, but a projection must be smaller than the cells; give a smaller fraction")
    scores = _importance(layers, None)
    keep_cells = [_keep(s["cells"], new_n, k) for s in scores]
    with torch.device("meta"):
        pruned = type(layer)(**{**layer_kwargs(layer), "hidden_size": new_n})
    ref = next(layer.parameters())
    pruned = pruned.to_empty(device=ref.device).to(ref.dtype)
    outputs = torch.arange(p)
    for l, ((src, i), (dst, j)) in enumerate(zip(layers, layer_views(pruned))):
        p_in = src.layer_input_size(i)
        _slice_layer(cell, src.layer_parameters(i), dst.layer_parameters(j), src.num_gates, k, (p_in, n, p),
                     torch.arange(p_in), keep_cells[l], outputs)
    return pruned.eval(), _report(fraction, k, n, new_n, p, p, scores, keep_cells)


def format_units_report(report: dict) -> str:
    n, p = report["hidden_size"], report["proj_size"]
    lines = [f"cells per layer n: {n[0]} -> {n[1]}" + (f"; projection p: {p[0]} -> {p[1]}" if p[0] else "")]
    for l, (gone, total) in enumerate(zip(report["importance_removed"], report["importance_total"])):
        lines.append(f"layer {l}: removed cells hold {gone / total if total else 0:.2%} of the cells' importance "
                     f"(importance = |weights in| x |weights out|)")
    return "\n".join(lines)
