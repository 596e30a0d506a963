"""factorlm.nn layers against torch.nn.LSTM and independent dense references (float64): the whole
contract (batch_first, unbatched, given or zero state, stacks, projection, bidirectional, packed
batches sorted or not), values, states and every gradient; conversion; errors; impl. Every cell
also with coupled input and forget gates (coupled_gates=True), against helpers.DenseCIFG."""

from __future__ import annotations

import itertools
import pickle
import re

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import factorlm.nn as fnn
from factorlm.errors import InputShapeError
from helpers import CELLS, dense_reference, has_dense_equivalent, make_layer, packed_data, pairwise, weighted_loss

TOL = dict(rtol=1e-10, atol=1e-12)

#: sequence lengths of the packed test batches (batch 4, T = 5): ties, and a length-1 sequence
LENGTHS = {"sorted": [5, 4, 4, 2], "unsorted": [2, 5, 1, 4]}


def _inputs(layer, batch=3, steps=5, zero_state=False, requires_grad=True):
    shape = (batch, steps, layer.input_size) if layer.batch_first else (steps, batch, layer.input_size)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)
    L = layer.num_layers * layer.num_directions
    if zero_state:
        return x, None
    h0 = torch.randn(L, batch, layer.output_size, dtype=torch.float64, requires_grad=requires_grad)
    c0 = torch.randn(L, batch, layer.hidden_size, dtype=torch.float64, requires_grad=requires_grad)
    return x, (h0, c0)


def _pack(x, packed: str | None, batch_first: bool):
    """x itself (packed None), or x packed with LENGTHS[packed] (enforce_sorted only for "sorted")."""
    if packed is None:
        return x
    return pack_padded_sequence(x, LENGTHS[packed], batch_first=batch_first, enforce_sorted=packed == "sorted")


def check_against_nn_lstm(cell, *, proj_size, batch_first, num_layers, per_layer, zero_state, impl,
                          bidirectional=False, packed=None, coupled=False):
    """The layer and torch.nn.LSTM with dense weights built independently from its parameters
    (helpers.dense_reference) agree on the output, h_n, c_n and the gradients of the input, the
    initial state and every parameter; ``packed`` is None, "sorted" or "unsorted". ``coupled``:
    the layer has coupled_gates, and the reference is helpers.DenseCIFG."""
    layer = make_layer(cell, num_layers=num_layers, proj_size=proj_size, per_layer=per_layer, batch_first=batch_first,
                       bidirectional=bidirectional, forget_bias=0.7, coupled_gates=coupled)
    layer.impl = impl
    x, hx = _inputs(layer, batch=3 if packed is None else 4, zero_state=zero_state)
    out, (h_n, c_n) = layer(_pack(x, packed, batch_first), hx)
    lstm, weights = dense_reference(layer)
    ref_out, (ref_h, ref_c) = functional_call(lstm, weights, (_pack(x, packed, batch_first), hx))

    assert type(out) is type(ref_out)
    if packed is not None:
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            ours, theirs = getattr(out, name), getattr(ref_out, name)
            assert (ours is None and theirs is None) or torch.equal(ours, theirs), name
    torch.testing.assert_close(packed_data(out), packed_data(ref_out), **TOL)
    torch.testing.assert_close(h_n, ref_h, **TOL)
    torch.testing.assert_close(c_n, ref_c, **TOL)

    leaves = [x, *(hx or ()), *layer.parameters()]
    # materialize_grads: the diagonal LSTM with a projection does not read h_0 (zero gradient)
    grads = torch.autograd.grad(weighted_loss(out, h_n, c_n), leaves, materialize_grads=True)
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_h, ref_c), leaves, materialize_grads=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("proj_size", [0, 4])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers,per_layer", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("zero_state", [False, True])
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("coupled", [False, True], ids=["lstm4", "cifg"])
def test_matches_dense_nn_lstm_values_and_gradients(cell, proj_size, batch_first, num_layers, per_layer, zero_state,
                                                    impl, coupled):
    check_against_nn_lstm(cell, proj_size=proj_size, batch_first=batch_first, num_layers=num_layers,
                          per_layer=per_layer, zero_state=zero_state, impl=impl, coupled=coupled)


#: the axes of the contract grid below, with the full grid's values plus bidirectional and packed
CONTRACT_AXES = dict(proj_size=[0, 4], batch_first=[False, True], layers=[(1, False), (3, False), (3, True)],
                     zero_state=[False, True], impl=["auto", "reference"], bidirectional=[False, True],
                     packed=[None, "sorted", "unsorted"])
#: every pair of values of two axes at least once, in rows that are bidirectional or packed (the
#: unidirectional padded rows are the full grid above): 11 rows instead of 240
CONTRACT_GRID = pairwise(CONTRACT_AXES, allowed=lambda row: row["bidirectional"] or row["packed"] is not None)


def _grid_id(row) -> str:
    layers, per_layer = row["layers"]
    return "-".join([
        "bi" if row["bidirectional"] else "uni", row["packed"] or "padded", f"p{row['proj_size']}",
        "bf" if row["batch_first"] else "tf", f"L{layers}" + ("per" if per_layer else ""),
        "zero" if row["zero_state"] else "given", row["impl"],
    ])


def test_the_contract_grid_covers_every_pair_of_values():
    assert len(CONTRACT_GRID) <= 12
    for a, b in itertools.combinations(CONTRACT_AXES, 2):
        expected = set(itertools.product(CONTRACT_AXES[a], CONTRACT_AXES[b]))
        if (a, b) == ("bidirectional", "packed"):
            expected.remove((False, None))  # the full grid's rows
        assert {(row[a], row[b]) for row in CONTRACT_GRID} == expected, (a, b)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("row", CONTRACT_GRID, ids=_grid_id)
@pytest.mark.parametrize("coupled", [False, True], ids=["lstm4", "cifg"])
def test_bidirectional_and_packed_match_dense_nn_lstm(cell, row, coupled):
    num_layers, per_layer = row["layers"]
    check_against_nn_lstm(cell, proj_size=row["proj_size"], batch_first=row["batch_first"], num_layers=num_layers,
                          per_layer=per_layer, zero_state=row["zero_state"], impl=row["impl"],
                          bidirectional=row["bidirectional"], packed=row["packed"], coupled=coupled)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("proj_size,bidirectional", [(0, False), (4, False), (4, True)])
def test_to_lstm_computes_the_same_function(cell, proj_size, bidirectional):
    layer = make_layer(cell, num_layers=2, proj_size=proj_size, forget_bias=1.0, batch_first=True,
                       bidirectional=bidirectional)
    if not has_dense_equivalent(layer):  # e.g. the diagonal LSTM with a projection: refused, saying why
        with pytest.raises(ValueError, match=r"has no torch.nn.LSTM equivalent"):
            layer.to_lstm()
        return
    lstm = layer.to_lstm()
    assert isinstance(lstm, torch.nn.LSTM) and lstm.batch_first and lstm.proj_size == proj_size
    assert lstm.bidirectional == bidirectional
    x, hx = _inputs(layer, batch=4, requires_grad=False)
    for inputs in (x, _pack(x, "unsorted", batch_first=True)):
        out, (h, c) = layer(inputs, hx)
        ref_out, (ref_h, ref_c) = lstm(inputs, hx)
        torch.testing.assert_close(packed_data(out), packed_data(ref_out), **TOL)
        torch.testing.assert_close(h, ref_h, **TOL)
        torch.testing.assert_close(c, ref_c, **TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_to_lstm_without_bias_keeps_forget_bias(cell):
    layer = make_layer(cell, bias=False, forget_bias=1.0)
    assert not any("bias" in name for name, _ in layer.named_parameters())
    x, hx = _inputs(layer, requires_grad=False)
    torch.testing.assert_close(layer(x, hx)[0], layer.to_lstm()(x, hx)[0], **TOL)
    no_forget = make_layer(cell, bias=False)
    assert no_forget.to_lstm().bias is False


@pytest.mark.parametrize("cell", CELLS)
def test_forget_bias_is_added_to_the_forget_gate(cell):
    layer = make_layer(cell)
    x, hx = _inputs(layer, requires_grad=False)
    base, _ = layer(x, hx)
    layer.forget_bias = 1.0
    shifted, _ = layer(x, hx)
    with torch.no_grad():
        getattr(layer, "bias_l0")[12:24] += 1.0  # the forget slice of the gate bias
    layer.forget_bias = 0.0
    moved, _ = layer(x, hx)
    assert not torch.allclose(base, shifted)
    torch.testing.assert_close(shifted, moved, **TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_coupled_forget_bias_lowers_the_input_gate(cell):
    """coupled_gates: forget_bias b_f is -b_f on the input gate's pre-activation (f = 1 - i =
    σ(b_f - a_i)); a large b_f keeps the cell state (f -> 1, i -> 0)."""
    layer = make_layer(cell, coupled_gates=True)
    x, hx = _inputs(layer, requires_grad=False)
    base, _ = layer(x, hx)
    layer.forget_bias = 1.0
    shifted, _ = layer(x, hx)
    with torch.no_grad():
        layer.bias_l0[:12] -= 1.0  # the input-gate slice of the gate bias [i, g, o]
    layer.forget_bias = 0.0
    moved, _ = layer(x, hx)
    assert not torch.allclose(base, shifted)
    torch.testing.assert_close(shifted, moved, **TOL)
    layer.forget_bias = 60.0
    _, (_, c_n) = layer(x, hx)
    torch.testing.assert_close(c_n, hx[1], rtol=0, atol=1e-20)


@pytest.mark.parametrize("cell", CELLS)
def test_coupled_layers_have_three_gate_blocks_and_no_torch_lstm(cell):
    layer = make_layer(cell, num_layers=2, proj_size=4, coupled_gates=True)
    uncoupled = make_layer(cell, num_layers=2, proj_size=4)
    assert (layer.num_gates, uncoupled.num_gates) == (3, 4)
    for name, t in uncoupled.named_parameters():
        ours = getattr(layer, name).shape
        if name.startswith("bias") or name.startswith(("weight_ih", "weight_hh", "weight_w2")):
            # G-LSTM's (k, 4n/k, ·) group weights; C-LSTM's (4n/b, ·/b, b) row blocks lead
            gate_dim = 1 if t.dim() == 3 and not isinstance(layer, fnn.CirculantLSTM) else 0
            assert ours[gate_dim] * 4 == t.shape[gate_dim] * 3 and ours[:gate_dim] == t.shape[:gate_dim], name
        else:
            assert ours == t.shape, name
    if has_dense_equivalent(layer):  # (the diagonal LSTM with a projection has no dense gate weights)
        dense = layer.dense_gate_weights(1)
        assert [None if w is None else tuple(w.shape) for w in dense] == [(36, 4), (36, 4), (36,)]
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.to_lstm\(\): this layer has coupled_gates=True "
                                         r"\(f = 1 - i, 3 gate blocks\), which no torch.nn.LSTM computes"):
        layer.to_lstm()
    assert "coupled_gates=True" in repr(layer) and "coupled_gates" not in repr(uncoupled)
    with pytest.raises(ValueError, match="coupled_gates must be True or False, got 'yes'"):
        make_layer(cell, coupled_gates="yes")


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_input_matches_batch_of_one(cell):
    layer = make_layer(cell, num_layers=2, proj_size=4)
    x = torch.randn(6, layer.input_size, dtype=torch.float64)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    c0 = torch.randn(2, 12, dtype=torch.float64)
    out, (h, c) = layer(x, (h0, c0))
    out_b, (h_b, c_b) = layer(x.unsqueeze(1), (h0.unsqueeze(1), c0.unsqueeze(1)))
    assert out.shape == (6, 4) and h.shape == (2, 4) and c.shape == (2, 12)
    torch.testing.assert_close(out, out_b.squeeze(1), **TOL)
    torch.testing.assert_close(h, h_b.squeeze(1), **TOL)
    torch.testing.assert_close(c, c_b.squeeze(1), **TOL)


def test_lstm_dropout_matches_nn_lstm_given_the_same_seed():
    layer = make_layer("lstm", num_layers=3, proj_size=4, dropout=0.5)
    lstm = layer.to_lstm()
    x, hx = _inputs(layer, requires_grad=False)
    torch.manual_seed(7)
    out, _ = layer(x, hx)
    torch.manual_seed(7)
    ref, _ = lstm(x, hx)
    torch.testing.assert_close(out, ref, **TOL)
    layer.eval()
    lstm.eval()
    torch.testing.assert_close(layer(x, hx)[0], lstm(x, hx)[0], **TOL)


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_dropout_applies_between_layers_only_in_training(cell):
    layer = make_layer(cell, num_layers=2, dropout=0.5)
    x, hx = _inputs(layer, requires_grad=False)
    train_a = layer(x, hx)[0]
    train_b = layer(x, hx)[0]
    layer.eval()
    eval_a, eval_b = layer(x, hx)[0], layer(x, hx)[0]
    assert not torch.allclose(train_a, train_b)
    torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)
    single = make_layer(cell, num_layers=1, dropout=0.5)  # no layer after the last: dropout is a no-op
    torch.testing.assert_close(single(x)[0], single(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional,lengths", [(False, None), (True, [1, 3, 2])])
@pytest.mark.parametrize("coupled", [False, True], ids=["lstm4", "cifg"])
def test_gradcheck_through_the_layer(cell, bidirectional, lengths, coupled):
    """The fast path's backward, through a whole stack; the second case a bidirectional stack on an
    unsorted packed batch (a length-1 sequence: it starts and ends at step 0 in both directions)."""
    layer = make_layer(cell, input_size=4, hidden_size=4, num_layers=2, proj_size=2, forget_bias=0.5,
                       bidirectional=bidirectional, coupled_gates=coupled)
    batch, states = (2, 2) if lengths is None else (3, 4)
    x = torch.randn(3, batch, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(states, batch, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(states, batch, 4, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0, *params):
        names = [name for name, _ in layer.named_parameters()]
        inputs = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = functional_call(layer, dict(zip(names, params)), (inputs, (h0, c0)))
        return packed_data(out), h, c

    # the bidirectional case in fast mode (a random projection of the Jacobian, seconds instead of a
    # minute on 2 cores): the full Jacobian of the same packed backward is checked per layer in
    # test_ops_layers.py
    assert torch.autograd.gradcheck(f, (x, h0, c0, *[p.detach().requires_grad_() for p in layer.parameters()]),
                                    fast_mode=bidirectional)


# ----------------------------------------------------------------- structure
def test_glstm_groups_have_independent_weights():
    """Group j's weights reach only cells of group j (TensorFlow issue #16703 tied them)."""
    layer = make_layer("glstm", input_size=8, hidden_size=12, bias=False)
    assert layer.groups == (2,)
    w_ih, w_hh, _ = layer.dense_gate_weights(0)
    n, g = 12, 2
    for gate in range(4):
        for j in range(g):
            rows = slice(gate * n + j * n // g, gate * n + (j + 1) * n // g)
            for other in range(g):
                if other != j:
                    assert torch.all(w_ih[rows, other * 4 : (other + 1) * 4] == 0)
                    assert torch.all(w_hh[rows, other * 6 : (other + 1) * 6] == 0)
    assert not torch.equal(layer.weight_ih_l0[0], layer.weight_ih_l0[1])
    # gradient through one group's cells only touches that group's weights
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    _, (_, c) = layer(x)
    c[..., :6].sum().backward()  # cells 0..5 = group 0
    assert layer.weight_ih_l0.grad[0].abs().sum() > 0
    assert torch.all(layer.weight_ih_l0.grad[1] == 0)


def test_glstm_hierarchical_groups_per_layer():
    layer = fnn.GLSTM(16, 32, num_layers=2, proj_size=16, groups=(4, 8))
    assert layer.groups == (4, 8)
    assert layer.weight_ih_l0.shape == (4, 32, 4) and layer.weight_hh_l0.shape == (4, 32, 4)
    assert layer.weight_ih_l1.shape == (8, 16, 2) and layer.weight_hh_l1.shape == (8, 16, 2)
    assert "groups=[4, 8]" in repr(layer)

@pytest.mark.parametrize("impl", ["torch", "auto", "reference"])
def test_glstm_weights_in_either_memory_layout_give_the_same_results(impl):
    """The group weights are stored transposed within each group (GLSTM._empty_parameter); a user who
    assigns contiguous tensors (``.data =``, or a plain load) gets the same function and gradients,
    and a state_dict saved from one layout loads into the other."""
    torch.manual_seed(0)
    layer = make_layer("glstm", input_size=8, hidden_size=12, proj_size=4, num_layers=2)
    assert layer.weight_ih_l0.stride() == (24 * 4, 1, 24) and not layer.weight_ih_l0.is_contiguous()
    other = make_layer("glstm", input_size=8, hidden_size=12, proj_size=4, num_layers=2)
    other.load_state_dict(layer.state_dict())
    assert other.weight_hh_l1.stride() == layer.weight_hh_l1.stride()  # loading keeps the layout
    for name, p in other.named_parameters():
        p.data = p.data.contiguous()
    layer.impl = other.impl = impl
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    outputs = []
    for module in (layer, other):
        out, (h, c) = module(x)
        (out.square().sum() + h.sum() + c.sum()).backward()
        outputs.append((out, h, c, [p.grad for p in module.parameters()]))
    (o1, h1, c1, g1), (o2, h2, c2, g2) = outputs
    for a, b in zip((o1, h1, c1, *g1), (o2, h2, c2, *g2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # the one-step path reads both layouts too
        for a, b in zip(layer(x[:1])[0], other(x[:1])[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)



def test_flstm_per_layer_rank_shapes():
    layer = fnn.FLSTM(10, 20, num_layers=2, proj_size=6, rank=(7, 3))
    assert layer.weight_w1_l0.shape == (7, 16) and layer.weight_w2_l0.shape == (80, 7)
    assert layer.weight_w1_l1.shape == (3, 12) and layer.weight_w2_l1.shape == (80, 3)
    assert "rank=[7, 3]" in repr(layer)


def test_repr_shows_only_non_default_arguments():
    assert repr(fnn.LSTM(3, 5)) == "LSTM(3, 5)"
    assert repr(fnn.FLSTM(3, 5, batch_first=True, rank=2)) == "FLSTM(3, 5, batch_first=True, rank=2)"


# ---------------------------------------------------------- nn.LSTM interop
@pytest.mark.parametrize("proj_size,bidirectional", [(0, False), (3, False), (0, True), (3, True)])
def test_from_lstm_and_state_dict_of_nn_lstm(proj_size, bidirectional):
    torch_lstm = torch.nn.LSTM(5, 7, num_layers=2, proj_size=proj_size, batch_first=True,
                               bidirectional=bidirectional).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    expected, (eh, ec) = torch_lstm(x)
    for forget_bias in (0.0, 1.0):
        wrapped = fnn.LSTM.from_lstm(torch_lstm, forget_bias=forget_bias)
        assert wrapped.batch_first and wrapped.bidirectional == bidirectional
        assert wrapped.weight_ih_l0.dtype == torch.float64
        out, (h, c) = wrapped(x)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(c, ec, **TOL)
    loaded = fnn.LSTM(5, 7, num_layers=2, proj_size=proj_size, batch_first=True, bidirectional=bidirectional).double()
    loaded.load_state_dict(torch_lstm.state_dict())
    torch.testing.assert_close(loaded(x)[0], expected, **TOL)
    # torch.nn.LSTM's names, less its redundant second bias; _reverse for the reverse direction
    torch_names = [name for name, _ in torch_lstm.named_parameters() if not name.startswith("bias_hh")]
    assert [name for name, _ in loaded.named_parameters()] == [name.replace("bias_ih", "bias") for name in torch_names]


def test_from_lstm_rejects_bad_input():
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        fnn.LSTM.from_lstm(torch.nn.GRU(3, 4))


@pytest.mark.parametrize("cell", CELLS)
def test_reverse_parameters_are_their_own(cell):
    """Every tensor has a ``_reverse`` twin of the same shape, initialised on its own; the reverse
    direction reads only the twins (a gradient through the reverse outputs alone reaches no forward
    parameter of the last layer)."""
    layer = make_layer(cell, num_layers=2, proj_size=4, bidirectional=True)
    params = dict(layer.named_parameters())
    forward = [name for name in params if not name.endswith("_reverse")]
    assert sorted(params) == sorted(forward + [f"{name}_reverse" for name in forward])
    for name in forward:
        assert params[f"{name}_reverse"].shape == params[name].shape
        assert not torch.equal(params[f"{name}_reverse"], params[name])
    out, _ = layer(torch.randn(5, 3, 8, dtype=torch.float64))
    assert out.shape == (5, 3, 8)  # D·p
    out[..., 4:].sum().backward()  # the reverse direction's features of the last layer
    for name in forward:
        if name.endswith("_l1"):
            assert params[name].grad is None or torch.all(params[name].grad == 0), name
            assert params[f"{name}_reverse"].grad.abs().sum() > 0
    assert "bidirectional=True" in repr(layer)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_batch_equals_each_sequence_on_its_own(cell):
    """A packed unsorted batch: each sequence's output and final states are what it gives alone
    (batch of one, exactly its own length), in both directions; padding never enters."""
    layer = make_layer(cell, num_layers=2, proj_size=4, bidirectional=True)
    lengths = [2, 5, 1, 4]
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    x_garbage = x.clone()
    for b, length in enumerate(lengths):
        x_garbage[length:, b] = 1e6  # padding that would show anywhere it leaked into
    h0 = torch.randn(4, 4, 4, dtype=torch.float64)
    c0 = torch.randn(4, 4, 12, dtype=torch.float64)
    packed_out, (h, c) = layer(pack_padded_sequence(x_garbage, lengths, enforce_sorted=False), (h0, c0))
    out, out_lengths = pad_packed_sequence(packed_out)
    assert out_lengths.tolist() == lengths
    for b, length in enumerate(lengths):
        alone, (h_b, c_b) = layer(x[:length, b : b + 1], (h0[:, b : b + 1], c0[:, b : b + 1]))
        torch.testing.assert_close(out[:length, b : b + 1], alone, **TOL)
        torch.testing.assert_close(h[:, b : b + 1], h_b, **TOL)
        torch.testing.assert_close(c[:, b : b + 1], c_b, **TOL)


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize("p_in,n,p,L", [(8, 12, 0, 1), (8, 12, 4, 3), (16, 32, 8, 2)])
def test_parameter_counts_exact(p_in, n, p, L):
    out = p or n
    proj = p * n if p else 0
    dense = sum(4 * n * ((p_in if k == 0 else out) + out) + 4 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.LSTM(p_in, n, num_layers=L, proj_size=p)) == dense
    torch_lstm = torch.nn.LSTM(p_in, n, num_layers=L, proj_size=p)
    assert fnn.count_parameters(torch_lstm) == dense + 4 * n * L  # nn.LSTM has two biases
    r = 3
    flstm = sum(r * ((p_in if k == 0 else out) + out) + 4 * n * r + 4 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.FLSTM(p_in, n, num_layers=L, proj_size=p, rank=r)) == flstm
    g = 2 if out % 4 else 4
    glstm = sum(4 * n * ((p_in if k == 0 else out) + out) // g + 4 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.GLSTM(p_in, n, num_layers=L, proj_size=p, groups=g)) == glstm
    no_bias = fnn.count_parameters(fnn.GLSTM(p_in, n, num_layers=L, proj_size=p, groups=g, bias=False))
    assert no_bias == glstm - 4 * n * L
    # coupled input and forget gates: 3 gate blocks, 3/4 of every gate parameter
    coupled = dict(num_layers=L, proj_size=p, coupled_gates=True)
    assert fnn.count_parameters(fnn.LSTM(p_in, n, **coupled)) == sum(
        3 * n * ((p_in if k == 0 else out) + out) + 3 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.FLSTM(p_in, n, rank=r, **coupled)) == sum(
        r * ((p_in if k == 0 else out) + out) + 3 * n * r + 3 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.GLSTM(p_in, n, groups=g, **coupled)) == sum(
        3 * n * ((p_in if k == 0 else out) + out) // g + 3 * n + proj for k in range(L))


@pytest.mark.parametrize("cell", CELLS)
def test_macs_per_token_match_the_dense_equivalent(cell):
    layer = make_layer(cell, num_layers=2, proj_size=4)
    # the diagonal LSTM with a projection has no dense equivalent; one of the same sizes has the same weights
    dense = layer.to_lstm() if has_dense_equivalent(layer) else torch.nn.LSTM(8, 12, num_layers=2, proj_size=4)
    dense_macs = fnn.LSTM(8, 12, num_layers=2, proj_size=4).macs_per_token()
    assert dense_macs == sum(w.numel() for name, w in dense.named_parameters() if "weight" in name)
    if cell == "lstm":
        assert layer.macs_per_token() == dense_macs
    elif cell == "circulant":  # counts what its method runs: the materialised W, dense (FFT: test_circulant.py)
        layer.method = "dense"
        assert layer.macs_per_token() == dense_macs
    else:  # the factorized map costs its own parameter count (no bias) per token
        weights = sum(w.numel() for name, w in layer.named_parameters() if "weight" in name)
        assert layer.macs_per_token() == weights
    # coupled gates: the dense gate map (the dense LSTM's, C-LSTM's dense method's) costs 3/4 of the
    # uncoupled one, every other cell's map its weights
    coupled = make_layer(cell, num_layers=2, proj_size=4, coupled_gates=True)
    if cell in ("lstm", "circulant"):
        coupled.method = "dense"  # C-LSTM's; a plain attribute on the dense LSTM, read by nothing
        projection = 2 * 4 * 12
        assert coupled.macs_per_token() - projection == (dense_macs - projection) * 3 // 4
    else:
        assert coupled.macs_per_token() == sum(w.numel() for name, w in coupled.named_parameters()
                                               if "weight" in name)


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=10, hidden_size=12, groups=4), r"groups=4 does not divide the input size 10"),
        (dict(input_size=8, hidden_size=10, groups=4), r"hidden_size 10"),
        (dict(input_size=8, hidden_size=12, proj_size=6, groups=4), r"output size 6"),
        (dict(input_size=8, hidden_size=16, num_layers=2, proj_size=12, groups=(4, 8)), r"layer 1: groups=8"),
        (dict(input_size=8, hidden_size=12, groups=(2, 2)), r"groups has 2 entries \[2, 2\] but num_layers=1"),
        (dict(input_size=8, hidden_size=12, groups=0), r"groups must be an integer >= 1, got 0"),
    ],
)
def test_glstm_size_errors_name_the_sizes(kwargs, match):
    kwargs = dict(kwargs)
    input_size, hidden_size = kwargs.pop("input_size"), kwargs.pop("hidden_size")
    with pytest.raises(ValueError, match=match):
        fnn.GLSTM(input_size, hidden_size, **kwargs)


@pytest.mark.parametrize(
    "rank,match",
    [(0, "rank must be an integer >= 1, got 0"), (2.5, "got 2.5"), ((2, 3), "rank has 2 entries"), ("4", "got '4'")],
)
def test_flstm_rank_errors(rank, match):
    with pytest.raises(ValueError, match=match):
        fnn.FLSTM(4, 8, rank=rank)


def test_factorized_layers_require_their_argument():
    with pytest.raises(TypeError, match="rank"):
        fnn.FLSTM(4, 8)
    with pytest.raises(TypeError, match="groups"):
        fnn.GLSTM(4, 8)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(proj_size=12), ValueError, "proj_size must be smaller than hidden_size"),
        (dict(proj_size=-1), ValueError, "proj_size must be an integer >= 0, got -1"),
        (dict(num_layers=0), ValueError, "num_layers must be an integer >= 1, got 0"),
        (dict(dropout=1.5), ValueError, r"dropout must be a number in \[0, 1\], got 1.5"),
        (dict(forget_bias=float("nan")), ValueError, "forget_bias must be a finite number"),
        (dict(input_size=0), ValueError, "input_size must be an integer >= 1, got 0"),
    ],
)
def test_constructor_errors(cell, kwargs, error, match):
    kwargs = dict(kwargs)  # parametrize shares the dict between cells
    input_size = kwargs.pop("input_size", 8)
    with pytest.raises(error, match=match):
        make_layer(cell, input_size, 12, **kwargs)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_errors(cell):
    layer = make_layer(cell, num_layers=2, proj_size=4)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input.size\(-1\) must equal input_size=8, got 7"):
        layer(torch.randn(5, 3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"2-D \(unbatched\) or 3-D input, or a PackedSequence, got \(1, 5, 3, 8\)"):
        layer(x.unsqueeze(0))
    with pytest.raises(ValueError, match=r"sequence is empty"):
        layer(x[:0])
    with pytest.raises(ValueError, match=r"expected h_0 of shape \(2, 3, 4\), got \(2, 3, 12\)"):
        layer(x, (torch.zeros(2, 3, 12, dtype=torch.float64), torch.zeros(2, 3, 12, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"expected c_0 of shape \(2, 3, 12\), got \(1, 3, 12\)"):
        layer(x, (torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(1, 3, 12, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"hx must be a tuple \(h_0, c_0\)"):
        layer(x, torch.zeros(2, 3, 4))
    packed = pack_padded_sequence(x, [5, 4, 2])
    with pytest.raises(ValueError, match=r"expected h_0 of shape \(2, 3, 4\), got \(2, 2, 4\)"):
        layer(packed, (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 12, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"a PackedSequence's data must be 2-D \(rows, input_size\), got shape "
                                         r"\(11, 1, 8\)"):
        layer(PackedSequence(packed.data[:, None], packed.batch_sizes))
    with pytest.raises(ValueError, match=r"impl must be one of \('reference', 'torch'.*\), got 'triton-magic'"):
        layer.impl = "triton-magic"  # refused when set, not at the next forward
    assert layer.impl == "auto"


def _wrong_shapes():
    """(label, input, hx) that torch.nn.LSTM(8, 12, num_layers=2, proj_size=4, bidirectional=True)
    refuses: L·D = 4 states of batch 3."""
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    h, c = torch.zeros(4, 3, 4, dtype=torch.float64), torch.zeros(4, 3, 12, dtype=torch.float64)
    packed = pack_padded_sequence(x, [2, 5, 4], enforce_sorted=False)
    return [
        ("input size", torch.randn(5, 3, 7, dtype=torch.float64), None),
        ("4-D input", x[None], None),
        ("h_0 of one direction", x, (h[:2], c[:2])),
        ("c_0 of another batch", x, (h, c[:, :2])),
        ("3-D state, unbatched input", x[:, 0], (h, c)),
        ("packed input size", pack_padded_sequence(torch.randn(5, 3, 7, dtype=torch.float64), [5, 4, 2]), None),
        ("packed, h_0 of another batch", packed, (h[:, :2], c[:, :2])),
    ]


@pytest.mark.parametrize("cell", CELLS)
def test_wrong_shapes_raise_where_torch_nn_lstm_raises_and_as_it_does(cell):
    """Each shape torch.nn.LSTM refuses is refused too, with an exception that ``except`` clauses
    written for torch.nn.LSTM's (RuntimeError, or ValueError for the input's rank) catch."""
    layer = make_layer(cell, num_layers=2, proj_size=4, bidirectional=True)
    lstm = torch.nn.LSTM(8, 12, num_layers=2, proj_size=4, bidirectional=True).double()
    for label, inputs, hx in _wrong_shapes():
        with pytest.raises((RuntimeError, ValueError)) as theirs:
            lstm(inputs, hx)
        with pytest.raises(type(theirs.value)) as ours:
            layer(inputs, hx)
        assert isinstance(ours.value, InputShapeError), label


# ---------------------------------------------------------------------------- impl


def _run_all(layer, x, hx, packed=None):
    """Output, both states and the gradient of every input, state and parameter; x packed first
    (each call anew: a backward frees the packing's graph) unless ``packed`` is None."""
    out, (h, c) = layer(_pack(x, packed, batch_first=False), hx)
    # materialize_grads: the diagonal LSTM with a projection does not read h_0 (zero gradient)
    grads = torch.autograd.grad(weighted_loss(out, h, c), [x, *hx, *layer.parameters()], materialize_grads=True)
    return [packed_data(out), h, c, *grads]


def _loops_used(monkeypatch) -> list[str]:
    """Records the name of the time loop factorlm.ops picks on each call from now on."""
    from factorlm.ops import _backend

    used, select = [], _backend.select

    def recording(x, impl="auto"):
        loop = select(x, impl)
        used.append(loop.name)
        return loop

    monkeypatch.setattr(_backend, "select", recording)
    return used


def _implementations(cell: str, coupled: bool) -> tuple[str, ...]:
    """The impls a layer of the cell takes (the dense LSTM's depend on coupled_gates: with them it runs
    the G-LSTM's loops, so its class attribute is a property)."""
    return make_layer(cell, coupled_gates=coupled)._implementations


# the dense LSTM and G∘F-LSTM have no "extension" (test_dense_lstm_refuses_the_factorized_loops,
# test_gflstm.py); impl="triton" is checked the same way in test_ops_triton.py (on a CPU it needs
# Triton's interpreter)
@pytest.mark.parametrize(
    "cell,impl,coupled", [(c, i, coupled) for c in CELLS for i in ("torch", "extension", "auto")
                          for coupled in (False, True) if i in _implementations(c, coupled)]
)
@pytest.mark.parametrize("bidirectional,packed", [(False, None), (True, "unsorted")])
def test_every_impl_matches_the_reference_in_float64(cell, impl, coupled, bidirectional, packed, monkeypatch):
    """Every impl against the reference; the coupled dense LSTM runs on the G-LSTM loops (k = 1)."""
    from factorlm.ops import _extension

    extension = _extension.is_available()
    if impl == "extension" and not extension:
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    layer = make_layer(cell, num_layers=2, proj_size=4, per_layer=True, forget_bias=0.7, bidirectional=bidirectional,
                       coupled_gates=coupled)
    x, hx = _inputs(layer, batch=3 if packed is None else 4)
    layer.impl = "reference"
    expected = _run_all(layer, x, hx, packed)
    layer.impl = impl
    used = _loops_used(monkeypatch)
    got = _run_all(layer, x, hx, packed)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    if cell == "lstm" and not coupled:
        assert used == []  # torch.lstm, not a factorlm time loop
    else:  # one per layer and direction
        auto = "extension" if extension and "extension" in layer._implementations else "torch"
        assert used == [impl if impl != "auto" else auto] * 2 * layer.num_directions


def test_impl_values_are_checked_when_set():
    layer = make_layer("flstm")
    assert layer.impl == "auto"  # the default
    allowed = r"\('reference', 'torch', 'extension', 'triton', 'auto'\)"
    for bad in ("Torch", "", None, 1):
        with pytest.raises(ValueError, match=rf"FLSTM.impl must be one of {allowed}, got {re.escape(repr(bad))}$"):
            layer.impl = bad
    assert layer.impl == "auto"  # unchanged by the refused values


def test_fast_is_a_deprecated_alias_of_auto():
    layer = make_layer("glstm")
    layer.impl = "reference"
    with pytest.warns(DeprecationWarning, match=r"GLSTM.impl='fast' is deprecated, use 'auto'"):
        layer.impl = "fast"
    assert layer.impl == "auto"


def test_dense_lstm_refuses_the_factorized_loops():
    layer = make_layer("lstm")
    for impl in ("extension", "triton"):
        with pytest.raises(ValueError, match=rf"LSTM.impl must be one of \('reference', 'torch', 'auto'\), got '{impl}'"):
            layer.impl = impl
    layer.impl = "torch"
    assert layer.impl == "torch"


def test_forcing_a_loop_that_cannot_run_the_input_raises_clearly():
    layer = make_layer("flstm").to(torch.bfloat16)
    x = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    layer.impl = "extension"
    with pytest.raises(RuntimeError, match=r"impl='extension': the C\+\+ recurrence runs CPU float32/float64 tensors "
                                           r"only, got torch.bfloat16 on cpu"):
        layer(x)
    layer.impl = "auto"  # picks a loop that can run it
    assert layer(x)[0].dtype == torch.bfloat16


def test_set_impl_reaches_every_layer_of_a_language_model():
    from factorlm.models import LanguageModel, ModelConfig

    config = ModelConfig(vocab_size=11, embedding_size=8, hidden_size=8, num_layers=2, cell="glstm", groups=2,
                         residual=True)
    lm = LanguageModel(config).double()
    layers = [m for m in lm.modules() if isinstance(m, (fnn.LSTM, fnn.FLSTM, fnn.GLSTM))]
    assert len(layers) == 2  # residual: one module per layer
    tokens = torch.randint(0, 11, (5, 3))
    fast = lm(tokens)[0]
    assert fnn.set_impl(lm, "reference") is lm
    assert [m.impl for m in layers] == ["reference", "reference"]
    torch.testing.assert_close(lm(tokens)[0], fast, **TOL)
    fnn.set_impl(lm, "torch")
    assert [m.impl for m in layers] == ["torch", "torch"]
    with pytest.raises(ValueError, match=r"impl must be one of \('reference', 'torch', 'extension', 'triton', 'auto'\), "
                                         r"got 'plain'"):
        fnn.set_impl(lm, "plain")
    assert [m.impl for m in layers] == ["torch", "torch"]


def test_set_impl_changes_no_layer_when_one_refuses():
    both = torch.nn.ModuleList([make_layer("flstm"), make_layer("lstm")])
    with pytest.raises(ValueError, match=r"LSTM.impl must be one of \('reference', 'torch', 'auto'\), got 'triton'"):
        fnn.set_impl(both, "triton")
    assert [m.impl for m in both] == ["auto", "auto"]
    plain = torch.nn.Linear(2, 2)
    assert fnn.set_impl(plain, "reference") is plain  # no factorlm layer: nothing to do


def test_impl_survives_pickling_and_old_pickles_load():
    layer = make_layer("flstm")
    layer.impl = "torch"
    assert pickle.loads(pickle.dumps(layer)).impl == "torch"
    state = dict(layer.__dict__)  # as pickled before impl was a property: a plain attribute, maybe "fast"
    del state["_impl"]
    state["impl"] = "fast"
    old = fnn.FLSTM.__new__(fnn.FLSTM)
    old.__setstate__(state)
    assert old.impl == "auto"
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(old(x)[0], layer(x)[0], **TOL)


STEP_GRID = pairwise(
    {"num_layers": [1, 2], "proj_size": [0, 4], "bias": [True, False], "forget_bias": [0.0, 0.7],
     "layout": ["batched", "batch_first", "unbatched"], "batch": [1, 3], "zero_state": [False, True],
     "mode": ["no_grad", "inference_mode"]},
    allowed=lambda row: not (row["layout"] == "unbatched" and row["batch"] != 1),
)


@pytest.mark.parametrize("cell", ["flstm", "glstm", "gflstm"])
@pytest.mark.parametrize("case", STEP_GRID, ids=lambda case: "-".join(f"{v}" for v in case.values()))
def test_one_step_without_autograd_runs_the_step_function_and_equals_nn_lstm(cell, case, monkeypatch):
    """A one-step call under no_grad / inference_mode on the PyTorch loop goes through the layer's
    _step_function, once per layer, and gives what torch.nn.LSTM (the layer's to_lstm()) gives, in
    every layout; h_n is not a view of the output."""
    torch.manual_seed(0)
    layout = case["layout"]
    layer = make_layer(cell, num_layers=case["num_layers"], proj_size=case["proj_size"], bias=case["bias"],
                       forget_bias=case["forget_bias"], batch_first=layout == "batch_first")
    layer.impl = "torch"
    with torch.no_grad():
        for t in layer.parameters():
            t.add_(torch.randn_like(t) * 0.3)  # off the initial values' scale, so that every term shows
    lstm = layer.to_lstm()
    x, hx = _inputs(layer, batch=case["batch"], steps=1, zero_state=case["zero_state"], requires_grad=False)
    if layout == "unbatched":
        x, hx = x[:, 0], None if hx is None else (hx[0][:, 0], hx[1][:, 0])
    calls = []
    real = type(layer)._step_function
    monkeypatch.setattr(type(layer), "_step_function", staticmethod(lambda *a: calls.append(1) or real(*a)))
    with getattr(torch, case["mode"])():
        output, (h_n, c_n) = layer(x, hx)
    assert len(calls) == layer.num_layers
    expected_output, (expected_h, expected_c) = lstm(x, hx)
    torch.testing.assert_close(output, expected_output, **TOL)
    torch.testing.assert_close(h_n, expected_h, **TOL)
    torch.testing.assert_close(c_n, expected_c, **TOL)
    with torch.inference_mode(case["mode"] == "inference_mode"):
        output.zero_()
    torch.testing.assert_close(h_n, expected_h, **TOL)


@pytest.mark.parametrize("cell", ["flstm", "glstm", "gflstm"])
def test_the_step_function_runs_only_for_one_step_without_autograd_on_the_pytorch_loop(cell, monkeypatch):
    """Everything else goes the general way: more than one step, autograd on, the reference, the
    C++ loop, a bidirectional layer; and "auto" takes the step only where it means the PyTorch loop."""
    from factorlm import ops

    torch.manual_seed(0)
    calls = []
    layer = make_layer(cell)
    real = type(layer)._step_function
    monkeypatch.setattr(type(layer), "_step_function", staticmethod(lambda *a: calls.append(1) or real(*a)))
    x1, x2 = torch.randn(1, 2, layer.input_size, dtype=torch.float64), torch.randn(2, 2, layer.input_size,
                                                                                 dtype=torch.float64)

    def steps(impl, x, grad=False, target=layer):
        calls.clear()
        target.impl = impl
        with torch.set_grad_enabled(grad):
            target(x)
        return len(calls)

    assert steps("torch", x1) == 1
    assert steps("torch", x2) == 0
    assert steps("torch", x1, grad=True) == 0
    assert steps("reference", x1) == 0
    has_extension = "extension" in layer._implementations  # the dense LSTM has no C++ loop
    assert steps("auto", x1) == int(ops.runs_torch_loop(x1, "auto", has_extension))
    if fnn_extension_available() and has_extension:
        assert steps("extension", x1) == 0
    assert steps("torch", x1, target=make_layer(cell, bidirectional=True)) == 0


# every cell with a one-step path (C-LSTM has none: its one step runs the general way)
@pytest.mark.parametrize("cell", [c for c in CELLS if make_layer(c, coupled_gates=True)._step_function is not None])
@pytest.mark.parametrize("num_layers,proj_size,batch", [(1, 0, 1), (2, 4, 3)])
def test_coupled_one_step_runs_the_step_function_and_equals_the_reference(cell, num_layers, proj_size, batch):
    """A coupled layer's one-step path (the dense one's too: G-LSTM's step with one group) gives
    the per-step reference's output and states."""
    torch.manual_seed(0)
    layer = make_layer(cell, num_layers=num_layers, proj_size=proj_size, forget_bias=0.7, coupled_gates=True)
    assert layer._step_function is not None
    x, hx = _inputs(layer, batch=batch, steps=1, requires_grad=False)
    results = []
    for impl in ("torch", "reference"):
        layer.impl = impl
        with torch.no_grad():
            output, (h_n, c_n) = layer(x, hx)
        results.append((output, h_n, c_n))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_a_layer_pickled_before_coupled_gates_loads_uncoupled():
    layer = make_layer("glstm")
    state = dict(layer.__dict__)
    del state["coupled_gates"]
    old = fnn.GLSTM.__new__(fnn.GLSTM)
    old.__setstate__(state)
    assert old.coupled_gates is False and old.num_gates == 4


def fnn_extension_available() -> bool:
    from factorlm.ops import _extension

    return _extension.is_available()


def test_small_cpu_calls_of_the_dense_lstm_run_torch_lstm_without_onednn(monkeypatch):
    """torch.lstm hands a projection-free CPU call to oneDNN, which re-lays out the weights on every
    call (5-11x slower token by token): calls of fewer than NATIVE_LSTM_MAX_ROWS rows run with it off,
    larger ones as before, the flag is given back, and the results are nn.LSTM's."""
    from factorlm.nn import lstm as lstm_module

    seen = []
    real = torch.lstm
    monkeypatch.setattr(torch, "lstm", lambda *a: seen.append(torch._C._get_mkldnn_enabled()) or real(*a))
    stock = torch.nn.LSTM(8, 12, num_layers=2).eval()
    layer = fnn.LSTM.from_lstm(stock).eval()
    assert torch._C._get_mkldnn_enabled()
    for steps, batch in ((1, 1), (3, 4), (lstm_module.NATIVE_LSTM_MAX_ROWS, 1)):
        x = torch.randn(steps, batch, 8)
        with torch.no_grad():
            out, (h, c) = layer(x)
            ref_out, (ref_h, ref_c) = stock(x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, ref_c, rtol=0, atol=1e-6)
    assert seen == [False, False, True]  # (nn.LSTM calls torch._VF.lstm, not recorded)
    assert torch._C._get_mkldnn_enabled()
