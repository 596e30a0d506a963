"""The fused Triton cell kernels (factorlm.ops._triton_cells), checked on CPU in Triton's interpreter.

On a GPU the CUDA recurrence uses these kernels (impl="triton", or "auto" on CUDA); CI has no
GPU, so the checks run in a subprocess with TRITON_INTERPRET=1 (Triton's interpreter, which lets
impl="triton" run CPU tensors), FACTORLM_TRITON=1 and FACTORLM_NO_EXTENSION=1 (under which
impl="auto" picks the kernels for CPU tensors too): the cell kernels against the PyTorch cell on
strided group views, in fp32, fp64 and bf16 storage; gradcheck of both layers in float64 through
the kernels, padded and packed; and the layers with impl="triton" against the per-step reference in
float64, also bidirectional on a packed batch. Each also with coupled input and forget gates (3
gate blocks, coupled_gates=True / num_gates=3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed; the fused cell kernels only run with it")

CHECKS = textwrap.dedent(
    r"""
    import torch
    from torch.autograd import gradcheck
    import factorlm.nn as fnn
    from factorlm.ops import _backend, _scan_torch, _triton_cells, flstm_layer, glstm_layer

    assert _backend.select(torch.empty(0), "auto").name == "triton", "FACTORLM_TRITON=1 should pick the kernels"
    assert _backend.select(torch.empty(0), "torch").name == "torch", "impl='torch' should ignore FACTORLM_TRITON"
    torch.manual_seed(0)

    def grouped(t, k):
        return t.view(t.shape[0], k, -1).transpose(0, 1)

    # 1. one step of the cell, kernel vs PyTorch, on the strided layouts the scan uses
    k, B, nk = 2, 3, 40
    for (dtype, tol), G in ((dt, G) for dt in ((torch.float32, 1e-6), (torch.float64, 1e-12)) for G in (4, 3)):
        pre = torch.randn(k, B, G, nk, dtype=dtype) * 3
        bias = torch.randn(k, 1, G, nk, dtype=dtype)
        c_prev = torch.randn(B, k * nk, dtype=dtype)
        outs = []
        for fwd in (_scan_torch._cell_forward, _triton_cells.cell_forward):
            g = pre.clone()
            c = torch.empty(B, k * nk, dtype=dtype)
            m = torch.empty(B, k * nk, dtype=dtype)
            fwd(g, grouped(c_prev, k), grouped(c, k), grouped(m, k), bias)
            outs.append((g, c, m))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (dtype, G, (a - b).abs().max())
        gates, c = outs[0][0], outs[0][1]
        dm = torch.randn(B, k * nk, dtype=dtype)
        dc_in = torch.randn(B, k * nk, dtype=dtype)
        grads = []
        for math in (_scan_torch.TORCH_CELL_MATH, _backend.TRITON_CELL_MATH):
            dc = dc_in.clone()
            dg = torch.empty(k, B, G, nk, dtype=dtype)
            prepared = None if math.prepare is None else math.prepare(gates, grouped(c, k), dg)
            math.backward(gates, grouped(c_prev, k), grouped(c, k), prepared, grouped(dm, k), grouped(dc, k), dg)
            grads.append((dg, dc))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (dtype, G, (a - b).abs().max())

    # bf16 storage, fp32 arithmetic: within bf16 rounding of the fp32 result
    pre = torch.randn(1, B, 4, nk)
    c_prev = torch.randn(B, nk)
    ref_g, ref_c, ref_m = pre.clone(), torch.empty(B, nk), torch.empty(B, nk)
    _scan_torch._cell_forward(ref_g, c_prev[None], ref_c[None], ref_m[None])
    g16, c16, m16 = pre.bfloat16(), torch.empty(B, nk, dtype=torch.bfloat16), torch.empty(B, nk, dtype=torch.bfloat16)
    _triton_cells.cell_forward(g16, c_prev.bfloat16()[None], c16[None], m16[None])
    for a, b in ((ref_g, g16), (ref_c, c16), (ref_m, m16)):
        assert torch.allclose(a, b.float(), atol=3e-2, rtol=2e-2), (a - b.float()).abs().max()

    # 2. gradcheck of whole layers through the kernels, float64
    T, B, p_in, p, n = 3, 2, 4, 4, 8
    d = dict(dtype=torch.float64)
    x = torch.randn(T, B, p_in, **d, requires_grad=True)
    h0 = torch.randn(B, p, **d, requires_grad=True)
    c0 = torch.randn(B, n, **d, requires_grad=True)
    w1 = (torch.randn(3, p_in + p, **d) * 0.5).requires_grad_()
    w2 = (torch.randn(4 * n, 3, **d) * 0.5).requires_grad_()
    bias = torch.randn(4 * n, **d, requires_grad=True)
    w_hr = (torch.randn(p, n, **d) * 0.5).requires_grad_()
    assert gradcheck(lambda *a: flstm_layer(*a, forget_bias=1.0, impl="triton"), (x, h0, c0, w1, w2, bias, w_hr))
    w_ih = (torch.randn(2, 2 * n, p_in // 2, **d) * 0.5).requires_grad_()
    w_hh = (torch.randn(2, 2 * n, p // 2, **d) * 0.5).requires_grad_()
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=1.0, impl="triton"), (x, h0, c0, w_ih, w_hh, bias, w_hr))
    # coupled gates: 3n gate rows [i, g, o] (fast mode: the interpreter is slow, and the full
    # Jacobians of the same backwards are checked with the C++ and PyTorch loops)
    w2_c, bias_c = w2[: 3 * n].detach().requires_grad_(), bias[: 3 * n].detach().requires_grad_()
    assert gradcheck(lambda *a: flstm_layer(*a, forget_bias=1.0, impl="triton", num_gates=3),
                     (x, h0, c0, w1, w2_c, bias_c, w_hr), fast_mode=True)
    w_ih_c = w_ih[:, : 3 * n // 2].detach().requires_grad_()
    w_hh_c = w_hh[:, : 3 * n // 2].detach().requires_grad_()
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=1.0, impl="triton", num_gates=3),
                     (x, h0, c0, w_ih_c, w_hh_c, bias_c, w_hr), fast_mode=True)

    # a packed batch (shrinking batch: 3, 2, 2, 1 rows), through the kernels
    sizes = (3, 2, 2, 1)
    xp = torch.randn(sum(sizes), p_in, **d, requires_grad=True)
    hp = torch.randn(3, p, **d, requires_grad=True)
    cp = torch.randn(3, n, **d, requires_grad=True)
    # fast mode (a random projection of the Jacobian): the interpreter runs each kernel launch in
    # Python, and the full Jacobian of this backward is checked with the C++ and PyTorch loops
    assert gradcheck(lambda *a: glstm_layer(*a, forget_bias=1.0, impl="triton", batch_sizes=sizes),
                     (xp, hp, cp, w_ih, w_hh, bias, w_hr), fast_mode=True)

    # 3. the layers with impl="triton" against the per-step reference, float64: padded, and
    # bidirectional on an unsorted packed batch
    from torch.nn.utils.rnn import pack_padded_sequence

    for layer in (fnn.FLSTM(16, 32, proj_size=8, rank=6, num_layers=2), fnn.GLSTM(16, 32, proj_size=8, groups=4, num_layers=2),
                  fnn.FLSTM(16, 32, proj_size=8, rank=6, num_layers=2, bidirectional=True),
                  fnn.GLSTM(16, 32, proj_size=8, groups=4, num_layers=2, bidirectional=True),
                  fnn.FLSTM(16, 32, proj_size=8, rank=6, num_layers=2, coupled_gates=True, forget_bias=0.5),
                  fnn.GLSTM(16, 32, proj_size=8, groups=4, num_layers=2, bidirectional=True, coupled_gates=True,
                            forget_bias=0.5)):
        layer.double()
        xs = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
        results = []
        for impl in ("triton", "reference"):
            layer.impl = impl
            layer.zero_grad()
            xs.grad = None
            if layer.bidirectional:
                out, (h, c) = layer(pack_padded_sequence(xs, [2, 5, 1], enforce_sorted=False))
                out = out.data
            else:
                out, (h, c) = layer(xs)
            (out.square().sum() + h.sum() + c.sum()).backward()
            results.append([out, h, c, xs.grad] + [q.grad for q in layer.parameters()])
        for a, b in zip(*results):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), (type(layer).__name__, (a - b).abs().max())
    print("TRITON CELLS OK")
    """
)


def test_triton_cells_match_the_pytorch_cell_and_pass_gradcheck_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", FACTORLM_TRITON="1", FACTORLM_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "TRITON CELLS OK" in result.stdout, result.stdout + result.stderr
