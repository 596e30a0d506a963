"""What is specific to G∘F-LSTM (groups of low rank): it is F-LSTM at one group and holds every
G-LSTM at full rank, its groups are independent, its counts, its size checks and warnings, and its
fast path (gradcheck of the hand-written backward, padded and packed; the inference scan; the
loops it runs). The generic layer contract runs over it in test_nn_layers.py /
test_nn_compile.py through the registry."""

from __future__ import annotations

import itertools

import re
import warnings

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_sequence

import factorlm.nn as fnn
from factorlm.errors import ConfigWarning
from factorlm.ops import _backend, _extension, _function, _scan_torch, gflstm_layer
from factorlm.ops.flstm import flstm_layer
from factorlm.ops.gflstm import GFLSTMFunction

TOL = dict(rtol=1e-10, atol=1e-12)
PACKED = (3, 3, 2, 1)


def _grads(layer, x, hx=None):
    """out, h_n, c_n and the gradients of a loss through all three w.r.t. x, h_0, c_0 and every parameter."""
    out, (h, c) = layer(x, hx)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + (h**2).sum() + c.sum()
    inputs = [x, *(hx or ()), *layer.parameters()]
    return [out, h, c, *torch.autograd.grad(loss, inputs)]


def _inputs(layer, steps=5, batch=3):
    new = dict(dtype=torch.float64, requires_grad=True)
    states = layer.num_layers * layer.num_directions
    x = torch.randn(steps, batch, layer.input_size, **new)
    hx = (torch.randn(states, batch, layer.output_size, **new), torch.randn(states, batch, layer.hidden_size, **new))
    return x, hx


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("proj_size,bidirectional", [(0, False), (4, True)])
def test_one_group_is_exactly_flstm(impl, proj_size, bidirectional):
    """groups=1: F-LSTM's parameters (W1 and W2 with a leading group axis of 1), F-LSTM's function
    and gradients (the fast path runs F-LSTM's own function, on weights in another memory layout:
    equal to rounding)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, proj_size=proj_size, bidirectional=bidirectional, forget_bias=0.4)
    flstm = fnn.FLSTM(8, 12, rank=5, **kw).double()
    gflstm = fnn.GFLSTM(8, 12, groups=1, rank=5, **kw).double()
    assert fnn.count_parameters(gflstm) == fnn.count_parameters(flstm)
    assert gflstm.macs_per_token() == flstm.macs_per_token()
    names = dict(flstm.named_parameters())
    with torch.no_grad():
        for name, t in gflstm.named_parameters():
            t.copy_(names[name].view_as(t))  # weight_w1 (1, r, m) <- (r, m), weight_w2 (1, 4n, r) <- (4n, r)
    flstm.impl = gflstm.impl = impl
    x, hx = _inputs(flstm)
    got, expected = _grads(gflstm, x, hx), _grads(flstm, x, hx)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.view_as(a), **TOL)


@pytest.mark.parametrize("batch_sizes", [None, PACKED])
def test_the_grouped_scan_at_one_group_equals_flstm(batch_sizes):
    """The grouped scan itself (which gflstm_layer leaves to F-LSTM at k = 1) computes F-LSTM's
    function and gradients with one group: its bmms are F-LSTM's products."""
    torch.manual_seed(1)
    x, h0, c0, w1, w2, bias, w_hr = _layer_args(groups=1, rank=3, batch_sizes=batch_sizes)
    sizes = (2,) * 3 if batch_sizes is None else batch_sizes
    rows = x if batch_sizes is not None else x.reshape(-1, x.shape[-1])
    loop = _backend.select(x, "torch")
    got = GFLSTMFunction.apply(rows, h0, c0, w1, w2, bias, w_hr, 0.3, loop, sizes)
    expected = flstm_layer(x, h0, c0, w1[0], w2[0], bias, w_hr, 0.3, impl="torch", batch_sizes=batch_sizes)
    expected = (expected[0].reshape(rows.shape[0], -1), *expected[1:])
    leaves = [x, h0, c0, w1, w2, bias, w_hr]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    weights = [torch.randn_like(t) for t in got]
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weights)), leaves)
    expected_grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(expected, weights)), leaves)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("proj_size", [0, 4])
def test_full_rank_holds_every_glstm(groups, proj_size):
    """With r = (p_in + p)/k, W1^(j) = I and W2^(j) = [W_ih^(j) W_hh^(j)] give G-LSTM's function; and
    any G∘F-LSTM's per-group products W2^(j)·W1^(j) loaded into a G-LSTM give the G∘F-LSTM's
    (the dense equivalent is G-LSTM's block-diagonal pattern)."""
    torch.manual_seed(2)
    kw = dict(proj_size=proj_size, forget_bias=0.2)
    glstm = fnn.GLSTM(8, 12, groups=groups, **kw).double()
    p = glstm.output_size
    width = (8 + p) // groups
    with pytest.warns(ConfigWarning, match="save nothing"):  # full rank: not a saving, still a G∘F-LSTM
        gflstm = fnn.GFLSTM(8, 12, groups=groups, rank=width, **kw).double()
    with torch.no_grad():
        gflstm.weight_w1_l0.copy_(torch.eye(width, dtype=torch.float64).expand(groups, width, width))
        gflstm.weight_w2_l0.copy_(torch.cat([glstm.weight_ih_l0, glstm.weight_hh_l0], dim=2))
        gflstm.bias_l0.copy_(glstm.bias_l0)
        if proj_size:
            gflstm.weight_hr_l0.copy_(glstm.weight_hr_l0)
    x, hx = _inputs(glstm)
    for impl in ("torch", "reference"):
        gflstm.impl = glstm.impl = impl
        (out, (h, c)), (expected_out, (expected_h, expected_c)) = gflstm(x, hx), glstm(x, hx)
        for a, b in ((out, expected_out), (h, expected_h), (c, expected_c)):
            torch.testing.assert_close(a, b, **TOL)
    # the converse, at a low rank: the G∘F-LSTM's group products are a G-LSTM's weights
    low = fnn.GFLSTM(8, 12, groups=groups, rank=2, **kw).double()
    product = low.weight_w2_l0 @ low.weight_w1_l0  # (k, 4n/k, (p_in + p)/k)
    with torch.no_grad():
        glstm.weight_ih_l0.copy_(product[:, :, : 8 // groups])
        glstm.weight_hh_l0.copy_(product[:, :, 8 // groups :])
        glstm.bias_l0.copy_(low.bias_l0)
        if proj_size:
            glstm.weight_hr_l0.copy_(low.weight_hr_l0)
    for a, b in zip(low.dense_gate_weights(0), glstm.dense_gate_weights(0)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(low(x, hx)[0], glstm(x, hx)[0], **TOL)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_groups_have_independent_weights(impl):
    """Group j's cells after one step from a zero state depend on group j's factors and x slice
    only (TensorFlow issue #16703 tied G-LSTM's groups to one matrix): the gradient of group 0's
    cells reaches W1^(0), W2^(0) and x^(0), and nothing of group 1, and the converse."""
    torch.manual_seed(3)
    layer = fnn.GFLSTM(8, 12, groups=2, rank=3).double()
    layer.impl = impl
    x = torch.randn(1, 2, 8, dtype=torch.float64, requires_grad=True)
    _, (_, c) = layer(x)
    for j in range(2):
        cells = c[0, :, j * 6 : (j + 1) * 6].sum()
        gx, g1, g2 = torch.autograd.grad(cells, [x, layer.weight_w1_l0, layer.weight_w2_l0], retain_graph=True)
        other = 1 - j
        assert g1[other].abs().max() == 0 and g2[other].abs().max() == 0
        assert g1[j].abs().max() > 0 and g2[j].abs().max() > 0
        assert gx[..., other * 4 : (other + 1) * 4].abs().max() == 0
        assert gx[..., j * 4 : (j + 1) * 4].abs().max() > 0
    assert not torch.equal(layer.weight_w1_l0[0], layer.weight_w1_l0[1])


def test_parameter_shapes_and_counts_are_exact():
    """Per layer r·(p_in + p + 4n) gate parameters (k groups of r·((p_in + p)/k + 4n/k)), 4n bias,
    p·n projection; multiply-adds per token r·(p_in + p) + 4n·r + p·n; per-layer groups and ranks."""
    layer = fnn.GFLSTM(16, 32, num_layers=2, proj_size=8, groups=(4, 2), rank=(4, 5), bidirectional=True)
    shapes = {name: tuple(t.shape) for name, t in layer.named_parameters()}
    assert shapes["weight_w1_l0"] == (4, 4, (16 + 8) // 4)
    assert shapes["weight_w2_l0"] == (4, 128 // 4, 4)
    assert shapes["weight_w1_l1_reverse"] == (2, 5, (16 + 8) // 2)  # layer 1's input: both directions, 16
    assert shapes["weight_w2_l1_reverse"] == (2, 128 // 2, 5)
    layer0 = 4 * (16 + 8 + 128) + 128 + 8 * 32
    layer1 = 5 * (16 + 8 + 128) + 128 + 8 * 32
    assert fnn.count_parameters(layer) == 2 * (layer0 + layer1)
    assert layer.macs_per_token() == 2 * (4 * (16 + 8) + 128 * 4 + 8 * 32 + 5 * (16 + 8) + 128 * 5 + 8 * 32)
    assert repr(layer) == ("GFLSTM(16, 32, num_layers=2, bidirectional=True, proj_size=8, groups=[4, 2], "
                           "rank=[4, 5])")
    assert fnn.count_parameters(fnn.GFLSTM(12, 24, groups=3, rank=4, bias=False)) == 4 * (12 + 24 + 96)
    # coupled gates: 3n = 96 gate rows, W2 (k, 96/k, r), a 96 bias
    coupled = fnn.GFLSTM(16, 32, num_layers=2, proj_size=8, groups=(4, 2), rank=(4, 5), bidirectional=True,
                         coupled_gates=True)
    assert tuple(coupled.weight_w2_l0.shape) == (4, 96 // 4, 4) and tuple(coupled.bias_l1.shape) == (96,)
    layer0 = 4 * (16 + 8 + 96) + 96 + 8 * 32
    layer1 = 5 * (16 + 8 + 96) + 96 + 8 * 32
    assert fnn.count_parameters(coupled) == 2 * (layer0 + layer1)
    assert coupled.macs_per_token() == 2 * (4 * (16 + 8) + 96 * 4 + 8 * 32 + 5 * (16 + 8) + 96 * 5 + 8 * 32)


def test_weights_are_stored_column_major_within_each_group_without_changing_the_state_dict():
    layer = fnn.GFLSTM(8, 12, groups=2, rank=3)
    w1, w2 = layer.weight_w1_l0, layer.weight_w2_l0
    assert w1.stride() == (3 * 10, 1, 3) and w2.stride() == (24 * 3, 1, 24)
    state = layer.state_dict()
    assert state["weight_w1_l0"].shape == (2, 3, 10)
    other = fnn.GFLSTM(8, 12, groups=2, rank=3)
    other.load_state_dict(state)
    assert torch.equal(other.weight_w1_l0, w1) and other.weight_w1_l0.stride() == w1.stride()


def test_factors_are_initialised_by_their_groups_fan_in():
    torch.manual_seed(4)
    layer = fnn.GFLSTM(64, 128, groups=4, rank=16)
    assert layer.weight_w1_l0.abs().max() <= (4 / (64 + 128)) ** 0.5
    assert layer.weight_w1_l0.abs().max() > 0.9 * (4 / (64 + 128)) ** 0.5
    assert layer.weight_w2_l0.abs().max() <= 16 ** -0.5
    assert layer.weight_w2_l0.abs().max() > 0.9 * 16 ** -0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_size=6, groups=4), r"GFLSTM layer 0: groups=4 does not divide the input size 6; the input size, "
                                   r"hidden_size and output size must all be multiples of groups: here 1, 2, 3 or 6$"),
    (dict(hidden_size=10, groups=4), r"groups=4 does not divide the hidden_size 10, output size 10; .*: here 1 or 2$"),
    (dict(proj_size=6, groups=4), r"groups=4 does not divide the output size 6; .*: here 1 or 2$"),
    (dict(num_layers=2, proj_size=4, bidirectional=True, groups=(4, 8)),
     r"GFLSTM layer 1: groups=8 does not divide the hidden_size 12, output size 4; .*: here 1, 2 or 4$"),
    (dict(groups=0), r"groups must be an integer >= 1, got 0"),
    (dict(rank=0), r"rank must be an integer >= 1, got 0"),
    (dict(num_layers=2, rank=(3, 4, 5)), r"rank has 3 entries \[3, 4, 5\] but num_layers=2"),
])
def test_sizes_that_do_not_divide_are_refused_naming_the_value_and_what_divides(kwargs, match):
    kwargs = {"input_size": 8, "hidden_size": 12, "groups": 2, "rank": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        fnn.GFLSTM(kwargs.pop("input_size"), kwargs.pop("hidden_size"), **kwargs)


def test_both_arguments_are_required_and_shared_with_flstm_and_glstm():
    with pytest.raises(TypeError, match="rank"):
        fnn.GFLSTM(8, 12, groups=2)
    with pytest.raises(TypeError, match="groups"):
        fnn.GFLSTM(8, 12, rank=2)
    from factorlm.nn.registry import cell_arg_declarations, check_cell_args

    assert fnn.CELLS["gflstm"] is fnn.GFLSTM
    declared = cell_arg_declarations()
    assert [a.name for a in fnn.GFLSTM.cell_args] == ["groups", "rank"]
    for arg in fnn.GFLSTM.cell_args:  # one --groups / --rank option serves all three cells
        assert (arg.parse, arg.per_layer) == (declared[arg.name].parse, declared[arg.name].per_layer)
    with pytest.raises(ValueError, match=r"cell 'gflstm' needs rank"):
        check_cell_args("gflstm", {"groups": 2})


def test_a_rank_that_saves_nothing_warns_naming_the_threshold():
    with pytest.warns(ConfigWarning, match=re.escape(
            "G∘F-LSTM rank 9 with groups 2 in layer 0 gives each group 306 gate parameters, its dense 24 x 10 "
            "block 240: ranks from 8 on save nothing (and above 10, the block's full rank, add nothing)")):
        fnn.GFLSTM(8, 12, groups=2, rank=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnn.GFLSTM(8, 12, groups=2, rank=7)


# ------------------------------------------------------------------------------------- fast path
def _layer_args(groups, rank, p_in=4, n=8, p=4, bias=True, proj=True, batch_sizes=None, gates=4):
    """Random float64 leaves for gflstm_layer: x, h0, c0, W1, W2, bias, W_hr (x packed rows with
    ``batch_sizes``, else (3, 2, p_in)); ``gates`` gate blocks (3: coupled input and forget gates)."""
    new = dict(dtype=torch.float64, requires_grad=True)
    out = p if proj else n
    batch = 2 if batch_sizes is None else batch_sizes[0]
    x_shape = (3, batch, p_in) if batch_sizes is None else (sum(batch_sizes), p_in)
    return [
        torch.randn(*x_shape, **new),
        torch.randn(batch, out, **new),
        torch.randn(batch, n, **new),
        torch.randn(groups, rank, (p_in + out) // groups, **new),
        torch.randn(groups, gates * n // groups, rank, **new),
        torch.randn(gates * n, **new) if bias else None,
        torch.randn(p, n, **new) * 0.5 if proj else None,
    ]


def _loop(impl: str) -> str:
    """impl, skipping the test when it is the C++ loop and that cannot be built."""
    if impl == "extension" and not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    return impl


# the PyTorch loop over the whole grid; the C++ loop, which shares the G-LSTM cell kernels (gradchecked
# in test_ops_layers.py) and differs only in its products, on the projection/bias corners of it
@pytest.mark.parametrize("impl,proj,bias", [("torch", proj, bias) for proj in (False, True) for bias in (True, False)]
                         + [("extension", False, False), ("extension", True, True)])
@pytest.mark.parametrize("groups,rank", [(2, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("batch_sizes", [None, PACKED])
def test_gradcheck(impl, proj, bias, groups, rank, batch_sizes):
    """The hand-written backward (PyTorch and C++ loops) against finite differences, float64: every
    input, padded and packed."""
    torch.manual_seed(5)
    impl = _loop(impl)
    args = _layer_args(groups, rank, bias=bias, proj=proj, batch_sizes=batch_sizes)
    assert gradcheck(lambda *a: gflstm_layer(*a, forget_bias=0.5, impl=impl, batch_sizes=batch_sizes), args)


@pytest.mark.parametrize("impl", ["torch", "extension"])
@pytest.mark.parametrize("groups,rank", [(1, 2), (2, 3)])  # k = 1: F-LSTM's function
@pytest.mark.parametrize("batch_sizes", [None, PACKED])
def test_gradcheck_with_coupled_gates(impl, groups, rank, batch_sizes):
    """num_gates=3 (CIFG, [i, g, o], f = 1 - i): the same backward on 3n/k gate rows per group."""
    torch.manual_seed(15)
    impl = _loop(impl)
    args = _layer_args(groups, rank, batch_sizes=batch_sizes, gates=3)
    assert gradcheck(lambda *a: gflstm_layer(*a, forget_bias=0.5, impl=impl, batch_sizes=batch_sizes,
                                             num_gates=3), args)


@pytest.mark.parametrize("impl", ["torch", "extension"])
def test_gradcheck_where_the_weight_gradients_are_summed_narrow_side_first(impl):
    """Enough rows that W1's and W2's gradients and dL/dx take the transposed products
    (_function.NARROW_WEIGHT_GRAD / NARROW_INPUT_GRAD)."""
    torch.manual_seed(6)
    new = dict(dtype=torch.float64, requires_grad=True)
    k, r, p_in, p, n = 2, 3, 8, 4, 8
    x = torch.randn(6, 7, p_in, **new)  # 42 rows > 32
    args = [x, torch.randn(7, p, **new), torch.randn(7, n, **new), torch.randn(k, r, (p_in + p) // k, **new),
            torch.randn(k, 4 * n // k, r, **new), torch.randn(4 * n, **new), torch.randn(p, n, **new) * 0.5]
    assert _function._narrow_side_first(6 * 7, r, _function.NARROW_WEIGHT_GRAD)
    assert gradcheck(lambda *a: gflstm_layer(*a, forget_bias=0.2, impl=_loop(impl)), args)


def test_packed_batch_runs_each_sequence_for_its_own_length():
    torch.manual_seed(7)
    layer = fnn.GFLSTM(4, 8, groups=2, rank=2, proj_size=4).double()
    seqs = [torch.randn(t, 4, dtype=torch.float64) for t in (4, 2, 3)]
    out, (h, c) = layer(pack_sequence(seqs, enforce_sorted=False))
    for b, seq in enumerate(seqs):
        own, (h_b, c_b) = layer(seq[:, None])
        torch.testing.assert_close(h[:, b], h_b[:, 0], **TOL)
        torch.testing.assert_close(c[:, b], c_b[:, 0], **TOL)


@pytest.mark.parametrize("impl", ["torch", "extension"])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("batch_sizes", [None, PACKED])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_inference_forward_equals_the_training_forward(impl, proj, batch_sizes, mode, monkeypatch):
    """Without a backward to follow, the inference scan (one step's gates, (B, n) cell states) runs
    and gives the training forward's out, h_T, c_T; h0 and c0 are never written."""
    torch.manual_seed(8)
    impl = _loop(impl)
    args = _layer_args(2, 3, p_in=8, n=8, p=4, proj=proj, batch_sizes=batch_sizes)
    training = [t.detach() for t in gflstm_layer(*args, forget_bias=0.3, impl=impl, batch_sizes=batch_sizes)]
    initial = [t.detach().clone() for t in args[1:3]]
    calls = []
    monkeypatch.setattr(GFLSTMFunction, "apply", lambda *a: pytest.fail("the autograd Function ran without a backward"))
    monkeypatch.setattr(GFLSTMFunction, "infer",
                        staticmethod(lambda *a, real=GFLSTMFunction.infer: calls.append(1) or real(*a)))
    if mode == "nothing_requires_grad":
        inference = gflstm_layer(*[None if t is None else t.detach() for t in args], forget_bias=0.3, impl=impl,
                                 batch_sizes=batch_sizes)
    else:
        with getattr(torch, mode)():
            inference = gflstm_layer(*args, forget_bias=0.3, impl=impl, batch_sizes=batch_sizes)
    assert calls == [1]
    for a, b in zip(training, inference):
        torch.testing.assert_close(b, a, **TOL)
    for before, after in zip(initial, args[1:3]):
        assert torch.equal(before, after)


def test_auto_runs_the_cpp_loop_on_a_cpu_and_each_loop_runs_when_asked(monkeypatch):
    """impl="auto" on a CPU picks the C++ loop (when it builds); every loop, asked for by name, runs
    and gives the PyTorch loop's results."""
    if not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    monkeypatch.setenv(_backend.TRITON_ENV, "0")
    layer = fnn.GFLSTM(8, 12, groups=2, rank=3, proj_size=4).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    used, select = [], _backend.select
    monkeypatch.setattr(_backend, "select", lambda x, impl="auto": used.append(select(x, impl).name) or select(x, impl))
    results = {}
    for impl in ("auto", "extension", "torch"):
        layer.impl = impl
        out, (h, c) = layer(x)
        results[impl] = (out, h, c)
    assert used == ["extension", "extension", "torch"]
    for a, b in zip(results["extension"], results["torch"]):
        torch.testing.assert_close(a, b, **TOL)


def test_mis_sized_weights_are_refused_by_name():
    x, h0, c0, w1, w2, bias, w_hr = _layer_args(2, 3)
    with pytest.raises(ValueError, match=r"gflstm_layer: weight_w1 must be 3-D \(k, r, \(p_in \+ p\)/k\)"):
        gflstm_layer(x, h0, c0, w1[0], w2, bias, w_hr)
    with pytest.raises(ValueError, match=r"gflstm_layer: 3 groups must divide p_in = 4, p = 4 and n = 8"):
        gflstm_layer(x, h0, c0, torch.randn(3, 3, 2, dtype=torch.float64), w2, bias, w_hr)
    with pytest.raises(ValueError, match=r"gflstm_layer: weight_w2 must have shape \(2, 16, 3\) .* got \(2, 16, 2\)"):
        gflstm_layer(x, h0, c0, w1, w2[..., :2], bias, w_hr)
    with pytest.raises(ValueError, match=r"gflstm_layer: weight_w1 must have shape \(2, 3, 4\) .* got \(2, 3, 3\)"):
        gflstm_layer(x, h0, c0, w1[..., :3], w2, bias, w_hr)
    with pytest.raises(ValueError, match=r"gflstm_layer: weight_w2 must have shape \(2, 12, 3\) .* got \(2, 16, 3\)"):
        gflstm_layer(x, h0, c0, w1, w2, bias, w_hr, num_gates=3)  # 4 gates' rows for 3
    with pytest.raises(ValueError, match=r"gflstm_layer: num_gates must be 4 .* or 3 .*, got 5"):
        gflstm_layer(x, h0, c0, w1, w2, bias, w_hr, num_gates=5)


def test_step_function_equals_the_scan_in_every_batch_shape():
    """gflstm_step (batch 1's view path and the general one) against one step of the scan."""
    from factorlm.ops import gflstm_step

    torch.manual_seed(9)
    for batch, groups, gates in itertools.product((1, 3), (1, 2), (4, 3)):
        x, h0, c0, w1, w2, bias, w_hr = [None if t is None else t.detach()
                                         for t in _layer_args(groups, 3, gates=gates)]
        x, h0, c0 = x[0, :1].expand(batch, -1).contiguous(), h0[:1].repeat(batch, 1), c0[:1].repeat(batch, 1)
        for b in (bias, None):
            h, c = gflstm_step(x, h0, c0, w1, w2, b, w_hr, 0.4, gates)
            out, h_t, c_t = gflstm_layer(x[None], h0, c0, w1, w2, b, w_hr, 0.4, impl="torch", num_gates=gates)
            torch.testing.assert_close(h, h_t, **TOL)
            torch.testing.assert_close(c, c_t, **TOL)


def test_the_scans_are_registered_in_every_loop():
    assert _backend.TORCH_LOOP.gflstm_forward_scan.func is _scan_torch.gflstm_forward_scan
    assert _backend.TRITON_LOOP.gflstm_backward_scan.func is _scan_torch.gflstm_backward_scan
    if _extension.is_available():
        loop = _backend.select(torch.empty(1, 1, 1), "extension")
        assert loop.gflstm_forward_scan is _extension.load().gflstm_forward_scan


TRITON_CHECKS = r"""
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence
import factorlm.nn as fnn
from factorlm.ops import _backend, gflstm_layer

torch.manual_seed(0)
d = dict(dtype=torch.float64, requires_grad=True)
x, h0, c0 = torch.randn(3, 2, 4, **d), torch.randn(2, 4, **d), torch.randn(2, 8, **d)
w1, w2 = torch.randn(2, 3, 4, **d), torch.randn(2, 16, 3, **d)
bias, w_hr = torch.randn(32, **d), torch.randn(4, 8, **d)
used, select = [], _backend.select
_backend.select = lambda x, impl="auto": used.append(select(x, impl).name) or select(x, impl)
assert gradcheck(lambda *a: gflstm_layer(*a, forget_bias=1.0, impl="auto"), (x, h0, c0, w1, w2, bias, w_hr),
                 fast_mode=True)
assert set(used) == {"triton"}, used  # FACTORLM_TRITON=1: "auto" picks the kernels
# coupled gates: 3n/k gate rows per group [i, g, o]
assert gradcheck(lambda *a: gflstm_layer(*a, forget_bias=1.0, impl="triton", num_gates=3),
                 (x, h0, c0, w1, w2[:, :12], bias[:24], w_hr), fast_mode=True)
for coupled in (False, True):
    layer = fnn.GFLSTM(8, 16, proj_size=4, groups=2, rank=3, num_layers=2, bidirectional=True, forget_bias=0.5,
                       coupled_gates=coupled).double()
    xs = torch.randn(5, 3, 8, **d)
    results = []
    for impl in ("triton", "reference"):
        layer.impl = impl
        layer.zero_grad()
        xs.grad = None
        out, (h, c) = layer(pack_padded_sequence(xs, [2, 5, 1], enforce_sorted=False))
        (out.data.square().sum() + h.sum() + c.sum()).backward()
        results.append([out.data, h, c, xs.grad] + [q.grad for q in layer.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), (a - b).abs().max()
print("GFLSTM TRITON OK")
"""


def test_the_triton_loop_in_the_interpreter():
    """impl="triton" (the G-LSTM kernels on the same tiles) against the reference, and a fast-mode
    gradcheck through the kernels, on a CPU in Triton's interpreter (as test_ops_triton.py)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", FACTORLM_TRITON="1", FACTORLM_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECKS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "GFLSTM TRITON OK" in result.stdout, result.stdout + result.stderr
