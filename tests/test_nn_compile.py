"""torch.compile over every layer type (float64, AOTAutograd with the eager backend, so the backward
goes through the compiled graph too), and torch.func transforms, which the fast path refuses by name."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import factorlm.nn as fnn
from helpers import CELLS, make_layer

TOL = dict(rtol=1e-10, atol=1e-12)


def _run(module, x, lengths):
    """Output data, h_n, c_n and the gradient of a loss through all three with respect to x and every
    parameter of ``module`` (the compiled wrapper shares the layer's parameters)."""
    inputs = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h, c) = module(inputs, None)
    data = out.data if isinstance(out, PackedSequence) else out
    loss = (data * torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)).sum() + (h**2).sum() + c.sum()
    return [data, h, c, *torch.autograd.grad(loss, [x, *module.parameters()])]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "bidirectional,lengths,impl",
    [(False, None, "auto"), (True, None, "auto"), (True, [2, 5, 1, 4], "auto"), (True, [2, 5, 1, 4], "reference")],
    ids=["padded", "bidirectional", "bidirectional-packed", "reference-bidirectional-packed"],
)
def test_compiled_layer_matches_the_layer(cell, bidirectional, lengths, impl):
    torch._dynamo.reset()  # a fresh cache: no test runs on another's compiled code or hits the recompile limit
    # the reference is traced step by step (unrolled): one layer keeps that quick
    layers = 1 if impl == "reference" else 2
    layer = make_layer(cell, num_layers=layers, proj_size=4, batch_first=True, bidirectional=bidirectional)
    layer.impl = impl
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    expected = _run(layer, x, lengths)
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=backend)
    for _ in range(2):  # the second call runs the cached graphs
        got = _run(compiled, x, lengths)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL)
    assert backend.frame_count >= 1  # something was compiled, not all skipped


def test_torch_func_transforms_are_refused_by_the_fast_path_and_run_on_the_reference():
    layer = make_layer("glstm")
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"fast path does not support torch.func transforms .* "
                                                  r"set layer.impl = 'reference'"):
        torch.func.vmap(lambda xi: layer(xi)[0])(x)
    fnn.set_impl(layer, "reference")
    batched = torch.func.vmap(lambda xi: layer(xi)[0])(x)
    torch.testing.assert_close(batched[1], layer(x[1])[0], **TOL)
