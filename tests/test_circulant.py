"""CirculantLSTM (C-LSTM): its block-circulant matrices against an independent construction, the FFT
method against the dense one and the reference (float64, values, states and every gradient),
gradcheck of both, parameter and multiply-add counts, errors. The whole nn.LSTM contract (the
grid against torch.nn.LSTM, compile) runs in test_nn_layers.py / test_nn_compile.py over CELLS."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import factorlm.nn as fnn
from factorlm.cli import main
from factorlm.nn import circulant as nn_circulant
from factorlm.ops import circulant
from helpers import circulant_from_blocks

TOL = dict(rtol=1e-10, atol=1e-12)


def test_a_block_is_the_circulant_matrix_of_its_first_column():
    weight = torch.tensor([[[1.0, 2.0, 3.0]]])  # one 3 × 3 block
    expected = torch.tensor([[1.0, 3.0, 2.0], [2.0, 1.0, 3.0], [3.0, 2.0, 1.0]])
    assert torch.equal(circulant.dense_matrix(weight), expected)
    assert torch.equal(circulant.dense_matrix(weight, transposed=True), expected)


@pytest.mark.parametrize("rows,cols,b", [(4, 3, 2), (2, 5, 3), (3, 2, 8), (6, 1, 1)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dense_matrix_matches_a_construction_by_torch_roll(rows, cols, b, transposed):
    weight = torch.randn(rows, cols, b, dtype=torch.float64, requires_grad=True)
    dense = circulant.dense_matrix(weight, transposed=transposed)
    assert dense.shape == (rows * b, cols * b)
    assert torch.equal(dense, circulant_from_blocks(weight))
    if transposed:  # column-major: the transposed view of a contiguous (S·b, R·b) tensor
        assert dense.t().is_contiguous()
    # every entry of the dense matrix is one parameter, each appearing b times in its block
    grad, = torch.autograd.grad(dense.sum(), weight)
    assert torch.equal(grad, torch.full_like(weight, b))


@pytest.mark.parametrize("rows,cols,b", [(4, 3, 2), (2, 5, 3), (3, 2, 8), (2, 2, 5), (6, 1, 1)])
def test_the_fft_product_equals_the_dense_product(rows, cols, b):
    weight = torch.randn(rows, cols, b, dtype=torch.float64)
    x = torch.randn(7, cols * b, dtype=torch.float64)
    expected = x @ circulant_from_blocks(weight).t()
    torch.testing.assert_close(circulant.apply_fft(x, circulant.spectrum(weight), b), expected, **TOL)


def test_the_layers_dense_weights_are_the_block_circulant_matrices():
    layer = fnn.CirculantLSTM(12, 8, num_layers=2, proj_size=4, block=(4, 2), bidirectional=True).double()
    for k in range(2):
        for direction in range(2):
            w = layer.layer_parameters(k, direction)
            w_ih, w_hh, bias = layer.dense_gate_weights(k, direction)
            assert torch.equal(w_ih, circulant_from_blocks(w["weight_ih"]))
            assert torch.equal(w_hh, circulant_from_blocks(w["weight_hh"]))
            assert bias is w["bias"]
    assert layer.weight_ih_l0.shape == (8, 3, 4) and layer.weight_hh_l0.shape == (8, 1, 4)
    assert layer.weight_ih_l1.shape == (16, 4, 2) and layer.weight_hh_l1_reverse.shape == (16, 2, 2)


def _outputs_and_grads(layer, x, hx, lengths):
    inputs = x if lengths is None else pack_padded_sequence(x, lengths, layer.batch_first, enforce_sorted=False)
    out, (h, c) = layer(inputs, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    loss = (data * torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)).sum() + (h**2).sum() + c.sum()
    return [data, h, c, *torch.autograd.grad(loss, [x, *hx, *layer.parameters()])]


@pytest.mark.parametrize(
    "kwargs,lengths",
    [
        (dict(input_size=8, hidden_size=12, proj_size=4, block=4), None),
        (dict(input_size=6, hidden_size=9, block=3, bias=False), None),  # odd b: rfft's last bin is not Nyquist
        (dict(input_size=16, hidden_size=16, proj_size=8, block=8, num_layers=2), [3, 5, 1, 4]),
        (dict(input_size=8, hidden_size=8, proj_size=4, block=(4, 2), num_layers=2, bidirectional=True,
              batch_first=True), [2, 5, 1, 4]),
        (dict(input_size=4, hidden_size=8, block=1), None),  # b = 1: every block a scalar, the dense LSTM
    ],
)
@pytest.mark.parametrize("coupled", [False, True])
def test_fft_method_equals_dense_method_and_reference(kwargs, lengths, coupled):
    layer = fnn.CirculantLSTM(**kwargs, forget_bias=0.6, coupled_gates=coupled).double()
    batch = 4
    shape = (batch, 5, layer.input_size) if layer.batch_first else (5, batch, layer.input_size)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    states = layer.num_layers * layer.num_directions
    hx = (torch.randn(states, batch, layer.output_size, dtype=torch.float64, requires_grad=True),
          torch.randn(states, batch, layer.hidden_size, dtype=torch.float64, requires_grad=True))
    results = {}
    for method, impl in (("dense", "torch"), ("dense", "auto"), ("fft", "auto"), ("fft", "reference")):
        layer.method, layer.impl = method, impl
        results[method, impl] = _outputs_and_grads(layer, x, hx, lengths)
    expected = results.pop(("fft", "reference"))  # the per-step oracle on the materialised W
    for key, got in results.items():
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("method", ["dense", "fft"])
def test_gradcheck_of_both_methods(method, coupled):
    """The dense method's backward is the hand-written G-LSTM scan's (one group) then the gather's;
    the FFT method's is autograd through torch.fft and the [Re, Im] products."""
    layer = fnn.CirculantLSTM(4, 4, proj_size=2, block=2, forget_bias=0.5, coupled_gates=coupled).double()
    layer.method = method
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, h0, c0, *params):
        out, (h, c) = functional_call(layer, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    params = [p.detach().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


@pytest.mark.parametrize("gates", [4, 3])  # 3: coupled input and forget gates, read off the shapes
def test_gradcheck_of_the_fft_layer_on_a_packed_batch_with_odd_block(gates):
    b, n, p_in = 3, 6, 3
    new = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(6, p_in, **new),  # packed rows of sequences of 3, 2 and 1 steps: batch_sizes (3, 2, 1)
            torch.randn(3, n, **new), torch.randn(3, n, **new),  # h0, c0 (no projection: p = n)
            torch.randn(gates * n // b, p_in // b, b, **new), torch.randn(gates * n // b, n // b, b, **new),
            torch.randn(gates * n, **new))

    def f(x, h0, c0, w_ih, w_hh, bias):
        return circulant.circulant_fft_layer(x, h0, c0, w_ih, w_hh, bias, None, 0.3, (3, 2, 1))

    assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------ counts
@pytest.mark.parametrize("p_in,n,p,L,b", [(8, 16, 0, 1, 4), (16, 32, 8, 2, 8), (6, 12, 3, 3, 3)])
def test_parameter_counts_exact(p_in, n, p, L, b):
    out = p or n
    proj = p * n if p else 0
    expected = sum(4 * n * ((p_in if k == 0 else out) + out) // b + 4 * n + proj for k in range(L))
    assert fnn.count_parameters(fnn.CirculantLSTM(p_in, n, num_layers=L, proj_size=p, block=b)) == expected
    dense = fnn.count_parameters(fnn.LSTM(p_in, n, num_layers=L, proj_size=p))
    gates = expected - L * (4 * n + proj)
    assert gates * b == dense - L * (4 * n + proj)  # 1/b of the dense gate parameters
    no_bias = fnn.count_parameters(fnn.CirculantLSTM(p_in, n, num_layers=L, proj_size=p, block=b, bias=False))
    assert no_bias == expected - 4 * n * L
    coupled = fnn.count_parameters(fnn.CirculantLSTM(p_in, n, num_layers=L, proj_size=p, block=b, coupled_gates=True))
    assert coupled == sum(3 * n * ((p_in if k == 0 else out) + out) // b + 3 * n + proj for k in range(L))


def test_macs_count_what_each_method_runs():
    layer = fnn.CirculantLSTM(64, 32, proj_size=16, block=16, num_layers=2)
    layer.method = "dense"
    dense = 4 * 32 * (64 + 16) + 16 * 32 + 4 * 32 * (16 + 16) + 16 * 32
    assert layer.macs_per_token() == dense == fnn.LSTM(64, 32, proj_size=16, num_layers=2).macs_per_token()
    layer.method = "fft"
    # layer 0: R = 128/16 = 8 row blocks, S = (64 + 16)/16 = 5 column blocks, F = 9 frequencies;
    # a length-16 real FFT counts 2·16·4 = 128; (S + R) FFTs and 4·F·R·S real multiply-adds
    assert circulant.fft_macs(16) == 128 and circulant.fft_macs(1) == 0 and circulant.fft_macs(3) == 12
    layer0 = (5 + 8) * 128 + 4 * 9 * 8 * 5
    layer1 = (2 + 8) * 128 + 4 * 9 * 8 * 2
    assert layer.macs_per_token() == layer0 + layer1 + 2 * 16 * 32
    # coupled gates: R = 96/16 = 6 row blocks of 3 gates; dense 3/4 of the gate map
    coupled = fnn.CirculantLSTM(64, 32, proj_size=16, block=16, num_layers=2, coupled_gates=True)
    coupled.method = "dense"
    assert coupled.macs_per_token() == 3 * 32 * (64 + 16) + 3 * 32 * (16 + 16) + 2 * 16 * 32
    coupled.method = "fft"
    layer0 = (5 + 6) * 128 + 4 * 9 * 6 * 5
    layer1 = (2 + 6) * 128 + 4 * 9 * 6 * 2
    assert coupled.macs_per_token() == layer0 + layer1 + 2 * 16 * 32


def test_auto_method_follows_the_rule():
    layer = fnn.CirculantLSTM(64, 32, proj_size=16, block=(16, 8), num_layers=2)
    assert layer.method == "auto"
    assert [layer.layer_method(k) for k in range(2)] == ["dense", "dense"]  # small layers: dense
    layer.method = "fft"
    assert layer.layer_method(0) == layer.layer_method(1) == "fft"
    with torch.device("meta"):  # 4n·(p_in + p) = 2^21 entries
        big = fnn.CirculantLSTM(256, 1024, proj_size=256, block=(32, 16), num_layers=2)
    assert [big.layer_method(k) for k in range(2)] == ["fft", "dense"]
    assert big.layer_method(0, torch.zeros(1, device="meta")) == "dense"  # not a CPU input
    assert big.layer_method(0, torch.zeros(1, dtype=torch.bfloat16)) == "dense"  # torch.fft has no CPU bf16
    assert big.layer_method(0, torch.zeros(1, dtype=torch.float64)) == "fft"
    assert nn_circulant.auto_method(32, 1 << 20, "cpu") == "fft"
    assert nn_circulant.auto_method(32, (1 << 20) - 1, None) == nn_circulant.auto_method(16, 1 << 30, None) == "dense"
    assert nn_circulant.auto_method(256, 1 << 30, "cuda") == "dense"
    dense = fnn.CirculantLSTM(256, 1024, proj_size=256, block=32).macs_per_token() == 4 * 1024 * 512 + 256 * 1024
    assert not dense  # the count follows the method auto picks: FFT here


def test_count_cli_counts_the_circulant_cell(capsys):
    assert main(["count", "--cell", "circulant", "--block", "8", "--vocab", "1000"]) == 0
    n, p = 8192, 1024  # biglstm: 2 layers, embedding 1024
    expected = 2 * (4 * n * (p + p) // 8 + 4 * n + p * n)
    assert f"{expected:,}" in capsys.readouterr().out


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_size=10, hidden_size=12, block=4),
         r"layer 0: block=4 does not divide the input size 10; .* multiples of block: here 1 or 2$"),
        (dict(input_size=8, hidden_size=10, block=4), r"block=4 does not divide the hidden_size 10.*: here 1 or 2$"),
        (dict(input_size=8, hidden_size=12, proj_size=6, block=4), r"output size 6.*: here 1 or 2$"),
        (dict(input_size=16, hidden_size=32, num_layers=2, proj_size=8, block=(8, 16)),
         r"layer 1: block=16 does not divide the input size 8, output size 8; .*: here 1, 2, 4 or 8$"),
        (dict(input_size=8, hidden_size=12, block=(2, 2)), r"block has 2 entries \[2, 2\] but num_layers=1"),
        (dict(input_size=8, hidden_size=12, block=0), r"block must be an integer >= 1, got 0"),
    ],
)
def test_sizes_that_block_does_not_divide_are_refused(kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        fnn.CirculantLSTM(kwargs.pop("input_size"), kwargs.pop("hidden_size"), **kwargs)


def test_block_is_required():
    with pytest.raises(TypeError, match="block"):
        fnn.CirculantLSTM(4, 8)


def test_method_errors_and_repr():
    layer = fnn.CirculantLSTM(8, 8, block=4)
    assert repr(layer) == "CirculantLSTM(8, 8, block=4)"
    with pytest.raises(ValueError, match=r"CirculantLSTM.method must be one of \('auto', 'dense', 'fft'\), got 'FFT'"):
        layer.method = "FFT"
    assert layer.method == "auto"
    layer.method = "fft"
    assert repr(layer) == "CirculantLSTM(8, 8, block=4, method='fft')"
    layer.impl = "extension"
    with pytest.raises(RuntimeError, match=r"method='fft' runs its own PyTorch loop .* got impl='extension'; "
                                           r"set method='dense'"):
        layer(torch.randn(3, 2, 8))
    assert repr(fnn.CirculantLSTM(8, 8, num_layers=2, block=(4, 2))) == "CirculantLSTM(8, 8, num_layers=2, block=[4, 2])"


def test_initialisation_matches_the_dense_lstms_range():
    layer = fnn.CirculantLSTM(64, 64, block=8)
    bound = 1 / math.sqrt(64)
    for w in layer.parameters():
        assert w.abs().max() <= bound and w.std() > bound / 3
