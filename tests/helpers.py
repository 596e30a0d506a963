"""Shared test helpers: building each layer type and independent dense references."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

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
    factor parameters' gradients can be taken through torch.nn.LSTM. A coupled layer
    (coupled_gates=True) gets the same names for its 3 gate blocks [i, g, o], for :class:`DenseCIFG`,
    and bias_hh carries -forget_bias on i (its convention: f = 1 - σ(a_i - forget_bias)).
    """
    n = layer.hidden_size
    gates = 3 if layer.coupled_gates else 4
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
        for gate in range(gates):
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
    elif isinstance(layer, fnn.DiagonalLSTM):  # u (G, n): gate g's rows of W_hh are diag(u_g)
        w_ih = getattr(layer, f"weight_ih{suffix}")
        w_hh = torch.diag_embed(getattr(layer, f"weight_hh{suffix}")).reshape(gates * n, n)
    else:
        w_ih, w_hh = getattr(layer, f"weight_ih{suffix}"), getattr(layer, f"weight_hh{suffix}")
    bias = getattr(layer, f"bias{suffix}", None)
    if bias is None:
        bias = torch.zeros(gates * n, dtype=torch.float64)
    forget = torch.zeros(gates * n, dtype=torch.float64)
    if layer.coupled_gates:
        forget[:n] = -layer.forget_bias
    else:
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


def has_dense_equivalent(layer) -> bool:
    """Whether a torch.nn.LSTM computes the layer's function (a class says otherwise for proj_size > 0
    with ``dense_equivalent_with_projection = False``, e.g. the diagonal LSTM)."""
    return not layer.proj_size or getattr(type(layer), "dense_equivalent_with_projection", True)


def dense_reference(layer) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An nn.LSTM of the layer's sizes and the (differentiable) weights to call it with; for a layer
    without a torch.nn.LSTM equivalent (:func:`has_dense_equivalent`), the independent per-sequence
    float64 reference of its cell (:class:`DiagonalReference`) and the layer's own parameters; for
    a layer with coupled_gates, a :class:`DenseCIFG` of its sizes in torch.nn.LSTM's place."""
    if not has_dense_equivalent(layer):
        if not isinstance(layer, fnn.DiagonalLSTM):
            raise NotImplementedError(f"no independent reference for {type(layer).__name__} with a projection")
        return DiagonalReference(layer), dict(layer.named_parameters())
    module = DenseCIFG if layer.coupled_gates else torch.nn.LSTM
    lstm = module(
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


class DenseCIFG(torch.nn.Module):
    """The dense LSTM with coupled input and forget gates (CIFG, Greff et al. 2017), float64, one
    sequence and one step at a time, written from the equations; torch.nn.LSTM's constructor,
    parameter names, call and results (padded or packed input, batch_first, bidirectional, proj_size;
    no dropout), so that the test grid compares coupled layers with it as with torch.nn.LSTM.

    Per layer and direction, with a = W_ih·x_t + b_ih + W_hh·h_{t-1} + b_hh split into [a_i, a_g, a_o]:
        ι = σ(a_i);  c_t = (1 − ι)·c_{t-1} + ι·tanh(a_g);  h_t = W_hr·(σ(a_o)·tanh(c_t))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, batch_first=False, bidirectional=False, proj_size=0):
        super().__init__()
        self.hidden_size, self.num_layers, self.batch_first = hidden_size, num_layers, batch_first
        self.directions, self.proj_size = 2 if bidirectional else 1, proj_size
        p = proj_size or hidden_size
        for k in range(num_layers):
            for d in range(self.directions):
                suffix = f"_l{k}" + ("_reverse" if d else "")
                p_in = input_size if k == 0 else p * self.directions
                shapes = {"weight_ih": (3 * hidden_size, p_in), "weight_hh": (3 * hidden_size, p),
                          "bias_ih": (3 * hidden_size,), "bias_hh": (3 * hidden_size,)}
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(name + suffix, torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)))

    def _sequence(self, x, h, c, k, d):
        """One sequence x (L, p_in) through layer k, direction d, from h (p,), c (n,)."""
        w = {name: getattr(self, f"{name}_l{k}" + ("_reverse" if d else ""))
             for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        n = self.hidden_size
        outputs = []
        for t in (reversed(range(len(x))) if d else range(len(x))):
            a = w["weight_ih"] @ x[t] + w["bias_ih"] + w["weight_hh"] @ h + w["bias_hh"]
            input_gate = torch.sigmoid(a[:n])
            c = (1 - input_gate) * c + input_gate * torch.tanh(a[n : 2 * n])
            h = torch.sigmoid(a[2 * n :]) * torch.tanh(c)
            if self.proj_size:
                h = getattr(self, f"weight_hr_l{k}" + ("_reverse" if d else "")) @ h
            outputs.append(h)
        if d:
            outputs.reverse()
        return torch.stack(outputs), h, c

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, ·), the original batch order
            lengths = lengths.tolist()
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            lengths = [x.shape[0]] * x.shape[1]
        L, B, p = self.num_layers * self.directions, x.shape[1], self.proj_size or self.hidden_size
        if hx is None:
            hx = (x.new_zeros(L, B, p), x.new_zeros(L, B, self.hidden_size))
        out = x.new_zeros(x.shape[0], B, p * self.directions)
        h_n, c_n = [[None] * B for _ in range(L)], [[None] * B for _ in range(L)]
        outputs = []
        for b in range(B):
            seq = x[: lengths[b], b]
            for k in range(self.num_layers):
                results = []
                for d in range(self.directions):
                    index = k * self.directions + d
                    y, h_n[index][b], c_n[index][b] = self._sequence(seq, hx[0][index, b], hx[1][index, b], k, d)
                    results.append(y)
                seq = torch.cat(results, dim=1)
            outputs.append(torch.cat([seq, out[lengths[b]:, b]]))  # zero padding after the sequence's end
        out = torch.stack(outputs, dim=1)
        h_n = torch.stack([torch.stack(row) for row in h_n])
        c_n = torch.stack([torch.stack(row) for row in c_n])
        if packed:
            out = pack_padded_sequence(out, lengths, enforce_sorted=input.sorted_indices is None)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)


class DiagonalReference(torch.nn.Module):
    """The diagonal LSTM written out independently, in float64, one sequence and one step at a time,
    with torch.nn.LSTM's call contract (padded or PackedSequence input, batch_first, hx or None,
    stacked layers, bidirectional): the oracle where no torch.nn.LSTM computes the same function
    (proj_size > 0). Its parameters have the layer's names (copies), so that
    ``functional_call(reference, dict(layer.named_parameters()), ...)`` runs it on the layer's own
    differentiable tensors.

    Per gate g of [i, f, g, o]: pre_g = W_ih[g·n:(g+1)·n]·x + b_g + u_g ⊙ s, with s = h without a
    projection and tanh(c) with one; c' = σ(pre_f + forget_bias)·c + σ(pre_i)·tanh(pre_g);
    m = σ(pre_o)·tanh(c'); h' = W_hr·m (or m). With coupled_gates the gates are [i, g, o] and
    ι = σ(pre_i − forget_bias), c' = (1 − ι)·c + ι·tanh(pre_g).
    """

    def __init__(self, layer):
        super().__init__()
        self.cfg = dict(n=layer.hidden_size, p=layer.output_size, L=layer.num_layers, D=layer.num_directions,
                        batch_first=layer.batch_first, forget_bias=layer.forget_bias, proj=bool(layer.proj_size),
                        coupled=layer.coupled_gates)
        for name, value in layer.named_parameters():
            self.register_parameter(name, torch.nn.Parameter(value.detach().clone()))

    def _weight(self, name, layer, direction):
        return getattr(self, f"{name}_l{layer}" + ("_reverse" if direction else ""), None)

    def _run(self, xs, h, c, layer, direction):
        """One direction of one layer over one sequence xs (T, p_in) from h (p,), c (n,)."""
        n, proj, fb = self.cfg["n"], self.cfg["proj"], self.cfg["forget_bias"]
        w_ih, u = self._weight("weight_ih", layer, direction), self._weight("weight_hh", layer, direction)
        bias, w_hr = self._weight("bias", layer, direction), self._weight("weight_hr", layer, direction)
        outs = []
        steps = range(xs.shape[0] - 1, -1, -1) if direction else range(xs.shape[0])
        for t in steps:
            s = torch.tanh(c) if proj else h
            pre = [w_ih[k * n : (k + 1) * n] @ xs[t] + u[k] * s + (0 if bias is None else bias[k * n : (k + 1) * n])
                   for k in range(u.shape[0])]
            if self.cfg["coupled"]:  # [i, g, o], forget gate 1 - ι
                input_gate = torch.sigmoid(pre[0] - fb)
                c = (1 - input_gate) * c + input_gate * torch.tanh(pre[1])
            else:
                c = torch.sigmoid(pre[1] + fb) * c + torch.sigmoid(pre[0]) * torch.tanh(pre[2])
            m = torch.sigmoid(pre[-1]) * torch.tanh(c)
            h = w_hr @ m if proj else m
            outs.append(h)
        if direction:
            outs.reverse()
        return torch.stack(outs), h, c

    def forward(self, input, hx=None):
        cfg = self.cfg
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)
            lengths = lengths.tolist()
        else:
            x = input.transpose(0, 1) if cfg["batch_first"] else input
            lengths = [x.shape[0]] * x.shape[1]
        L, D, p, n = cfg["L"], cfg["D"], cfg["p"], cfg["n"]
        batch = x.shape[1]
        if hx is None:
            hx = (x.new_zeros(L * D, batch, p), x.new_zeros(L * D, batch, n))
        outputs, h_n, c_n = [], [[None] * batch for _ in range(L * D)], [[None] * batch for _ in range(L * D)]
        for b, length in enumerate(lengths):
            seq = x[:length, b]
            for layer in range(L):
                parts = []
                for d in range(D):
                    out, h, c = self._run(seq, hx[0][layer * D + d, b], hx[1][layer * D + d, b], layer, d)
                    parts.append(out)
                    h_n[layer * D + d][b], c_n[layer * D + d][b] = h, c
                seq = torch.cat(parts, dim=1)
            outputs.append(torch.cat([seq, seq.new_zeros(x.shape[0] - length, seq.shape[1])]))
        output = torch.stack(outputs, dim=1)  # (T, B, D·p)
        h_n = torch.stack([torch.stack(row) for row in h_n])
        c_n = torch.stack([torch.stack(row) for row in c_n])
        if packed:  # packed as the input was: the same batch_sizes and (un)sorted_indices
            output = pack_padded_sequence(output, lengths, enforce_sorted=input.sorted_indices is None)
        elif cfg["batch_first"]:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


def packed_data(output):
    """A layer output's values: the PackedSequence's data, or the tensor itself."""
    return output.data if isinstance(output, PackedSequence) else output


def weighted_loss(output, h_n, c_n):
    """A scalar every output element and both states matter to (for comparing gradients)."""
    output = packed_data(output)
    w = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return (output * w).sum() + (h_n**2).sum() + (c_n * 0.5).sum()


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


def cli_error(capsys, argv, status: int = 2) -> str:
    """Run ``factorlm argv``; the one line it printed on stderr, stripped (asserting the exit status,
    one line and no traceback)."""
    from factorlm.cli import main

    capsys.readouterr()  # what earlier commands printed is not this one's
    assert main(argv) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()
