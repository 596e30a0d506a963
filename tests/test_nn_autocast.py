"""The layers under ``torch.autocast('cpu', dtype=torch.bfloat16)``: they run in bf16 as torch.nn.LSTM
does, agree with their float32 selves to bf16 rounding, give float32 parameters float32 gradients,
and cast their inputs and weights once per call, not once per time step.

The CUDA autocast path is the same code (factorlm.ops._function.runs_in_autocast_dtype reads x's
device type); tests/test_cuda.py checks it on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.profiler import ProfilerActivity, profile

from helpers import CELLS, make_layer

#: ‖bf16 − fp32‖ / ‖fp32‖ allowed: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per
#: value), and a few steps of products and state carry compound it; a wrong gate or a dropped term
#: is off by 30% or more
BF16_RELATIVE = 3e-2


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def impls(cell: str, coupled: bool = False) -> list[str]:
    """Every impl the cell allows that runs CPU tensors without Triton's interpreter."""
    layer = make_layer(cell, coupled_gates=coupled)
    return [impl for impl in layer._implementations if impl != "triton"]


def run(layer, x, hx=None, packed_lengths=None):
    """Forward and backward of a fixed loss; returns the outputs and every gradient."""
    layer.zero_grad()
    x = x.detach().requires_grad_()
    inp = x if packed_lengths is None else pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
    out, (h, c) = layer(inp, hx)
    out = out if packed_lengths is None else out.data
    loss = out.float().square().sum() + h.float().sum() + c.float().sum()
    loss.backward()
    return [out, h, c, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("packed,coupled", [(False, False), (True, False), (True, True)])
def test_layers_run_under_cpu_bf16_autocast_close_to_float32(cell, packed, coupled):
    layer = make_layer(cell, 16, 32, num_layers=2, proj_size=8, forget_bias=0.5, coupled_gates=coupled).float()
    x = torch.randn(6, 3, 16)
    lengths = [6, 3, 5] if packed else None
    h0, c0 = torch.randn(2, 3, 8) * 0.5, torch.randn(2, 3, 32) * 0.5
    for impl in impls(cell, coupled):
        layer.impl = impl
        expected = run(layer, x, (h0, c0), lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(layer, x, (h0, c0), lengths)  # backward inside the region too, as training loops do
        fast = impl not in ("reference", "extension")
        if fast:  # the whole-sequence paths run in the autocast dtype, as torch.nn.LSTM does
            assert got[0].dtype == torch.bfloat16, (cell, impl, got[0].dtype)
        else:  # the C++ loop has no bf16 kernel: float32, as autocast leaves such ops
            assert impl != "extension" or got[0].dtype == torch.float32
        assert got[3].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[4:]), (cell, impl)
        for name, a, b in zip(["output", "h_n", "c_n", "dx", *dict(layer.named_parameters())], got, expected):
            assert torch.isfinite(a).all(), (cell, impl, name)
            assert relative(a, b) < BF16_RELATIVE, (cell, impl, name, relative(a, b))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("coupled", [False, True])
def test_one_step_without_autograd_under_autocast(cell, coupled):
    """The single-step path (generation under torch.no_grad) on the PyTorch loop, under autocast."""
    layer = make_layer(cell, 16, 32, num_layers=2, proj_size=8, forget_bias=0.5, coupled_gates=coupled).float()
    layer.impl = "torch"
    x, hx = torch.randn(1, 2, 16), (torch.randn(2, 2, 8), torch.randn(2, 2, 32))
    with torch.no_grad():
        expected = layer(x, hx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x, hx)
    for a, b in zip((got[0], *got[1]), (expected[0], *expected[1])):
        assert a.shape == b.shape and relative(a, b) < BF16_RELATIVE, (cell, relative(a, b))


def casts(layer, steps: int) -> int:
    """How many dtype conversions (aten::_to_copy) one forward + backward of ``layer`` over ``steps``
    steps makes under bf16 autocast."""
    x = torch.randn(steps, 2, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(x)
            out.float().sum().backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_weights_are_cast_once_per_call_not_per_step(cell):
    layer = make_layer(cell, 16, 32, num_layers=2, proj_size=8).float()
    layer.impl = "torch"
    short, long = casts(layer, 2), casts(layer, 12)
    assert short == long, f"{cell}: {short} dtype conversions at T=2 but {long} at T=12: something is cast per step"
    assert short > 0  # it did run in bf16


@pytest.mark.parametrize("cell", ["flstm", "glstm"])
def test_float64_layers_are_left_in_float64_under_autocast(cell):
    """Autocast casts no float64 op; neither do the layers."""
    layer = make_layer(cell, 16, 32, proj_size=8)
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    expected = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)[0]
    assert got.dtype == torch.float64 and torch.equal(got, expected)
