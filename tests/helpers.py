"""Shared test helpers: building each layer type and independent dense references."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import torch

import factorlm.nn as fnn
from factorlm.nn.registry import cell_class, example_cell_args

#: the reference corpora beside the checkout (absent in a user's clone: tests that need them skip)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: the cell types the layer tests run over: every one registered in factorlm.nn.CELLS
CELLS = tuple(fnn.CELLS)


def make_layer(cell: str, input_size=8, hidden_size=12, *, num_layers=1, proj_size=0, per_layer=False, **kw):
    """A small float64 layer of any registered cell type, with its declared example arguments
    (CellArg.example); per_layer=True gives each layer its own value where the cell allows it."""
    args = {**example_cell_args(cell, num_layers, per_layer), **kw}
    layer = cell_class(cell)(input_size, hidden_size, num_layers=num_layers, proj_size=proj_size, **args)
    return layer.double()


def dense_from_parameters(layer, k: int, direction: int = 0) -> dict[str, torch.Tensor]:
    """torch.nn.LSTM weights for layer k (direction 1: its reverse, names suffixed ``_reverse``),
    derived from the layer's parameters with plain indexing.

    Written independently of the layers' own dense_gate_weights, and differentiable, so the
    factor parameters' gradients can be taken through torch.nn.LSTM.
    """
    n = layer.hidden_size
    p_in = layer.layer_input_size(k)
    p = layer.output_size
    suffix = f"_l{k}" + ("_reverse" if direction else "")
    if isinstance(layer, fnn.FLSTM):
        w = getattr(layer, f"weight_w2{suffix}") @ getattr(layer, f"weight_w1{suffix}")
        w_ih, w_hh = w[:, :p_in], w[:, p_in:]
    elif isinstance(layer, (fnn.GLSTM, fnn.GFLSTM)):
        g = layer.groups[k]
        if isinstance(layer, fnn.GLSTM):
            gi, gh = getattr(layer, f"weight_ih{suffix}"), getattr(layer, f"weight_hh{suffix}")
        else:  # each group's W2^(j)·W1^(j), its columns [x^(j); h^(j)]
            w = torch.stack([w2 @ w1 for w1, w2 in zip(getattr(layer, f"weight_w1{suffix}"),
                                                        getattr(layer, f"weight_w2{suffix}"))])
            gi, gh = w[:, :, : p_in // g], w[:, :, p_in // g :]
        rows_ih, rows_hh = [], []
        for gate in range(4):
            for cell in range(n):
                j, m = divmod(cell, n // g)  # cell belongs to group j, row m of that gate in the group
                row = gate * (n // g) + m
                r_ih = torch.zeros(p_in, dtype=gi.dtype)
                r_ih = r_ih.index_put((torch.arange(j * p_in // g, (j + 1) * p_in // g),), gi[j, row])
                r_hh = torch.zeros(p, dtype=gh.dtype)
                r_hh = r_hh.index_put((torch.arange(j * p // g, (j + 1) * p // g),), gh[j, row])
                rows_ih.append(r_ih)
                rows_hh.append(r_hh)
        w_ih, w_hh = torch.stack(rows_ih), torch.stack(rows_hh)
    elif isinstance(layer, fnn.CirculantLSTM):
        w_ih, w_hh = (circulant_from_blocks(getattr(layer, f"{name}{suffix}")) for name in ("weight_ih", "weight_hh"))
    else:
        w_ih, w_hh = getattr(layer, f"weight_ih{suffix}"), getattr(layer, f"weight_hh{suffix}")
    bias = getattr(layer, f"bias{suffix}", None)
    if bias is None:
        bias = torch.zeros(4 * n, dtype=torch.float64)
    forget = torch.zeros(4 * n, dtype=torch.float64)
    forget[n : 2 * n] = layer.forget_bias
    weights = {f"weight_ih{suffix}": w_ih, f"weight_hh{suffix}": w_hh, f"bias_ih{suffix}": bias,
               f"bias_hh{suffix}": forget}
    if layer.proj_size:
        weights[f"weight_hr{suffix}"] = getattr(layer, f"weight_hr{suffix}")
    return weights


def circulant_from_blocks(weight: torch.Tensor) -> torch.Tensor:
    """The dense (R·b, S·b) matrix of block-circulant weights (R, S, b), each block built from its
    first column c by rolling: column j of the block is c shifted down by j (torch.roll), written
    independently of factorlm.ops.circulant's index arithmetic; differentiable."""
    rows, cols, b = weight.shape
    block_rows = []
    for r in range(rows):
        blocks = [torch.stack([torch.roll(weight[r, s], j) for j in range(b)], dim=1) for s in range(cols)]
        block_rows.append(torch.cat(blocks, dim=1))
    return torch.cat(block_rows, dim=0)


def dense_reference(layer) -> tuple[torch.nn.LSTM, dict[str, torch.Tensor]]:
    """An nn.LSTM of the layer's sizes and the (differentiable) weights to call it with."""
    lstm = torch.nn.LSTM(
        layer.input_size,
        layer.hidden_size,
        num_layers=layer.num_layers,
        batch_first=layer.batch_first,
        bidirectional=layer.bidirectional,
        proj_size=layer.proj_size,
    ).double()
    weights = {}
    for k in range(layer.num_layers):
        for direction in range(2 if layer.bidirectional else 1):
            weights.update(dense_from_parameters(layer, k, direction))
    return lstm, weights


def pairwise(axes: dict[str, list], allowed: Callable[[dict], bool] = lambda row: True) -> list[dict]:
    """Rows (dicts axis -> value) in which every pair of values of two axes occurs at least once,
    among the rows ``allowed`` admits (a pair no allowed row has is not asked for): a test grid that
    covers every interaction of two axes with far fewer rows than the full product.

    Greedy and deterministic: each new row is the allowed one covering the most pairs still missing
    (the first such in product order).
    """
    names = list(axes)
    candidates = [row for values in itertools.product(*axes.values()) if allowed(row := dict(zip(names, values)))]

    def pairs(row):
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    missing = set().union(*(pairs(row) for row in candidates))
    rows = []
    while missing:
        best = max(candidates, key=lambda row: len(pairs(row) & missing))
        rows.append(best)
        missing -= pairs(best)
    return rows
