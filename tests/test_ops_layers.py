"""factorlm.ops: the hand-written backward of the fast F-LSTM / G-LSTM paths.

Every hand-written backward is checked with torch.autograd.gradcheck in float64, for both
time loops (impl="extension", the C++ loop, and impl="torch", its pure-PyTorch twin), on padded
and on packed batches (shrinking batch, states at each sequence's last step); the fast
layers are compared with the per-step reference (impl="reference", plain autograd) in float32 at
moderate sizes and, for every impl, in float64; the fallback when the extension cannot be built
is exercised, and so are the errors for impl values that cannot run. The gradchecks, the
loops' agreement and the inference scans run also with coupled input and forget gates
(num_gates=3: 3n gate rows [i, g, o]).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_sequence

import factorlm.nn as fnn
from factorlm.ops import _backend, _extension, flstm_layer, gflstm_layer, glstm_layer
from factorlm.ops.flstm import FLSTMFunction
from factorlm.ops.glstm import GLSTMFunction

BACKENDS = ("torch", "extension")
#: num_gates, the gate blocks: an LSTM's [i, f, g, o], and coupled input and forget gates' [i, g, o]
GATES = (4, 3)


def _impl(backend: str) -> str:
    """``backend`` as an impl value, skipping the test when it is the extension and that cannot be built."""
    if backend == "extension" and not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    return backend


def _layer_args(cell: str, p_in: int, n: int, p: int, size: int, bias: bool, proj: bool, batch_sizes=None,
                gates: int = 4):
    """Random float64 leaves for one layer: x, h0, c0, the two gate weights, bias, weight_hr. With
    ``batch_sizes``, x is a packed batch's rows (N, p_in); ``gates``: the gate blocks, num_gates."""
    new = dict(dtype=torch.float64, requires_grad=True)
    steps, batch = 3, 2
    out = p if proj else n
    x_shape = (steps, batch, p_in) if batch_sizes is None else (sum(batch_sizes), p_in)
    if batch_sizes is not None:
        batch = batch_sizes[0]
    if cell == "flstm":
        w_a, w_b = torch.randn(size, p_in + out, **new), torch.randn(gates * n, size, **new)
    else:
        w_a = torch.randn(size, gates * n // size, p_in // size, **new)
        w_b = torch.randn(size, gates * n // size, out // size, **new)
    return [
        torch.randn(*x_shape, **new),
        torch.randn(batch, out, **new),
        torch.randn(batch, n, **new),
        w_a,
        w_b,
        torch.randn(gates * n, **new) if bias else None,
        torch.randn(p, n, **new) * 0.5 if proj else None,
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("gates", GATES)
def test_flstm_gradcheck(backend, proj, bias, rank, gates):
    impl = _impl(backend)
    args = _layer_args("flstm", p_in=3, n=4, p=2, size=rank, bias=bias, proj=proj, gates=gates)
    assert gradcheck(lambda *a: flstm_layer(*a, forget_bias=0.5, impl=impl, num_gates=gates), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("gates", GATES)
def test_glstm_gradcheck(backend, proj, bias, groups, gates):
    impl = _impl(backend)
    args = _layer_args("glstm", p_in=4, n=8, p=4, size=groups, bias=bias, proj=proj, gates=gates)
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=0.5, impl=impl, num_gates=gates), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_gradcheck_where_the_weight_gradients_are_summed_narrow_side_first(backend, cell):
    # 4n/k = 48 gate rows per group against <= 32 columns: the weight and input gradients take the
    # transposed products of factorlm.ops._function (the sizes above take the direct ones).
    from factorlm.ops import _function

    impl = _impl(backend)
    args = _layer_args(cell, p_in=4, n=24, p=4, size=2, bias=True, proj=True)
    assert args[4].shape[-2] > _function.NARROW_WEIGHT_GRAD >= args[4].shape[-1]
    fn = flstm_layer if cell == "flstm" else glstm_layer
    assert gradcheck(lambda *a: fn(*a, forget_bias=0.5, impl=impl), args)


# The C++ loop's fused G-LSTM step (scan.cpp, fused_glstm_step) runs where groups are narrow, n/k is
# a whole number of vectors (16 floats or 8 doubles with AVX-512, 8 or 4 with AVX2) and the scan is
# long and wide enough for row-major step weights (>= 4 steps of > 4 rows): the sizes above are too
# small for it. n/k = 16 fills vectors of either ISA in float64; 6 rows are a tile of 4 (AVX-512)
# or two of 3 (AVX2) plus what is left; the packed batch ends with steps smaller than a tile.
FUSED_PACKED = (6, 6, 5, 3, 2)


@pytest.mark.parametrize("batch_sizes", [None, FUSED_PACKED])
def test_fused_glstm_step_gradcheck(batch_sizes):
    """(Without a projection the same step runs: test_fused_glstm_step_equals_the_pytorch_loop_in_float32.)"""
    impl = _impl("extension")
    new = dict(dtype=torch.float64, requires_grad=True)
    k, p_in, n, p = 2, 8, 32, 8
    x = torch.randn(5, 6, p_in, **new) if batch_sizes is None else torch.randn(sum(batch_sizes), p_in, **new)
    args = [x, torch.randn(6, p, **new), torch.randn(6, n, **new), torch.randn(k, 4 * n // k, p_in // k, **new),
            torch.randn(k, 4 * n // k, p // k, **new), torch.randn(4 * n, **new),
            torch.randn(p, n, **new) * 0.3]
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=0.5, impl=impl, batch_sizes=batch_sizes), args)


@pytest.mark.parametrize("k,proj", [(4, True), (8, True), (8, False)])
def test_fused_glstm_step_equals_the_pytorch_loop_in_float32(k, proj):
    """Training and inference scans, at a G-LSTM shape like the benchmarks' (narrow groups, n/k a
    multiple of 16): the fused step against the PyTorch loop, to float32 rounding."""
    impl = _impl("extension")
    torch.manual_seed(3)
    n, batch, p_in = 512, 9, 64
    p = 64 if proj else n
    x, h0, c0 = torch.randn(6, batch, p_in), torch.randn(batch, p), torch.randn(batch, n)
    weights = [torch.randn(k, 4 * n // k, p_in // k) * 0.3, torch.randn(k, 4 * n // k, p // k) * 0.1,
               torch.randn(4 * n), torch.randn(p, n) * 0.1 if proj else None]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = glstm_layer(x, h0, c0, *weights, forget_bias=0.4, impl=impl)
            expected = glstm_layer(x, h0, c0, *weights, forget_bias=0.4, impl="torch")
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# Where the fused step does not apply (here n/k = 6 fills no vector, or the cell is coupled) a long,
# wide scan runs the joined product (scan.cpp: [x^(j); h_{t-1}^(j)]·[W_ih^(j)^T; W_hh^(j)^T] a step)
# and hands its rows to the backward as the weight gradients' operand.
@pytest.mark.parametrize("batch_sizes", [None, FUSED_PACKED])
@pytest.mark.parametrize("bias,proj,gates", [(True, True, 4), (False, False, 4), (True, True, 3)])
def test_joined_glstm_step_gradcheck(batch_sizes, bias, proj, gates):
    impl = _impl("extension")
    new = dict(dtype=torch.float64, requires_grad=True)
    k, p_in, n = 2, 4, 12
    p = 4 if proj else n
    x = torch.randn(5, 6, p_in, **new) if batch_sizes is None else torch.randn(sum(batch_sizes), p_in, **new)
    args = [x, torch.randn(6, p, **new), torch.randn(6, n, **new), torch.randn(k, gates * n // k, p_in // k, **new),
            torch.randn(k, gates * n // k, p // k, **new), torch.randn(gates * n, **new) if bias else None,
            torch.randn(p, n, **new) * 0.3 if proj else None]
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=0.5, impl=impl, batch_sizes=batch_sizes,
                                            num_gates=gates), args)


@pytest.mark.parametrize("batch_sizes", [None, FUSED_PACKED])
def test_joined_step_keeps_the_rows_the_weight_gradients_would_gather(batch_sizes):
    """The operand the C++ forward returns is exactly [x^(j); h_{t-1}^(j); 1] per row, as
    grouped_gate_weight_grads gathers it from x, h0 and the output; inference keeps none."""
    from factorlm.ops import _function

    _impl("extension")
    loop = _backend.select(torch.randn(1, 1, 4), "extension")
    k, p_in, n, p = 2, 4, 12, 6
    rows = 30 if batch_sizes is None else sum(batch_sizes)
    sizes = (6,) * 5 if batch_sizes is None else batch_sizes
    x, h0, c0 = torch.randn(rows, p_in), torch.randn(6, p), torch.randn(6, n)
    w_ih, w_hh, w_hr = torch.randn(k, 4 * n // k, p_in // k), torch.randn(k, 4 * n // k, p // k), torch.randn(p, n)
    out, gates, _, _, operand = loop.glstm_forward_scan(x, w_ih, None, 0.0, w_hh, w_hr, h0, c0, list(sizes), True)
    d = torch.randn_like(gates)
    expected = _function.grouped_gate_weight_grads(d, x, h0, out, tuple(sizes), True)
    got = _function.grouped_gate_weight_grads(d, x, h0, out, tuple(sizes), True, operand)
    assert operand.shape == (k, rows, p_in // k + p // k + 1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    rebuilt = torch.cat([x.view(rows, k, -1).transpose(0, 1), torch.zeros(k, rows, p // k), torch.ones(k, rows, 1)], 2)
    previous = _function.previous_rows(h0, out, tuple(sizes))
    rebuilt[:, :6, p_in // k : -1] = h0.view(6, k, -1).transpose(0, 1)
    rebuilt[:, 6:, p_in // k : -1] = previous.view(rows - 6, k, -1).transpose(0, 1)
    assert torch.equal(operand, rebuilt)
    inference = loop.glstm_forward_scan(x, w_ih, None, 0.0, w_hh, w_hr, h0, c0, list(sizes), False)
    assert inference[4] is None


@pytest.mark.parametrize("cell", ["flstm", "glstm", "gflstm"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_gradients_summed_every_few_steps_equal_the_pytorch_loop(cell, packed, bias, monkeypatch):
    """The C++ backward sums the gate weights' and the bias's gradients from a ring of a few steps'
    dgates (scan.cpp, kWeightGradRows = 512 rows a product), given the rows that multiply them (G-LSTM:
    the joined step's [x; h; 1], F-LSTM and G∘F-LSTM: z): 40 rows a step make blocks of 13 steps, so
    30 steps are three blocks, the last one short; a packed batch shrinks inside them. Every gradient
    against the PyTorch loop's products over all rows, in float64."""
    from factorlm.ops import _function

    impl = _impl("extension")
    monkeypatch.setattr(_function, "WEIGHT_GRAD_RING_MIN_BYTES", 0)  # these gates are small
    torch.manual_seed(5)
    new = dict(dtype=torch.float64)
    p_in, n, p, batch, steps = 4, 12, 4, 40, 30
    sizes = [batch] * 12 + [31] * 10 + [9] * 8 if packed else None
    x = torch.randn(sum(sizes), p_in, **new) if packed else torch.randn(steps, batch, p_in, **new)
    if cell == "flstm":
        rank, layer = 3, flstm_layer
        gate_weights = [torch.randn(rank, p_in + p, **new), torch.randn(4 * n, rank, **new)]
    elif cell == "gflstm":
        k, rank, layer = 2, 3, gflstm_layer
        gate_weights = [torch.randn(k, rank, (p_in + p) // k, **new), torch.randn(k, 4 * n // k, rank, **new)]
    else:
        k, layer = 2, glstm_layer
        gate_weights = [torch.randn(k, 4 * n // k, p_in // k, **new), torch.randn(k, 4 * n // k, p // k, **new)]
    leaves = [x, torch.randn(batch, p, **new), torch.randn(batch, n, **new), *gate_weights,
              torch.randn(4 * n, **new) if bias else None, torch.randn(p, n, **new) * 0.3]
    grads = {}
    for loop in (impl, "torch"):
        args = [a.clone().requires_grad_() if a is not None else None for a in leaves]
        out, h_n, c_n = layer(*args, forget_bias=0.5, impl=loop, batch_sizes=sizes)
        (out.sin().sum() + h_n.sum() + c_n.cos().sum()).backward()
        grads[loop] = [a.grad for a in args if a is not None]
    for got, expected in zip(grads[impl], grads["torch"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_the_ring_is_asked_for_only_where_the_gates_leave_the_caches():
    from factorlm.ops import _function

    rows = torch.randn(3, 2)
    large = torch.empty(_function.WEIGHT_GRAD_RING_MIN_BYTES // 4, dtype=torch.float32)
    assert _function.ring_rows(rows, large, True) is rows
    assert _function.ring_rows(rows, large, False) is None  # no weight gradient wanted
    assert _function.ring_rows(None, large, True) is None  # the forward kept no rows
    assert _function.ring_rows(rows, large[:-1], True) is None


#: a packed batch: 3 sequences of lengths 4, 2 and 1 (the batch shrinks twice, once by two rows)
PACKED = (3, 2, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("gates", GATES)
def test_packed_gradcheck(backend, cell, proj, gates):
    impl = _impl(backend)
    fn = flstm_layer if cell == "flstm" else glstm_layer
    sizes = dict(p_in=3, n=4, p=2) if cell == "flstm" else dict(p_in=4, n=8, p=4)  # as the padded gradchecks
    args = _layer_args(cell, **sizes, size=2, bias=True, proj=proj, batch_sizes=PACKED, gates=gates)
    assert gradcheck(lambda *a: fn(*a, forget_bias=0.5, impl=impl, batch_sizes=PACKED, num_gates=gates), args)


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("chunk", [1, 100, 1 << 18])
def test_torch_loop_prepares_its_backward_in_runs_of_steps(monkeypatch, cell, chunk):
    """The PyTorch loop prepares the step-independent part of the pointwise backward for runs of
    steps of at most PREPARE_CHUNK gate elements: each step alone (1), runs of uneven length over
    the shrinking packed batch (100: steps {3, 2}, {1}, {0} for G-LSTM, {3, 2, 1}, {0} for
    F-LSTM), and the whole sequence at once all give the exact gradients."""
    from factorlm.ops import _scan_torch

    monkeypatch.setattr(_scan_torch, "PREPARE_CHUNK", chunk)
    calls = []
    prepare = _scan_torch.TORCH_CELL_MATH.prepare
    monkeypatch.setattr(_backend, "TORCH_LOOP", _backend._pytorch_loop(
        "torch", _scan_torch.TORCH_CELL_MATH._replace(prepare=lambda *a: calls.append(a[0].shape[1]) or prepare(*a))))
    fn = flstm_layer if cell == "flstm" else glstm_layer
    sizes = dict(p_in=3, n=4, p=2) if cell == "flstm" else dict(p_in=4, n=8, p=4)
    args = _layer_args(cell, **sizes, size=2, bias=True, proj=True, batch_sizes=PACKED)
    assert gradcheck(lambda *a: fn(*a, forget_bias=0.5, impl="torch", batch_sizes=PACKED), args)
    runs = {1: [1, 1, 2, 3], 100: [2, 2, 3] if cell == "glstm" else [4, 3], 1 << 18: [7]}[chunk]
    assert calls[: len(runs)] == runs  # rows prepared per run, from the last step back


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_packed_batch_runs_each_sequence_for_its_own_length(backend, cell):
    """Packed rows and each sequence alone (a (length, 1, p_in) batch) give the same outputs,
    final states and gradients: no padded step ever enters a state."""
    impl = _impl(backend)
    fn = flstm_layer if cell == "flstm" else glstm_layer
    x, h0, c0, *weights = _layer_args(cell, p_in=4, n=8, p=4, size=2, bias=True, proj=True, batch_sizes=PACKED)
    out, h, c = fn(x, h0, c0, *weights, forget_bias=0.5, impl=impl, batch_sizes=torch.tensor(PACKED))
    assert out.shape == (7, 4) and h.shape == (3, 4) and c.shape == (3, 8)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + (h**2).sum() + c.sum()
    grads = torch.autograd.grad(loss, [x, h0, c0, *weights])
    rows = {0: [0, 3, 5, 6], 1: [1, 4], 2: [2]}  # sequence -> its rows in PACKED's layout
    alone_loss = 0
    for b, r in rows.items():
        o, h_b, c_b = fn(x[r][:, None], h0[b : b + 1], c0[b : b + 1], *weights, forget_bias=0.5, impl=impl)
        torch.testing.assert_close(o[:, 0], out[r], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_b, h[b : b + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_b, c[b : b + 1], rtol=1e-12, atol=1e-12)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)[r]
        alone_loss = alone_loss + (o[:, 0] * w).sum() + (h_b**2).sum() + c_b.sum()
    for a, b in zip(torch.autograd.grad(alone_loss, [x, h0, c0, *weights]), grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mis_sized_weights_and_states_are_refused_by_name():
    """The scans index raw buffers from these sizes: a wrong one must never reach them."""
    x, h0, c0, w1, w2, bias, w_hr = _layer_args("flstm", p_in=3, n=4, p=2, size=2, bias=True, proj=True)
    for args, match in [
        ((x, h0, c0, w1[:, :-1], w2, bias, w_hr), r"weight_w1 must have shape \(2, 5\) .* got \(2, 4\)"),
        ((x, h0, c0, w1, w2[:-4], bias, w_hr), r"weight_w2 must have shape \(16, 2\) .* got \(12, 2\)"),
        ((x, h0, c0, w1, w2, bias[:-1], w_hr), r"bias must have shape \(16,\)"),
        ((x, h0, c0, w1, w2, bias, w_hr.t()), r"weight_hr must have shape \(2, 4\) .* got \(4, 2\)"),
        ((x, h0, c0[:1], w1, w2, bias, w_hr), r"h0 \(2, 2\) and c0 \(1, 4\) must have the same batch size"),
        ((x, h0, c0, w1, w2, bias, None), r"without weight_hr, h0 \(2, 2\) and c0 \(2, 4\) must both be \(B, n\)"),
        ((x, h0[0], c0, w1, w2, bias, w_hr), r"h0 must be 2-D"),
        ((x, h0, c0, w1.float(), w2, bias, w_hr), r"weight_w1 is torch.float32 on cpu, x is torch.float64"),
    ]:
        with pytest.raises(ValueError, match="flstm_layer: " + match):
            flstm_layer(*args)
    x, h0, c0, w_ih, w_hh, bias, w_hr = _layer_args("glstm", p_in=4, n=8, p=4, size=2, bias=True, proj=True)
    with pytest.raises(ValueError, match=r"glstm_layer: weight_hh must have shape \(2, 16, 2\) .* got \(2, 16, 1\)"):
        glstm_layer(x, h0, c0, w_ih, w_hh[..., :1], bias, w_hr)
    with pytest.raises(ValueError, match=r"glstm_layer: 3 groups must divide p_in = 4, p = 4 and n = 8"):
        glstm_layer(x, h0, c0, torch.randn(3, 8, 1, dtype=torch.float64), w_hh, bias, w_hr)
    # num_gates: 4 or 3, and the gate rows must be num_gates·n
    with pytest.raises(ValueError, match=r"glstm_layer: num_gates must be 4 \(gates \[i, f, g, o\]\) or 3 \(coupled "
                                         r"input and forget gates, \[i, g, o\]\), got 2"):
        glstm_layer(x, h0, c0, w_ih, w_hh, bias, w_hr, num_gates=2)
    with pytest.raises(ValueError, match=r"glstm_layer: weight_ih must have shape \(2, 12, 2\) .* got \(2, 16, 2\)"):
        glstm_layer(x, h0, c0, w_ih, w_hh, bias, w_hr, num_gates=3)
    x, h0, c0, w1, w2, bias, w_hr = _layer_args("flstm", p_in=3, n=4, p=2, size=2, bias=True, proj=True, gates=3)
    with pytest.raises(ValueError, match=r"flstm_layer: weight_w2 must have shape \(16, 2\) .* got \(12, 2\)"):
        flstm_layer(x, h0, c0, w1, w2, bias, w_hr)
    with pytest.raises(ValueError, match=r"flstm_layer: num_gates must be 4 .* got True"):
        flstm_layer(x, h0, c0, w1, w2, bias, w_hr, num_gates=True)


def test_packed_arguments_are_checked():
    x, h0, c0, *weights = _layer_args("flstm", p_in=3, n=4, p=2, size=2, bias=True, proj=True, batch_sizes=PACKED)
    for sizes, match in [
        ((3, 2, 2, 0), r"positive and non-increasing"),
        ((1, 2, 3, 1), r"positive and non-increasing"),
        ((3, 2, 1), r"describe 3 sequences in 6 rows, but h0 has 3 rows and the packed input 7"),
        ((2, 2, 2, 1), r"describe 2 sequences in 7 rows, but h0 has 3 rows"),
    ]:
        with pytest.raises(ValueError, match=match):
            flstm_layer(x, h0, c0, *weights, batch_sizes=sizes)
    with pytest.raises(ValueError, match=r"with batch_sizes, x must be packed rows \(N, p_in\), got shape \(7, 1, 3\)"):
        flstm_layer(x[:, None], h0, c0, *weights, batch_sizes=PACKED)
    with pytest.raises(ValueError, match=r"x must be \(T, B, p_in\), or packed rows \(N, p_in\) with batch_sizes"):
        flstm_layer(x, h0, c0, *weights)


@pytest.mark.parametrize("cell,sizes", [("flstm", [3, 5]), ("glstm", [4, 2])])
def test_gradcheck_through_a_stack_with_per_layer_sizes(cell, sizes):
    kw = dict(rank=sizes) if cell == "flstm" else dict(groups=sizes)
    cls = fnn.FLSTM if cell == "flstm" else fnn.GLSTM
    layer = cls(8, 8, num_layers=2, proj_size=4, forget_bias=1.0, **kw).double()
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, *weights):
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, weights)), (x,))
        return out, h, c

    assert gradcheck(f, [x, *[p.detach().clone().requires_grad_() for p in layer.parameters()]])


def _float32_pair(cell: str, proj_size: int, bias: bool):
    torch.manual_seed(0)
    kw = dict(rank=[24, 12]) if cell == "flstm" else dict(groups=[4, 8])
    cls = fnn.FLSTM if cell == "flstm" else fnn.GLSTM
    return cls(32, 64, num_layers=2, proj_size=proj_size, bias=bias, forget_bias=1.0, **kw)


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("proj_size", [0, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_matches_reference_float32_values_and_every_gradient(cell, proj_size, bias):
    layer = _float32_pair(cell, proj_size, bias)
    x = torch.randn(12, 16, 32, requires_grad=True)
    h0 = torch.randn(2, 16, layer.output_size, requires_grad=True)
    c0 = torch.randn(2, 16, 64, requires_grad=True)
    weight = torch.randn(12, 16, layer.output_size)
    results = {}
    for impl in ("auto", "reference"):
        layer.impl = impl
        out, (h, c) = layer(x, (h0, c0))
        loss = (out * weight).sum() + (h**2).sum() + (c * 0.5).sum()
        results[impl] = [out, h, c, *torch.autograd.grad(loss, [x, h0, c0, *layer.parameters()])]
    names = ["output", "h_n", "c_n", "dx", "dh0", "dc0"] + [n for n, _ in layer.named_parameters()]
    assert len(names) == len(results["auto"])
    for name, fast, ref in zip(names, results["auto"], results["reference"]):
        # float32: the fast path sums in a different order (all-T·B GEMMs instead of per-step
        # autograd) and the C++ path uses a polynomial exp (relative error ~2e-7); over 12 steps
        # and 2 layers that stays within ~1e-5 of each tensor's scale, far below any real bug
        # (a wrong gate or a missing term changes results at the 1e-1 level).
        scale = ref.abs().max().item()
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5 * max(1.0, scale), msg=name)


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("batch_sizes", [None, PACKED])
@pytest.mark.parametrize("gates", GATES)
def test_extension_and_twin_agree_in_float64(cell, batch_sizes, gates):
    _impl("extension")
    fn = flstm_layer if cell == "flstm" else glstm_layer
    args = _layer_args(cell, p_in=8, n=8, p=4, size=2, bias=True, proj=True, batch_sizes=batch_sizes, gates=gates)
    results = []
    for impl in ("extension", "torch"):
        outs = fn(*args, forget_bias=0.3, impl=impl, batch_sizes=batch_sizes, num_gates=gates)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
        results.append([*outs, *torch.autograd.grad(loss, args)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def assert_same_function(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Inference against the training forward: the same function, rounded differently (the C++
    loop runs products of at most 4 rows with its own kernels, csrc/scan.cpp, not MKL)."""
    tol = 1e-12 if got.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("batch_sizes", [None, PACKED, (3, 3, 3)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
@pytest.mark.parametrize("gates", GATES)
def test_inference_forward_keeps_nothing_and_equals_the_training_forward(backend, cell, proj, batch_sizes, mode, gates,
                                                                          monkeypatch):
    """Without a backward to follow, the layer runs the inference scan (one step's gates, (B, n) cell
    states) and gives the training forward's out, h_T and c_T, also for a packed batch, whose
    final states come from different steps; h0 and c0 are read, never written."""
    impl = _impl(backend)
    fn = flstm_layer if cell == "flstm" else glstm_layer
    function = (FLSTMFunction if cell == "flstm" else GLSTMFunction)
    args = _layer_args(cell, p_in=8, n=8, p=4, size=2, bias=True, proj=proj, batch_sizes=batch_sizes, gates=gates)
    training = [t.detach() for t in fn(*args, forget_bias=0.3, impl=impl, batch_sizes=batch_sizes, num_gates=gates)]
    initial = [t.detach().clone() for t in args[1:3]]  # h0, c0: read at step 0, never written

    calls = []
    monkeypatch.setattr(function, "apply", lambda *a: pytest.fail("the autograd Function ran without a backward to follow"))
    monkeypatch.setattr(function, "infer", staticmethod(lambda *a, real=function.infer: calls.append(1) or real(*a)))
    if mode == "nothing_requires_grad":
        inference = fn(*[None if t is None else t.detach() for t in args], forget_bias=0.3, impl=impl,
                       batch_sizes=batch_sizes, num_gates=gates)
    else:
        with getattr(torch, mode)():
            inference = fn(*args, forget_bias=0.3, impl=impl, batch_sizes=batch_sizes, num_gates=gates)
    assert calls == [1]
    for a, b in zip(training, inference):
        assert not b.requires_grad
        assert_same_function(b, a)
    h_n, c_n = inference[1:]
    with torch.inference_mode(mode == "inference_mode"):
        inference[0].fill_(0)  # the states are their own tensors, not views of the output
    assert_same_function(h_n, training[1])
    assert_same_function(c_n, training[2])
    for before, after in zip(initial, args[1:3]):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_inference_reads_the_weights_in_place_and_sees_every_change_even_through_data(backend, cell, monkeypatch):
    """The scans get the layer's own weights (the parameters themselves, nothing re-ordered or
    kept between calls), so a change between two inference calls is seen, even one made through
    ``.data``, which bypasses the version counter."""
    impl = _impl(backend)
    torch.manual_seed(0)
    layer = (fnn.FLSTM(6, 8, rank=3, proj_size=4) if cell == "flstm" else fnn.GLSTM(6, 8, groups=2, proj_size=4))
    layer.impl = impl
    x = torch.randn(3, 2, 6)
    storages = {t.untyped_storage().data_ptr() for t in layer.parameters()}
    received = []
    real_select = _backend.select

    def select(*args, **kwargs):  # records what the forward scan is handed
        loop = real_select(*args, **kwargs)
        name = "flstm_forward_scan" if cell == "flstm" else "glstm_forward_scan"
        scan = getattr(loop, name)

        def recording(*scan_args):
            received.extend(a for a in scan_args[1:] if isinstance(a, torch.Tensor))
            return scan(*scan_args)
        return loop._replace(**{name: recording})

    monkeypatch.setattr(_backend, "select", select)

    def fresh_outputs():  # the training forward
        return layer(x)[0].detach()

    with torch.no_grad():
        first = layer(x)[0]
    weights = [t for t in received if t.untyped_storage().data_ptr() in storages]
    # the two gate weights (F-LSTM: W1, W2; G-LSTM: W_ih, W_hh), the bias, W_hr
    assert sorted(map(id, weights)) == sorted(map(id, layer.parameters()))  # the parameters themselves
    with torch.inference_mode():
        torch.testing.assert_close(layer(x)[0], first, rtol=0, atol=0)

    for name in [n for n, _ in layer.named_parameters()]:
        tensor = getattr(layer, name)
        tensor.data.mul_(1.5)  # invisible to the version counter
        with torch.inference_mode():
            changed = layer(x)[0]
        assert not torch.equal(changed, first), name
        assert_same_function(changed, fresh_outputs())
        first = changed

    layer.load_state_dict({name: torch.randn_like(t) for name, t in layer.state_dict().items()})
    with torch.no_grad():
        assert_same_function(layer(x)[0], fresh_outputs())


def test_small_products_read_row_major_and_transposed_weights():
    """The C++ loop's few-row products (csrc/scan.cpp, small_columns_product and small_rows_product)
    on both layouts they accept: the transposed views of the layer's row-major weights (what the
    layers pass), and row-major (K, N) weights (a weight that is itself a transposed view); with
    K and N both multiples of the float32 kernel's 8-wide blocks plus a remainder, so that every
    part of it runs; against float64 products of the same weights by the PyTorch loop."""
    _impl("extension")
    torch.manual_seed(0)
    # F-LSTM: W1x^T (12, 11), W1h^T (10, 11) (accumulated), W2^T (11, 36), W_hr^T (9, 10)
    # G-LSTM k=2: W_ih^T (2, 10, 24), W_hh^T (2, 9, 24), W_hr^T (12, 18)
    cases = {"flstm": (flstm_layer, 12, 9, 10, lambda new: (torch.randn(11, 22, **new), torch.randn(36, 11, **new))),
             "glstm": (glstm_layer, 20, 12, 18,
                       lambda new: (torch.randn(2, 24, 10, **new), torch.randn(2, 24, 9, **new)))}
    for cell, (fn, p_in, n, p, gate_weights) in cases.items():
        for dtype in (torch.float32, torch.float64):
            new = dict(dtype=dtype)
            # float32 against float64 through 4 steps of unscaled random weights: a few float32 ulps
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
            w_a, w_b = gate_weights(new)
            bias, w_hr = torch.randn(4 * n, **new), torch.randn(p, n, **new)
            layouts = {"transposed views": (w_a, w_b, w_hr),  # the layers' own row-major (N, K) weights
                       "row-major": tuple(w.mT.contiguous().mT for w in (w_a, w_b, w_hr))}
            for batch in (1, 3, 4, 5):  # 5: more rows than the small kernels take (MKL)
                x, h0, c0 = torch.randn(4, batch, p_in, **new), torch.randn(batch, p, **new), torch.randn(batch, n, **new)
                with torch.no_grad():
                    expected = fn(*(t.double() for t in (x, h0, c0, w_a, w_b, bias, w_hr)), forget_bias=0.5,
                                  impl="torch")
                    for label, (a, b, hr) in layouts.items():
                        got = fn(x, h0, c0, a, b, bias, hr, forget_bias=0.5, impl="extension")
                        for g, e in zip(got, expected):
                            torch.testing.assert_close(g.double(), e, **tol,
                                                       msg=lambda m: f"{cell} {dtype} {label}, B={batch}: {m}")


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_products_of_few_rows_and_of_many_equal_the_reference(cell, dtype):
    """The C++ loop multiplies steps of at most 4 rows with its own kernel and larger ones with MKL:
    every batch size from 1 to 7 gives the reference's outputs and states, and so does a packed
    batch whose steps cross from one kernel to the other."""
    _impl("extension")
    torch.manual_seed(0)
    p_in, n, p = 12, 16, 8
    layer = fnn.FLSTM(p_in, n, rank=5, proj_size=p) if cell == "flstm" else fnn.GLSTM(p_in, n, groups=4, proj_size=p)
    layer = layer.to(dtype)
    reference = copy.deepcopy(layer)
    reference.impl = "reference"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for batch in range(1, 8):
        x = torch.randn(5, batch, p_in, dtype=dtype)
        state = (torch.randn(1, batch, p, dtype=dtype), torch.randn(1, batch, n, dtype=dtype))
        with torch.inference_mode():
            got = layer(x, state)
        with torch.no_grad():
            expected = reference(x, state)
        torch.testing.assert_close(got, expected, **tol)
    packed = pack_sequence([torch.randn(length, p_in, dtype=dtype) for length in (7, 6, 5, 4, 2, 1, 1)])
    with torch.inference_mode():
        got = layer(packed)
    with torch.no_grad():
        expected = reference(packed)
    torch.testing.assert_close(got[0].data, expected[0].data, **tol)
    torch.testing.assert_close(got[1], expected[1], **tol)


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_inference_mode_no_grad_frozen_and_training_calls_agree_in_any_order(cell):
    # An inference_mode call first, then no_grad, frozen weights and training on the same layer: each
    # reads the weights as they are, and none is disturbed by what an earlier call made.
    torch.manual_seed(0)
    layer = fnn.FLSTM(6, 8, rank=3) if cell == "flstm" else fnn.GLSTM(6, 8, groups=2)
    x = torch.randn(3, 2, 6)
    with torch.inference_mode():
        first = layer(x)[0].clone()
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], first, rtol=0, atol=0)
    layer.requires_grad_(False)
    torch.testing.assert_close(layer(x)[0], first, rtol=0, atol=0)
    layer.requires_grad_(True)
    out = layer(x)[0]
    out.sum().backward()
    assert_same_function(out.detach(), first)
    assert all(p.grad is not None for p in layer.parameters())


def test_parameter_gradients_without_input_gradient():
    layer = fnn.GLSTM(8, 8, groups=2, proj_size=4).double()
    x = torch.randn(4, 3, 8, dtype=torch.float64)  # e.g. a frozen embedding: no dL/dx wanted
    grads = {}
    for impl in ("auto", "reference"):
        layer.impl = impl
        grads[impl] = torch.autograd.grad(layer(x)[0].sum(), list(layer.parameters()))
    for a, b in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fallback_when_disabled(monkeypatch, fresh_extension_state):
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    x = torch.randn(3, 2, 4)
    assert not _extension.is_available()
    assert _extension.DISABLE_ENV in _extension.build_error()
    assert _backend.select(x, "auto").name == "torch"
    with pytest.raises(RuntimeError, match="extension is not available: disabled by FACTORLM_NO_EXTENSION=1"):
        _backend.select(x, "extension")
    layer = fnn.FLSTM(4, 8, rank=3, proj_size=2).double()
    xd = x.double()
    fast = layer(xd)[0]
    layer.impl = "reference"
    torch.testing.assert_close(fast, layer(xd)[0], rtol=1e-10, atol=1e-12)


def test_fallback_when_the_build_fails(monkeypatch, fresh_extension_state):
    def no_compiler():
        raise OSError("gcc: command not found")

    monkeypatch.delenv(_extension.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_extension, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built .*gcc: command not found"):
        assert _extension.load() is None
    assert _extension.build_error() == "OSError: gcc: command not found"
    layer = fnn.GLSTM(4, 8, groups=2).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    fast = layer(x)[0]  # runs the PyTorch twin, no second warning or build attempt
    layer.impl = "reference"
    torch.testing.assert_close(fast, layer(x)[0], rtol=1e-10, atol=1e-12)


def test_a_failed_threaded_build_falls_back_to_a_single_threaded_one(monkeypatch, fresh_extension_state):
    built = []

    def build_with(threads):
        built.append(list(threads))
        if threads:
            raise RuntimeError("ld: cannot find -lgomp")
        return "single-threaded module"

    monkeypatch.delenv(_extension.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_extension.sys, "platform", "linux")
    monkeypatch.setattr(_extension, "_build_with", build_with)
    with pytest.warns(RuntimeWarning, match="threaded C\\+\\+ recurrence could not be built .*cannot find -lgomp"):
        assert _extension.load() == "single-threaded module"
    assert built == [list(_extension._THREAD_FLAGS), []]
    assert _extension.build_error() is None


def test_reloading_the_extension_loads_the_same_module(fresh_extension_state):
    """torch's load_inline appends its libraries to the flag lists it is given: when those were the
    module's own, every reload hashed to a new name and compiled the whole extension again."""
    if not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")
    flags, first = tuple(_extension._THREAD_FLAGS), _extension.module_path()
    _extension.reset()
    assert _extension.is_available() and _extension.module_path() == first
    assert tuple(_extension._THREAD_FLAGS) == flags


def test_other_dtypes_use_the_twin_and_reject_forcing_the_extension():
    x = torch.randn(3, 2, 4, dtype=torch.bfloat16)
    assert _backend.select(x, "auto").name == "torch"
    assert _backend.select(x, "torch").name == "torch"
    with pytest.raises(RuntimeError, match="CPU float32/float64 tensors only, got torch.bfloat16"):
        _backend.select(x, "extension")


def test_bfloat16_layer_runs_and_tracks_float32():
    layer = fnn.GLSTM(16, 32, groups=4, proj_size=8)
    x = torch.randn(5, 4, 16)
    ref = layer(x)[0]
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)  # bf16 has 8 mantissa bits


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves PyTorch's lock file; it would make every later load wait forever."""
    import os
    import time

    from factorlm.ops import _extension

    lock = tmp_path / "lock"
    lock.write_text("")
    _extension._remove_stale_lock(lock)
    assert lock.exists()  # a build may be running right now
    old = time.time() - _extension.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="removing the stale build lock"):
        _extension._remove_stale_lock(lock)
    assert not lock.exists()
    _extension._remove_stale_lock(lock)  # no lock at all: nothing to do


def test_large_buffers_get_the_huge_page_hint_small_ones_do_not(monkeypatch):
    from factorlm.ops import _memory

    like = torch.empty(0)
    small = _memory.empty(1024, 1024, like=like)  # 4 MB: glibc reuses it, no hint
    assert small.shape == (1024, 1024) and small.dtype == torch.float32
    assert not _memory.advise_hugepages(small)
    big = _memory.empty(9, 1 << 20, like=like)  # 36 MB
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform.startswith("linux") and thp.exists() and "[never]" not in thp.read_text():
        assert _memory.advise_hugepages(big)
    big.fill_(1.0)  # the memory is ordinary, writable memory either way
    assert big.sum().item() == 9 * (1 << 20)
    monkeypatch.setenv(_memory.ENV, "0")
    assert not _memory.advise_hugepages(_memory.empty(9, 1 << 20, like=like))


def test_ops_name_a_bad_impl_and_the_allowed_ones():
    args = _layer_args("flstm", p_in=3, n=4, p=2, size=2, bias=True, proj=True)
    allowed = r"impl must be one of \('torch', 'extension', 'triton', 'auto'\)"
    with pytest.raises(ValueError, match=rf"{allowed}, got 'reference'; 'reference' \(the per-step oracle\) is "
                                         rf"chosen on a layer: layer.impl = 'reference' or factorlm.nn.set_impl"):
        flstm_layer(*args, impl="reference")
    gargs = _layer_args("glstm", p_in=4, n=8, p=4, size=2, bias=True, proj=True)
    with pytest.raises(ValueError, match=rf"{allowed}, got True$"):  # the old use_extension=True
        glstm_layer(*gargs, impl=True)
    with pytest.warns(DeprecationWarning, match="impl='fast' is deprecated, use 'auto'"):
        fast = glstm_layer(*gargs, impl="fast")
    for a, b in zip(fast, glstm_layer(*gargs, impl="auto")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_picks_the_extension_then_triton_then_torch_as_the_environment_allows(monkeypatch, fresh_extension_state):
    from factorlm.ops import _triton_cells

    for name in (_extension.DISABLE_ENV, _backend.TRITON_ENV):
        monkeypatch.delenv(name, raising=False)
    x = torch.randn(3, 2, 4)
    default = "extension" if _extension.is_available() else "torch"
    assert [_backend.select(x.to(dtype), "auto").name for dtype in (torch.float32, torch.float64)] == [default] * 2
    assert _backend.select(x.bfloat16(), "auto").name == "torch"  # CPU: neither C++ nor Triton
    _extension.reset()
    monkeypatch.setenv(_extension.DISABLE_ENV, "1")
    assert _backend.select(x, "auto").name == "torch"
    if _triton_cells.available():
        monkeypatch.setenv(_backend.INTERPRET_ENV, "1")  # only read here: no kernel is launched
        monkeypatch.setenv(_backend.TRITON_ENV, "1")
        assert _backend.select(x, "auto").name == "triton"
        monkeypatch.setenv(_backend.TRITON_ENV, "0")
        assert _backend.select(x, "auto").name == "torch"


def test_forcing_triton_where_it_cannot_run_says_why(monkeypatch):
    from factorlm.ops import _triton_cells

    x = torch.randn(3, 2, 4)
    if _triton_cells.available():
        monkeypatch.delenv(_backend.INTERPRET_ENV, raising=False)
        with pytest.raises(RuntimeError, match=r"impl='triton': the Triton cell kernels run CUDA tensors \(or CPU "
                                               r"tensors under TRITON_INTERPRET=1, Triton's interpreter\), got "
                                               r"torch.float32 on cpu"):
            _backend.select(x, "triton")
    monkeypatch.setattr(_triton_cells, "triton", None)
    args = _layer_args("flstm", p_in=3, n=4, p=2, size=2, bias=True, proj=False)
    with pytest.raises(RuntimeError, match=r"impl='triton': Triton is not installed \(pip install -e \"\.\[gpu\]\""):
        flstm_layer(*args, impl="triton")
