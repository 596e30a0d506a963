r"""Dense LSTM language model -> G-LSTM by keeping the block diagonal after a permutation of units.

A G-LSTM layer with k groups computes, for group j, the pre-activations of cells j·n/k … (j+1)·n/k
of every gate from input slice j and recurrent slice j only: each gate's (n, p_in) and (n, p)
matrices are block-diagonal. A dense layer is turned into one by dropping the off-diagonal blocks,
after reordering units so that those blocks hold as little weight as possible.

Which reorderings leave the dense model's function unchanged (so that only the dropped blocks
change it):

    cells of layer l (C_l)         rows of each gate block of W_ih, W_hh and the bias; columns of W_hr;
                                   without a projection the cells are also h: then as below too
    outputs of layer l (P_l, or    rows of W_hr; columns of this layer's W_hh; columns of the next
      C_l without projection)      layer's W_ih, or of the softmax weight after the last layer
    embedding dimensions (E)       columns of the embedding and of layer 0's W_ih

Each is a relabelling of hidden units: the model's outputs are unchanged (its recurrent state is
stored in the new order). With ``tie_embeddings`` the softmax weight is the embedding, so E and
the last layer's outputs are one order, and with ``residual`` E and every layer's outputs are one
order (x_{l+1} = x_l + out_l): these linked spaces keep the identity order (a permutation there
would have to satisfy several layers at once); the report names them.

The permutation is chosen by factorlm.compress.partition to keep the most squared weight
("mass": Σ w², the energy that the SVD conversion also counts) of the gate matrices W_ih, W_hh
inside the blocks; the report gives the kept fraction against the identity order's. On a model
that was block-diagonal under some permutation the kept fraction is 1 and the G-LSTM computes
the same function.

A bare layer (factorlm.nn.LSTM, torch.nn.LSTM or its state dict) converts the same way, except
that its input features and its last layer's outputs are the caller's and keep the identity
order: only the cells (behind a projection, or of the layers before the last) and the outputs of
the layers before the last are reordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from factorlm.compress.layers import as_factorlm_lstm, layer_views, model_layers, new_model_like, require_cell
from factorlm.compress.partition import Edge, identity_groups, kept_mass, partition
from factorlm.models import LanguageModel
from factorlm.nn.base import LSTMBase
from factorlm.nn.glstm import GLSTM
from factorlm.nn.lstm import LSTM
from factorlm.validate import check_int

__all__ = ["dense_to_glstm", "BlockReport"]


@dataclass
class BlockReport:
    """What the block conversion kept: per layer and in all, the fraction of the gate matrices'
    squared weight inside the blocks, with the permutation found and with the identity order."""

    groups: int
    layers: list[dict]  # {"layer", "kept", "kept_identity", "total"}
    kept: float
    kept_identity: float
    fixed: list[str]  # spaces held in the identity order, and why

    def to_dict(self) -> dict:
        return {"groups": self.groups, "layers": self.layers, "kept": self.kept, "kept_identity": self.kept_identity,
                "fixed": self.fixed}

    def format(self) -> str:
        lines = [f"{'layer':<7}{'mass kept (permuted)':>22}{'identity order':>16}",
                 *(f"{r['layer']:<7}{r['kept']:>22.4f}{r['kept_identity']:>16.4f}" for r in self.layers),
                 f"{'all':<7}{self.kept:>22.4f}{self.kept_identity:>16.4f}",
                 f"mass = sum of squared gate weights (W_ih, W_hh) inside the {self.groups} diagonal blocks / all; "
                 "the projections, biases, embedding and softmax are kept whole",
                 "the units were reordered, which leaves the model's function unchanged (its recurrent state is "
                 "stored in the new order); only the dropped off-diagonal mass (1 - kept) changes it"]
        lines += [f"kept in the identity order: {note}" for note in self.fixed]
        return "\n".join(lines)


def _chain(input_size: int, hidden_size: int, proj_size: int, num_layers: int):
    """The unit spaces of a stack of layers: ({space: size}, per layer (cells, input space, output
    space)); "E" is the first layer's input, "C{l}" layer l's cells, "P{l}" its projection's outputs
    (a layer without a projection outputs its cells)."""
    sizes = {"E": input_size}
    layers = []
    previous = "E"
    for l in range(num_layers):
        cells = out = f"C{l}"
        sizes[cells] = hidden_size
        if proj_size:
            out = f"P{l}"
            sizes[out] = proj_size
        layers.append((cells, previous, out))
        previous = out
    return sizes, layers


def _spaces(model: LanguageModel):
    """({space: size}, per layer (cells, input space, output space), fixed spaces with reasons)."""
    c = model.config
    sizes, layers = _chain(c.embedding_size, c.hidden_size, c.proj_size, c.num_layers)
    fixed = {}
    if c.tie_embeddings:
        for s in ("E", layers[-1][2]):
            fixed[s] = "the embedding is the softmax weight (tie_embeddings)"
    if c.residual:
        for s in ["E"] + [out for _, _, out in layers]:
            fixed[s] = "the layers' inputs and outputs are added (residual)"
    return sizes, layers, fixed


def _gate_mass(weight: Tensor, gates: int) -> np.ndarray:
    """(G·n, m) gate matrix -> (n, m) Σ over gates of the squared weights."""
    w = weight.detach().double()
    return (w.unflatten(0, (gates, -1)) ** 2).sum(0).cpu().numpy()


def _order(groups: np.ndarray) -> Tensor:
    """The permutation putting group 0's units first, then group 1's, ...: new index -> old index."""
    return torch.from_numpy(np.argsort(groups, kind="stable"))


def _blocks(weight: Tensor, rows: Tensor, cols: Tensor, gates: int, k: int) -> Tensor:
    """Dense (G·n, m) -> G-LSTM (k, G·n/k, m/k): rows reordered in each gate block by ``rows``,
    columns by ``cols``, then the diagonal blocks (group j's rows: its n/k cells of every gate)."""
    n, m = weight.shape[0] // gates, weight.shape[1]
    w = weight.unflatten(0, (gates, n))[:, rows][:, :, cols]  # (G, n, m), permuted
    w = w.unflatten(1, (k, n // k)).unflatten(3, (k, m // k))  # (G, k, n/k, k, m/k)
    diagonal = torch.stack([w[:, j, :, j] for j in range(k)])  # (k, G, n/k, m/k)
    return diagonal.flatten(1, 2)  # (k, G·n/k, m/k)


def _layer_spaces(layer: LSTMBase):
    """_spaces for a bare multi-layer module: its input features ("E") and the last layer's outputs
    are the caller's, so they keep the identity order; the cells behind a projection and the
    outputs of the layers before the last are the module's own, free to be reordered."""
    sizes, layers = _chain(layer.input_size, layer.hidden_size, layer.proj_size, layer.num_layers)
    fixed = {"E": "the layer's input features are the caller's",
             layers[-1][2]: "the last layer's output h is the caller's"}
    return sizes, layers, fixed


def _plan(dense, sizes, layer_spaces, fixed, k: int) -> tuple[dict[str, Tensor], BlockReport]:
    """The permutation of every space (new index -> old index) that keeps the most gate mass in the
    k diagonal blocks, and the report of what it keeps."""
    gates = dense[0][0].num_gates
    edges, per_layer_edges = [], []
    for (module, index), (cells, inp, out) in zip(dense, layer_spaces):
        w = module.layer_parameters(index)
        pair = [Edge(cells, inp, _gate_mass(w["weight_ih"], gates)), Edge(cells, out, _gate_mass(w["weight_hh"], gates))]
        edges += pair
        per_layer_edges.append(pair)
    found, kept, kept_identity = partition(sizes, edges, k, fixed=set(fixed))
    order = {s: _order(g) for s, g in found.items()}

    identity = {s: identity_groups(n, k) for s, n in sizes.items()}
    rows = []
    for l, pair in enumerate(per_layer_edges):
        total = sum(float(e.mass.sum()) for e in pair)
        rows.append({"layer": l, "total": total,
                     "kept": kept_mass(pair, found) / total if total else 1.0,
                     "kept_identity": kept_mass(pair, identity) / total if total else 1.0})
    everything = sum(float(e.mass.sum()) for e in edges)
    report = BlockReport(groups=k, layers=rows, kept=kept / everything if everything else 1.0,
                         kept_identity=kept_identity / everything if everything else 1.0,
                         fixed=sorted({f"{s} ({why})" for s, why in fixed.items()}))
    return order, report


def _fill(dense, grouped, layer_spaces, order: dict[str, Tensor], k: int) -> None:
    """Write each dense layer's permuted diagonal blocks, bias and projection into the G-LSTM layer."""
    gates = dense[0][0].num_gates
    for (src, i), (dst, j), (cells, inp, out) in zip(dense, grouped, layer_spaces):
        w, v = src.layer_parameters(i), dst.layer_parameters(j)
        v["weight_ih"].copy_(_blocks(w["weight_ih"], order[cells], order[inp], gates, k))
        v["weight_hh"].copy_(_blocks(w["weight_hh"], order[cells], order[out], gates, k))
        if w.get("bias") is not None:
            v["bias"].copy_(w["bias"].unflatten(0, (gates, -1))[:, order[cells]].flatten())
        if w.get("weight_hr") is not None:
            v["weight_hr"].copy_(w["weight_hr"][order[out]][:, order[cells]])


@torch.no_grad()
def dense_to_glstm(source, groups: int):
    """A G-LSTM with ``groups`` groups per layer from a dense LSTM (module doc): returns (converted,
    :class:`BlockReport`).

    source: a factorlm LanguageModel of cell "lstm" (-> a LanguageModel of cell "glstm"), or a bare
        layer: a factorlm.nn.LSTM, a torch.nn.LSTM or its state dict (-> a factorlm.nn.GLSTM with the
        same sizes and options). A bare layer's input features and last layer's output h keep their
        order (the caller feeds and reads them); the cells behind a projection and the outputs of
        the layers before the last are reordered, so its c_n (and the earlier layers' h_n) are
        stored in the new order, which the layer reads back consistently when they are passed in
        again. A bidirectional layer is refused.
    ``groups`` must divide the input (embedding) size, hidden_size and the output size (G-LSTM's rule).
    The converted model or layer is in eval mode, on the source's device and in its dtype.
    """
    k = check_int("groups", groups)
    if not isinstance(source, LanguageModel):
        return _layer_to_glstm(as_factorlm_lstm(source), k)
    model = source
    require_cell(model.config, ("lstm",), "blocks to G-LSTM")
    config = model.config.replace(cell="glstm", cell_args={"groups": k})
    with torch.device("meta"):  # G-LSTM's own divisibility check, before any work
        LanguageModel(config)
    sizes, layer_spaces, fixed = _spaces(model)
    dense = model_layers(model)
    order, report = _plan(dense, sizes, layer_spaces, fixed, k)
    converted = new_model_like(model, config)
    converted.embedding.weight.copy_(model.embedding.weight[:, order["E"]])
    _fill(dense, model_layers(converted), layer_spaces, order, k)
    last = layer_spaces[-1][2]
    if not model.config.tie_embeddings:  # tied: the softmax weight is the embedding, copied above
        converted.softmax.weight.copy_(model.softmax.weight[:, order[last]])
    return converted.eval(), report


def _layer_to_glstm(layer: LSTMBase, k: int) -> tuple[GLSTM, BlockReport]:
    if type(layer) is not LSTM:
        raise ValueError(f"blocks to G-LSTM converts a dense LSTM, got a {type(layer).__name__}")
    if layer.bidirectional:
        raise ValueError("blocks to G-LSTM: a bidirectional layer is not supported; convert a unidirectional one")
    if layer.shared_gates or layer.proj_rank:
        raise ValueError("blocks to G-LSTM needs a layer with its own gate matrices and a dense projection "
                         "(no shared_gates, no proj_rank)")
    kwargs = {name: getattr(layer, name) for name in ("num_layers", "bias", "batch_first", "dropout", "proj_size",
                                                      "forget_bias", "coupled_gates")}
    with torch.device("meta"):  # G-LSTM's own divisibility check, before any work
        grouped = GLSTM(layer.input_size, layer.hidden_size, groups=k, **kwargs)
    sizes, layer_spaces, fixed = _layer_spaces(layer)
    dense = layer_views(layer)
    order, report = _plan(dense, sizes, layer_spaces, fixed, k)
    ref = layer.layer_parameters(0)["weight_ih"]
    grouped = grouped.to_empty(device=ref.device).to(ref.dtype)
    _fill(dense, layer_views(grouped), layer_spaces, order, k)
    return grouped.eval(), report
