"""Every registered cell on a CUDA device against its float64 reference on the CPU, forward and
backward: impl="triton" (the fused Triton cells) and impl="torch" (the PyTorch loop; torch.lstm,
i.e. cuDNN, for the dense LSTM), in float64, float32 and under bf16 autocast; a given initial
state, a state carried from one call to the next, and an unsorted packed batch (bidirectional).

All are marked ``cuda`` and skipped without a CUDA device (CI has none; the Triton kernels are
checked there in Triton's CPU interpreter, tests/test_ops_triton.py). Run them with
``pytest -m cuda`` on a GPU machine; benchmarks/gpu_check.py runs them first.

The reference: torch.nn.LSTM in float64 on the CPU with dense weights built from the layer's
parameters by helpers.dense_reference (independent of the layers' own conversion, and
differentiable, so the factors get their gradients through it); for the one wide shape, whose
n/k > 1024 cells per group make the Triton cells launch several blocks per row, the layer's own
per-step reference path (impl="reference") in float64 on the CPU, which the grid of
tests/test_nn_layers.py ties to torch.nn.LSTM.

Agreement is ‖got − expected‖ / ‖expected‖ per output and per gradient, at a tolerance per precision
(PRECISIONS): rounding alone stays well under it; a wrong gate, a lost state or a missing term is off
by 10% or more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from factorlm.ops import _triton_cells
from helpers import CELLS, dense_reference, make_layer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: the CUDA tests need a GPU (the Triton kernels are checked in "
                              "Triton's CPU interpreter by test_ops_triton.py)"),
]

#: name -> (the layer's dtype, the autocast dtype or None, relative tolerance):
#: float64 agrees to rounding (~1e-15); float32 (TF32 off in these tests) to ~1e-6 over a few
#: steps; bf16 autocast keeps 8 significant bits, 2^-9 ≈ 2e-3 per rounding, compounded over
#: the steps and the state carried in bf16, hence 3e-2
PRECISIONS = {
    "fp64": (torch.float64, None, 1e-10),
    "fp32": (torch.float32, None, 1e-4),
    "bf16-autocast": (torch.float32, torch.bfloat16, 3e-2),
}

#: the input cases: a padded batch with a given initial state, the same batch in two calls with the
#: state carried between them, and an unsorted packed batch through a bidirectional layer
MODES = ("given-state", "carried-state", "packed-bidirectional")
LENGTHS = [3, 6, 1, 5]  # the packed batch's sequence lengths (unsorted; T = 6)


def impls(cell: str, coupled: bool = False) -> list[str]:
    """The loops compared for ``cell``: the Triton cells and the PyTorch loop where the cell has
    them (the dense LSTM has one fast path, torch.lstm: cuDNN on a GPU; with coupled gates it runs
    the G-LSTM's loops, Triton's too)."""
    allowed = make_layer(cell, coupled_gates=coupled)._implementations
    return [impl for impl in ("triton", "torch") if impl in allowed]


CASES = [(cell, impl) for cell in CELLS for impl in impls(cell)]
#: coupled input and forget gates (3 gate blocks): every cell and loop, fewer precisions and modes
COUPLED_CASES = [(cell, impl) for cell in CELLS for impl in impls(cell, coupled=True)]
#: shared gates with a low-rank projection (materialised weights into the same loops): every cell and loop
SHARED_CASES = [(cell, impl) for cell in CELLS for impl in impls(cell)]


@pytest.fixture(autouse=True)
def _exact_float32():
    """Float32 products in float32, not TF32 (cuDNN's default for its RNNs): the fp32 tolerance is
    for float32 arithmetic."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float64 on the CPU (NaN fails every comparison)."""
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def loss_of(out: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
    """A loss every output element and both final states reach, in float64 whatever their dtype."""
    out = out.double()
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).view_as(out)
    return (out * w).sum() + (h_n.double() ** 2).sum() + (c_n.double() * 0.5).sum()


def forward(layer, x, hx, mode: str, call=None):
    """(output rows, h_n, c_n) of ``layer`` (or ``call(input, hx)``) on x (T, B, p_in) in ``mode``."""
    call = call or layer
    if mode == "packed-bidirectional":
        out, (h, c) = call(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), hx)
        assert isinstance(out, PackedSequence)
        return out.data, h, c
    if mode == "carried-state":
        first, state = call(x[:2], hx)
        second, (h, c) = call(x[2:], state)
        return torch.cat([first, second]), h, c
    out, (h, c) = call(x, hx)
    return out, h, c


def check(cell: str, impl: str, precision: str, mode: str, *, wide: bool = False, device: str = "cuda",
          coupled: bool = False, shared: bool = False) -> None:
    """The layer on ``device`` in ``precision`` against the float64 CPU reference: outputs, final
    states and the gradients of x, h_0, c_0 and every parameter; ``coupled``: a layer with
    coupled_gates; ``shared``: with shared_gates and proj_rank=3, against its own float64
    reference impl (tests/test_shared_gates.py checks that against independent references). (tests/test_gpu_check.py runs a few of these checks on the CPU, so that their
    own logic is tested without a GPU.)"""
    dtype, autocast, tol = PRECISIONS[precision]
    bidirectional = mode == "packed-bidirectional"
    if wide:  # n/k = 1280 cells per group: two blocks of 1024 per (group, row) in the Triton cells
        args = {"groups": 2} if cell == "glstm" else {}
        reference = make_layer(cell, 32, 2560, proj_size=16, forget_bias=1.0, coupled_gates=coupled, **args)
    else:
        options = dict(shared_gates=True, proj_rank=3) if shared else {}
        reference = make_layer(cell, 16, 32, num_layers=2, proj_size=8, per_layer=True, forget_bias=0.7,
                               bidirectional=bidirectional, coupled_gates=coupled, **options)
        if shared:
            with torch.no_grad():  # scales other than their initial ones, so that a mix-up of gates shows
                for name, weight in reference.named_parameters():
                    if name.startswith("gate_scale"):
                        weight.uniform_(0.5, 1.5)
    batch, steps = len(LENGTHS), max(LENGTHS)
    layers = reference.num_layers * reference.num_directions
    x = torch.randn(steps, batch, reference.input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, batch, reference.output_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers, batch, reference.hidden_size, dtype=torch.float64, requires_grad=True)
    leaves = [x, h0, c0, *reference.parameters()]

    if wide or shared:
        reference.impl = "reference"
        expected = forward(reference, x, (h0, c0), mode)
    else:
        lstm, weights = dense_reference(reference)
        expected = forward(reference, x, (h0, c0), mode, call=lambda i, s: functional_call(lstm, weights, (i, s)))
    expected_grads = torch.autograd.grad(loss_of(*expected), leaves, materialize_grads=True)

    layer = copy.deepcopy(reference).to(device=device, dtype=dtype)
    layer.impl = impl
    gx, gh, gc = (t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, h0, c0))
    device_leaves = [gx, gh, gc, *layer.parameters()]
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        got = forward(layer, gx, (gh, gc), mode)
        grads = torch.autograd.grad(loss_of(*got), device_leaves, materialize_grads=True)  # backward inside the region, as training does
    if autocast is not None:  # run in the autocast dtype, as torch.nn.LSTM does
        assert got[0].dtype == autocast, f"output is {got[0].dtype} under {autocast} autocast"
    names = ["output", "h_n", "c_n", "dL/dx", "dL/dh_0", "dL/dc_0", *(f"dL/d{n}" for n, _ in layer.named_parameters())]
    for name, a, b, leaf in zip(names, [*got, *grads], [*expected, *expected_grads], [None] * 3 + device_leaves):
        if leaf is not None:  # a gradient has its leaf's dtype and device
            assert a.dtype == leaf.dtype and a.device == leaf.device, (name, a.dtype, a.device)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        error = relative(a, b)
        assert error <= tol, (f"{cell} impl={impl} {precision} {mode}{' coupled' if coupled else ''}"
                              f"{' shared' if shared else ''}: {name} off by "
                              f"{error:.2e} (tolerance {tol:.0e})")


@pytest.mark.parametrize("cell,impl", CASES, ids=[f"{c}-{i}" for c, i in CASES])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("mode", MODES)
def test_layer_on_cuda_matches_the_float64_reference(cell, impl, precision, mode):
    if impl == "triton" and not _triton_cells.available():
        pytest.skip("Triton is not installed: impl='triton' cannot run")
    check(cell, impl, precision, mode)


@pytest.mark.parametrize("cell,impl", COUPLED_CASES, ids=[f"{c}-{i}" for c, i in COUPLED_CASES])
@pytest.mark.parametrize("precision", ["fp64", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["given-state", "packed-bidirectional"])
def test_coupled_layer_on_cuda_matches_the_float64_reference(cell, impl, precision, mode):
    """coupled_gates=True (CIFG: 3 gate blocks, f = 1 - i) on every cell and loop, against
    helpers.DenseCIFG / the diagonal LSTM's per-step reference."""
    if impl == "triton" and not _triton_cells.available():
        pytest.skip("Triton is not installed: impl='triton' cannot run")
    check(cell, impl, precision, mode, coupled=True)


@pytest.mark.parametrize("cell,impl", SHARED_CASES, ids=[f"{c}-{i}" for c, i in SHARED_CASES])
@pytest.mark.parametrize("precision", ["fp64", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["given-state", "packed-bidirectional"])
def test_shared_gates_layer_on_cuda_matches_the_float64_reference(cell, impl, precision, mode):
    """shared_gates=True with a low-rank projection (proj_rank=3) on every cell and loop: the
    materialised G-gate weights and W_hr run the same loops on the GPU."""
    if impl == "triton" and not _triton_cells.available():
        pytest.skip("Triton is not installed: impl='triton' cannot run")
    check(cell, impl, precision, mode, shared=True)


@pytest.mark.parametrize("cell,impl", CASES, ids=[f"{c}-{i}" for c, i in CASES])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_wide_layer_on_cuda_matches_the_reference(cell, impl, precision):
    if impl == "triton" and not _triton_cells.available():
        pytest.skip("Triton is not installed: impl='triton' cannot run")
    check(cell, impl, precision, "given-state", wide=True)


@pytest.mark.parametrize("cell", [c for c in CELLS if "triton" in impls(c)])
def test_auto_picks_the_triton_cells_on_cuda(cell, monkeypatch):
    """impl="auto" on CUDA tensors runs the Triton cells when Triton is installed (the PyTorch loop
    otherwise): the default path on a GPU is the fast one."""
    from factorlm.ops import _backend

    monkeypatch.delenv(_backend.TRITON_ENV, raising=False)
    layer = make_layer(cell, 16, 32).to("cuda")
    x = torch.randn(4, 2, 16, dtype=torch.float64, device="cuda")
    assert _backend.select(x, layer.impl).name == ("triton" if _triton_cells.available() else "torch")
