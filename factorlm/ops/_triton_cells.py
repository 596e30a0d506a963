"""Fused pointwise LSTM cell kernels in Triton, for the recurrence on CUDA.

On a GPU the per-step GEMMs are short, and what costs time is the number of kernel launches:
the plain-PyTorch cell of :mod:`factorlm.ops._scan_torch` issues ~8 pointwise kernels forward
and 7 backward per time step (after ~10 over the whole sequence). These two kernels do one step's whole gate math in one launch
each way (the same formulas as the C++ loops in csrc/scan.cpp), loading and storing in the
buffers' dtype (fp32, bf16, fp16) and computing in fp32 (fp64 for fp64 buffers).

Tensors are passed as strided views, so the kernels read and write exactly the layouts the
scan uses: gates (k, B, 4, nk) in torch.nn.LSTM's order [i, f, g, o]; cell states, m, dm, dc as
(k, B, nk) views of the layer's (B, n) buffers. One program handles one (group, batch row)
and a block of cells. A (k, B, 3, nk) gates tile is the coupled cell's [i, g, o] (f = 1 - i, the
forget_bias already subtracted from i by the addend: see factorlm.ops._scan_torch), compiled as its
own variant of each kernel (the constexpr COUPLED).

Which runs where is chosen by :mod:`factorlm.ops._backend`: impl="triton" asks for them (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``, Triton's interpreter: how the test suite
checks them without a GPU); impl="auto" uses them on CUDA when Triton is installed.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch cell is used
    triton = None


def available() -> bool:
    """True when Triton is importable, i.e. the kernels below exist."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        # 2σ(2x) - 1: saturates cleanly to ±1 for large |x| (no inf/inf)
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _load_gates(ptr, gate_stride, mask, ACC: tl.constexpr):
        """The four gate values [i, f, g, o] of a block of cells, in the compute dtype."""
        return (
            tl.load(ptr, mask=mask).to(ACC),
            tl.load(ptr + gate_stride, mask=mask).to(ACC),
            tl.load(ptr + 2 * gate_stride, mask=mask).to(ACC),
            tl.load(ptr + 3 * gate_stride, mask=mask).to(ACC),
        )

    @triton.jit
    def _coupled_forward(pg, s_gg, pa, s_ag, pcp, pc, pm, mask, HAS_ADDEND: tl.constexpr, ACC: tl.constexpr):
        """The coupled cell, [i, g, o] at pg, pg + s_gg, pg + 2·s_gg: c = c_prev + σi·(tanh g - c_prev)."""
        zi = tl.load(pg, mask=mask).to(ACC)
        zg = tl.load(pg + s_gg, mask=mask).to(ACC)
        zo = tl.load(pg + 2 * s_gg, mask=mask).to(ACC)
        if HAS_ADDEND:
            zi += tl.load(pa, mask=mask).to(ACC)
            zg += tl.load(pa + s_ag, mask=mask).to(ACC)
            zo += tl.load(pa + 2 * s_ag, mask=mask).to(ACC)
        i = _sigmoid(zi)
        g = _tanh(zg)
        o = _sigmoid(zo)
        out_ty = pg.dtype.element_ty
        tl.store(pg, i.to(out_ty), mask=mask)
        tl.store(pg + s_gg, g.to(out_ty), mask=mask)
        tl.store(pg + 2 * s_gg, o.to(out_ty), mask=mask)
        cp = tl.load(pcp, mask=mask).to(ACC)
        cv = cp + i * (g - cp)
        tl.store(pc, cv.to(pc.dtype.element_ty), mask=mask)
        tl.store(pm, (o * _tanh(cv)).to(pm.dtype.element_ty), mask=mask)

    @triton.jit
    def _coupled_backward(pg, s_gg, pcp, pc, pdm, pdc, pd, s_dg, mask, ACC: tl.constexpr):
        """The coupled cell's backward: dL/di = dcell·(g - c_prev)·σ'(i), dL/dc_{t-1} = dcell·(1 - i)."""
        i = tl.load(pg, mask=mask).to(ACC)
        g = tl.load(pg + s_gg, mask=mask).to(ACC)
        o = tl.load(pg + 2 * s_gg, mask=mask).to(ACC)
        t = _tanh(tl.load(pc, mask=mask).to(ACC))
        cp = tl.load(pcp, mask=mask).to(ACC)
        d = tl.load(pdm, mask=mask).to(ACC)
        dcell = tl.load(pdc, mask=mask).to(ACC) + d * o * (1.0 - t * t)
        out_ty = pd.dtype.element_ty
        tl.store(pd, (dcell * (g - cp) * i * (1.0 - i)).to(out_ty), mask=mask)
        tl.store(pd + s_dg, (dcell * i * (1.0 - g * g)).to(out_ty), mask=mask)
        tl.store(pd + 2 * s_dg, (d * t * o * (1.0 - o)).to(out_ty), mask=mask)
        tl.store(pdc, (dcell * (1.0 - i)).to(pdc.dtype.element_ty), mask=mask)

    @triton.jit
    def _cell_forward_kernel(
        gates, s_gk, s_gb, s_gg,
        addend, s_ak, s_ab, s_ag,
        c_prev, s_pk, s_pb,
        c, s_ck, s_cb,
        m, s_mk, s_mb,
        batch, nk,
        HAS_ADDEND: tl.constexpr, COUPLED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        j = row // batch
        b = row % batch
        q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = q < nk
        pg = gates + j * s_gk + b * s_gb + q
        if COUPLED:
            _coupled_forward(pg, s_gg, addend + j * s_ak + b * s_ab + q, s_ag, c_prev + j * s_pk + b * s_pb + q,
                             c + j * s_ck + b * s_cb + q, m + j * s_mk + b * s_mb + q, mask, HAS_ADDEND, ACC)
        else:
            zi, zf, zg, zo = _load_gates(pg, s_gg, mask, ACC)
            if HAS_ADDEND:
                ai, af, ag, ao = _load_gates(addend + j * s_ak + b * s_ab + q, s_ag, mask, ACC)
                zi += ai
                zf += af
                zg += ag
                zo += ao
            i = _sigmoid(zi)
            f = _sigmoid(zf)
            g = _tanh(zg)
            o = _sigmoid(zo)
            out_ty = gates.dtype.element_ty
            tl.store(pg, i.to(out_ty), mask=mask)
            tl.store(pg + s_gg, f.to(out_ty), mask=mask)
            tl.store(pg + 2 * s_gg, g.to(out_ty), mask=mask)
            tl.store(pg + 3 * s_gg, o.to(out_ty), mask=mask)
            cp = tl.load(c_prev + j * s_pk + b * s_pb + q, mask=mask).to(ACC)
            cv = f * cp + i * g
            tl.store(c + j * s_ck + b * s_cb + q, cv.to(c.dtype.element_ty), mask=mask)
            tl.store(m + j * s_mk + b * s_mb + q, (o * _tanh(cv)).to(m.dtype.element_ty), mask=mask)

    @triton.jit
    def _cell_backward_kernel(
        gates, s_gk, s_gb, s_gg,
        c_prev, s_pk, s_pb,
        c, s_ck, s_cb,
        dm, s_dmk, s_dmb,
        dc, s_dck, s_dcb,
        dgates, s_dk, s_db, s_dg,
        batch, nk,
        COUPLED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        j = row // batch
        b = row % batch
        q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = q < nk
        pg = gates + j * s_gk + b * s_gb + q
        if COUPLED:
            _coupled_backward(pg, s_gg, c_prev + j * s_pk + b * s_pb + q, c + j * s_ck + b * s_cb + q,
                              dm + j * s_dmk + b * s_dmb + q, dc + j * s_dck + b * s_dcb + q,
                              dgates + j * s_dk + b * s_db + q, s_dg, mask, ACC)
        else:
            i, f, g, o = _load_gates(pg, s_gg, mask, ACC)
            t = _tanh(tl.load(c + j * s_ck + b * s_cb + q, mask=mask).to(ACC))
            cp = tl.load(c_prev + j * s_pk + b * s_pb + q, mask=mask).to(ACC)
            d = tl.load(dm + j * s_dmk + b * s_dmb + q, mask=mask).to(ACC)
            pdc = dc + j * s_dck + b * s_dcb + q
            dcell = tl.load(pdc, mask=mask).to(ACC) + d * o * (1.0 - t * t)
            pd = dgates + j * s_dk + b * s_db + q
            out_ty = dgates.dtype.element_ty
            tl.store(pd, (dcell * g * i * (1.0 - i)).to(out_ty), mask=mask)
            tl.store(pd + s_dg, (dcell * cp * f * (1.0 - f)).to(out_ty), mask=mask)
            tl.store(pd + 2 * s_dg, (dcell * i * (1.0 - g * g)).to(out_ty), mask=mask)
            tl.store(pd + 3 * s_dg, (d * t * o * (1.0 - o)).to(out_ty), mask=mask)
            tl.store(pdc, (dcell * f).to(dc.dtype.element_ty), mask=mask)


def _launch_shape(gates: Tensor):
    k, batch, four, nk = gates.shape
    if four not in (3, 4) or gates.stride(3) != 1:
        raise ValueError(f"gates must be a (k, B, 4, nk) view (or (k, B, 3, nk), coupled gates) with unit cell "
                         f"stride, got shape {tuple(gates.shape)} strides {gates.stride()}")
    block = min(1024, triton.next_power_of_2(nk))
    return (k * batch, triton.cdiv(nk, block)), block, batch, nk


def _acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def cell_forward(gates: Tensor, c_prev: Tensor, c: Tensor, m: Tensor, addend: Tensor | None = None) -> None:
    """Same contract as factorlm.ops._scan_torch._cell_forward, in one kernel launch.

    gates (k, B, 4, nk), pre-activations [i, f, g, o], activated in place (plus ``addend``, broadcastable to
    (k, B, 4, nk), e.g. the bias as (k, 1, 4, nk)); c_prev, c, m (k, B, nk) views. (k, B, 3, nk):
    the coupled cell's [i, g, o].
    """
    grid, block, batch, nk = _launch_shape(gates)
    a = gates if addend is None else addend.expand(gates.shape)
    _cell_forward_kernel[grid](
        gates, gates.stride(0), gates.stride(1), gates.stride(2),
        a, a.stride(0), a.stride(1), a.stride(2),
        c_prev, c_prev.stride(0), c_prev.stride(1),
        c, c.stride(0), c.stride(1),
        m, m.stride(0), m.stride(1),
        batch, nk,
        HAS_ADDEND=addend is not None, COUPLED=gates.shape[2] == 3, ACC=_acc(gates), BLOCK=block,
    )


def cell_backward(gates: Tensor, c_prev: Tensor, c: Tensor, prepared: None, dm: Tensor, dc: Tensor,
                  dgates: Tensor) -> None:
    """One step of the pointwise backward in one kernel launch: the contract of
    factorlm.ops._scan_torch._cell_backward, but whole, with no ``prepare`` pass over the sequence
    before it (``prepared`` is None; tanh(c) is recomputed in registers)."""
    grid, block, batch, nk = _launch_shape(gates)
    _cell_backward_kernel[grid](
        gates, gates.stride(0), gates.stride(1), gates.stride(2),
        c_prev, c_prev.stride(0), c_prev.stride(1),
        c, c.stride(0), c.stride(1),
        dm, dm.stride(0), dm.stride(1),
        dc, dc.stride(0), dc.stride(1),
        dgates, dgates.stride(0), dgates.stride(1), dgates.stride(2),
        batch, nk,
        COUPLED=gates.shape[2] == 3, ACC=_acc(gates), BLOCK=block,
    )
