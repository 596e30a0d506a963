"""The diagonal LSTM (IndyLSTM, factorlm.nn.DiagonalLSTM / factorlm.ops.diagonal_layer): what the generic
layer grid (test_nn_layers.py) does not cover: its own recurrence with a projection (tanh(c), h_0 not
read, chunked runs equal one pass), the hand-written backward of both scans (gradcheck), the C++ and
PyTorch scans against each other, exact counts, conversion, initialisation and clipping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import factorlm.nn as fnn
from factorlm.nn.diagonal import reference_layer
from factorlm.ops import _extension, diagonal_layer, diagonal_step
from helpers import make_layer

TOL = dict(rtol=1e-10, atol=1e-12)


def _extension_or_skip():
    if not _extension.is_available():
        pytest.skip(f"C++ extension unavailable: {_extension.build_error()}")


IMPLS = ["torch", "extension"]


def _layer_args(p_in=3, n=5, p=5, batch=3, steps=4, proj=False, bias=True, rows=None, dtype=torch.float64, seed=0,
                gates=4):
    """Random leaves for diagonal_layer; ``gates`` 3 for coupled input and forget gates."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, p_in, generator=g, dtype=dtype) if rows else torch.randn(steps, batch, p_in, generator=g,
                                                                                   dtype=dtype)
    out = p if proj else n
    args = [x, torch.randn(batch, out, generator=g, dtype=dtype), torch.randn(batch, n, generator=g, dtype=dtype),
            torch.randn(gates * n, p_in, generator=g, dtype=dtype), torch.randn(gates, n, generator=g, dtype=dtype),
            torch.randn(gates * n, generator=g, dtype=dtype) if bias else None,
            torch.randn(p, n, generator=g, dtype=dtype) if proj else None]
    return [a.requires_grad_() if a is not None else None for a in args]


@pytest.mark.parametrize("gates", [4, 3])  # 3: coupled input and forget gates
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_padded(impl, proj, bias, gates):
    if impl == "extension":
        _extension_or_skip()
    args = _layer_args(p=2 if proj else 5, proj=proj, bias=bias, gates=gates)
    assert gradcheck(lambda *a: diagonal_layer(*a, forget_bias=0.4, impl=impl, num_gates=gates), args)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("proj", [False, True])
def test_gradcheck_packed(impl, proj, gates):
    """Sequences ending at different steps (one of length 1): each one's final state, and dL/dh_T,
    dL/dc_T entering at its own last row."""
    if impl == "extension":
        _extension_or_skip()
    sizes = [4, 3, 3, 1]
    args = _layer_args(p=2 if proj else 5, proj=proj, batch=4, rows=sum(sizes), gates=gates)
    assert gradcheck(lambda *a: diagonal_layer(*a, forget_bias=-0.3, impl=impl, batch_sizes=sizes, num_gates=gates),
                     args)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("sizes", [None, [6, 6, 5, 3, 3, 1]])
def test_extension_and_pytorch_scans_agree_with_the_reference(proj, sizes, gates):
    """float64, n wider than one C++ task's run of cells (512), so several tasks share a sequence."""
    _extension_or_skip()
    n, p = 600, 7
    args = _layer_args(p_in=5, n=n, p=p if proj else n, batch=6, steps=6, proj=proj,
                       rows=None if sizes is None else sum(sizes), gates=gates)
    expected = reference_layer(*args, forget_bias=0.5, batch_sizes=sizes, num_gates=gates)
    expected_grads = torch.autograd.grad(sum(t.square().sum() for t in expected), [a for a in args if a is not None],
                                         materialize_grads=True)
    for impl in IMPLS:
        got = diagonal_layer(*args, forget_bias=0.5, impl=impl, batch_sizes=sizes, num_gates=gates)
        grads = torch.autograd.grad(sum(t.square().sum() for t in got), [a for a in args if a is not None])
        for a, b in zip((*got, *grads), (*expected, *expected_grads)):
            torch.testing.assert_close(a, b, **TOL)


def test_float32_extension_is_close_to_the_float64_reference():
    """The C++ float32 scan uses its polynomial exp (about 1-2 ulp): close, not equal."""
    _extension_or_skip()
    args = _layer_args(p_in=16, n=64, p=16, batch=4, steps=10, proj=True)
    expected = reference_layer(*args, forget_bias=1.0)
    got = diagonal_layer(*[a.detach().float() if a is not None else None for a in args], forget_bias=1.0,
                         impl="extension")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- the recurrence
@pytest.mark.parametrize("impl", ["reference", "torch", "extension", "auto"])
@pytest.mark.parametrize("proj_size", [0, 4])
def test_running_in_chunks_equals_one_pass(impl, proj_size):
    """The state a call returns determines the next call exactly: (h, c) with a projection too,
    where the recurrence reads tanh(c_{t-1}) and not the projected h."""
    if impl == "extension":
        _extension_or_skip()
    torch.manual_seed(0)
    layer = make_layer("diagonal", num_layers=2, proj_size=proj_size, forget_bias=0.3)
    layer.impl = impl
    x = torch.randn(9, 3, 8, dtype=torch.float64)
    h0 = torch.randn(2, 3, layer.output_size, dtype=torch.float64)
    c0 = torch.randn(2, 3, 12, dtype=torch.float64)
    whole, (h, c) = layer(x, (h0, c0))
    first, state = layer(x[:5], (h0, c0))
    second, (h2, c2) = layer(x[5:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, **TOL)
    torch.testing.assert_close(h2, h, **TOL)
    torch.testing.assert_close(c2, c, **TOL)


@pytest.mark.parametrize("impl", ["reference", "torch", "extension"])
def test_with_a_projection_h0_is_not_read_and_the_first_step_reads_tanh_c0(impl):
    if impl == "extension":
        _extension_or_skip()
    torch.manual_seed(1)
    layer = make_layer("diagonal", proj_size=4)
    layer.impl = impl
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    c0 = torch.randn(1, 2, 12, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, (h0, c0))
    other, _ = layer(x, (torch.randn(1, 2, 4, dtype=torch.float64), c0))
    torch.testing.assert_close(out, other, rtol=0, atol=0)
    grad, = torch.autograd.grad(out.sum(), h0, materialize_grads=True)
    assert torch.all(grad == 0)
    # step 0 by hand: pre = W_ih·x_0 + b + u ⊙ tanh(c0)
    w_ih, u, b, w_hr = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_l0, layer.weight_hr_l0
    pre = (x[0] @ w_ih.t() + b).view(2, 4, 12) + u * torch.tanh(c0[0]).unsqueeze(1)
    i, f, g, o = pre.unbind(1)
    c1 = torch.sigmoid(f) * c0[0] + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(out[0], (torch.sigmoid(o) * torch.tanh(c1)) @ w_hr.t(), **TOL)


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("proj_size", [0, 4])
@pytest.mark.parametrize("unbatched", [False, True])
def test_one_step_without_autograd_runs_the_step_function_and_equals_the_reference(proj_size, unbatched, coupled,
                                                                                     monkeypatch):
    torch.manual_seed(2)
    layer = make_layer("diagonal", num_layers=2, proj_size=proj_size, forget_bias=0.7, coupled_gates=coupled)
    x = torch.randn(1, 1 if unbatched else 3, 8, dtype=torch.float64)
    hx = (torch.randn(2, x.shape[1], layer.output_size, dtype=torch.float64),
          torch.randn(2, x.shape[1], 12, dtype=torch.float64))
    layer.impl = "reference"
    expected, (eh, ec) = layer(x, hx)
    if unbatched:
        x, hx, expected, eh, ec = x[:, 0], (hx[0][:, 0], hx[1][:, 0]), expected[:, 0], eh[:, 0], ec[:, 0]
    calls = []
    monkeypatch.setattr(fnn.DiagonalLSTM, "_step_function",
                        staticmethod(lambda *a: calls.append(1) or diagonal_step(*a)))
    layer.impl = "torch"
    with torch.no_grad():
        out, (h, c) = layer(x, hx)
    assert len(calls) == 2
    for a, b in zip((out, h, c), (expected, eh, ec)):
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------- structure
@pytest.mark.parametrize("p_in,n,p,L", [(8, 12, 0, 1), (8, 12, 4, 3), (16, 32, 8, 2)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parameter_and_mac_counts_exact(p_in, n, p, L, bidirectional):
    D = 2 if bidirectional else 1
    out = p or n

    def width(k):
        return p_in if k == 0 else out * D

    per_direction = sum(4 * n * width(k) + 4 * n + 4 * n + p * n for k in range(L))
    layer = fnn.DiagonalLSTM(p_in, n, num_layers=L, proj_size=p, bidirectional=bidirectional)
    assert fnn.count_parameters(layer) == D * per_direction
    no_bias = fnn.DiagonalLSTM(p_in, n, num_layers=L, proj_size=p, bidirectional=bidirectional, bias=False)
    assert fnn.count_parameters(no_bias) == D * (per_direction - 4 * n * L)
    assert layer.macs_per_token() == D * sum(4 * n * width(k) + 4 * n + p * n for k in range(L))
    assert layer.weight_hh_l0.shape == (4, n)
    coupled = fnn.DiagonalLSTM(p_in, n, num_layers=L, proj_size=p, bidirectional=bidirectional, coupled_gates=True)
    assert fnn.count_parameters(coupled) == D * sum(3 * n * width(k) + 3 * n + 3 * n + p * n for k in range(L))
    assert coupled.macs_per_token() == D * sum(3 * n * width(k) + 3 * n + p * n for k in range(L))
    assert coupled.weight_hh_l0.shape == (3, n)


def test_to_lstm_has_per_gate_diagonal_recurrent_weights():
    layer = make_layer("diagonal", num_layers=2, forget_bias=0.5)
    lstm = layer.to_lstm()
    for k in range(2):
        w_hh = lstm.state_dict()[f"weight_hh_l{k}"].view(4, 12, 12)
        u = getattr(layer, f"weight_hh_l{k}")
        for gate in range(4):
            torch.testing.assert_close(w_hh[gate], torch.diag(u[gate]), rtol=0, atol=0)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], lstm(x)[0], **TOL)


def test_with_a_projection_conversion_is_refused_saying_why():
    layer = make_layer("diagonal", proj_size=4)
    for convert in (layer.to_lstm, lambda: layer.dense_gate_weights(0)):
        with pytest.raises(ValueError, match=r"DiagonalLSTM with proj_size > 0 has no torch.nn.LSTM equivalent: its "
                                             r"recurrence reads the n-wide tanh\(c_\{t-1\}\)"):
            convert()


def test_recurrent_weights_are_initialised_uniform_in_minus_one_one_and_clipped_only_when_asked():
    torch.manual_seed(3)
    layer = fnn.DiagonalLSTM(16, 256, num_layers=2, bidirectional=True)
    for name, u in layer.named_parameters():
        if name.startswith("weight_hh"):
            assert u.abs().max() <= 1 and u.abs().max() > 0.9  # U(-1, 1), not the 1/√n of the others
            assert u.min() < 0 < u.max()
        else:
            assert u.abs().max() <= 1 / math.sqrt(256)
    clipped = fnn.DiagonalLSTM(16, 256, num_layers=2, bidirectional=True, recurrent_clip=0.5)
    assert "recurrent_clip=0.5" in repr(clipped)
    for name, u in clipped.named_parameters():
        if name.startswith("weight_hh"):
            assert u.abs().max() == 0.5
    with torch.no_grad():  # as an optimiser step might leave it
        clipped.weight_hh_l1_reverse.fill_(3.0)
        clipped.bias_l0.fill_(3.0)
    assert clipped.clip_recurrent_weights_() is clipped
    assert torch.all(clipped.weight_hh_l1_reverse == 0.5) and torch.all(clipped.bias_l0 == 3.0)
    with torch.no_grad():
        layer.weight_hh_l0.fill_(3.0)
    layer.clip_recurrent_weights_()  # no recurrent_clip: nothing is clipped
    assert torch.all(layer.weight_hh_l0 == 3.0)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "1"])
def test_recurrent_clip_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=rf"recurrent_clip must be a positive finite number .* got {bad!r}"):
        fnn.DiagonalLSTM(4, 8, recurrent_clip=bad)


def test_registered_as_diagonal_with_no_cell_argument():
    assert fnn.CELLS["diagonal"] is fnn.DiagonalLSTM
    assert fnn.DiagonalLSTM.cell_args == ()


def test_mis_sized_weights_are_refused_by_name():
    x, h0, c0, w_ih, u, bias, w_hr = _layer_args(proj=True, p=2)
    with pytest.raises(ValueError, match=r"diagonal_layer: weight_hh must have shape \(4, 5\) .* got \(20,\)"):
        diagonal_layer(x, h0, c0, w_ih, u.reshape(-1), bias, w_hr)
    with pytest.raises(ValueError, match=r"diagonal_layer: weight_ih must have shape \(20, 3\)"):
        diagonal_layer(x, h0, c0, w_ih[:, :2], u, bias, w_hr)
    with pytest.raises(ValueError, match=r"diagonal_layer: weight_ih must have shape \(15, 3\) .* got \(20, 3\)"):
        diagonal_layer(x, h0, c0, w_ih, u, bias, w_hr, num_gates=3)  # 4 gates' weights for 3
    with pytest.raises(ValueError, match=r"diagonal_layer: num_gates must be 4 .* or 3 .*, got 2"):
        diagonal_layer(x, h0, c0, w_ih, u, bias, w_hr, num_gates=2)


# ------------------------------------------------------------------ Triton
TRITON_CHECKS = r"""
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence
import factorlm.nn as fnn
from factorlm.nn.diagonal import reference_layer
from factorlm.ops import diagonal_layer

torch.manual_seed(0)
d = dict(dtype=torch.float64)
# gradcheck through both kernels, padded and packed, with and without a projection, 4 gates and 3
# (coupled input and forget gates)
for proj in (False, True):
    for sizes in (None, (3, 2, 2, 1)):
      for G in (4, 3):
        p, n, p_in, B = (2 if proj else 5), 5, 3, 3
        rows = 4 * B if sizes is None else sum(sizes)
        x = torch.randn(4, B, p_in, **d) if sizes is None else torch.randn(rows, p_in, **d)
        args = [x, torch.randn(B, p, **d), torch.randn(B, n, **d), torch.randn(G * n, p_in, **d),
                torch.randn(G, n, **d), torch.randn(G * n, **d), torch.randn(p, n, **d) if proj else None]
        args = [a.requires_grad_() if a is not None else None for a in args]
        assert gradcheck(lambda *a: diagonal_layer(*a, forget_bias=0.5, impl="triton", batch_sizes=sizes,
                                                   num_gates=G), args, fast_mode=True)
        for a, b in zip(diagonal_layer(*args, forget_bias=0.5, impl="triton", batch_sizes=sizes, num_gates=G),
                        reference_layer(*args, forget_bias=0.5, batch_sizes=sizes, num_gates=G)):
            assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), (a - b).abs().max()
# a bidirectional stack on an unsorted packed batch, every gradient, against the reference
for coupled in (False, True):
  layer = fnn.DiagonalLSTM(16, 32, proj_size=8, num_layers=2, bidirectional=True, forget_bias=0.3,
                           coupled_gates=coupled).double()
  xs = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
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
print("TRITON DIAGONAL OK")
"""


def test_triton_scans_pass_gradcheck_and_match_the_reference_in_the_interpreter():
    """The two Triton kernels (the whole scan in one launch each way) run here in Triton's
    interpreter, as tests/test_ops_triton.py runs the cell kernels."""
    pytest.importorskip("triton", reason="Triton is not installed")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", FACTORLM_TRITON="1", FACTORLM_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECKS], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "TRITON DIAGONAL OK" in result.stdout, result.stdout + result.stderr
