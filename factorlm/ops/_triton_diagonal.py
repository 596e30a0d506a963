"""The diagonal LSTM's element-wise scan as two Triton kernels, for CUDA: the whole time loop in ONE
launch each way.

Same two functions, signatures and results as :mod:`factorlm.ops._scan_diagonal` (read its
docstring first). The recurrence is element-wise, so a program owns one sequence b and a block of
its cells and walks all of that sequence's steps itself (a packed batch's sequence b has
``lengths[b]`` steps, its row at step t being ``starts[t] + b``): c_{t-1} and the recurrent input
stay in registers from one step to the next, nothing is re-read, and there is no launch per step,
which is what a per-step loop costs on a GPU. Loads and stores are in the buffers' dtype, the
arithmetic in fp32 (fp64 for fp64 buffers), as :mod:`factorlm.ops._triton_cells`.

impl="triton" runs them (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, how the tests
check them); :func:`factorlm.ops.diagonal.scans_for` chooses. Coupled input and forget gates (G = 3
gate blocks [i, g, o], read off u's rows) are the kernels' COUPLED variant: the cell of
:mod:`factorlm.ops._scan_diagonal`'s docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm.ops._triton_cells import available

if available():
    import triton
    import triton.language as tl

    from factorlm.ops._triton_cells import _sigmoid, _tanh

    @triton.jit
    def _diagonal_forward_kernel(gates, u, s0, cells, m, starts, lengths, batch, n, forget_bias,
                                 PROJ: tl.constexpr, COUPLED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = q < n
        G: tl.constexpr = 3 if COUPLED else 4
        ui = tl.load(u + q, mask=mask).to(ACC)
        ug = tl.load(u + (G - 2) * n + q, mask=mask).to(ACC)
        uo = tl.load(u + (G - 1) * n + q, mask=mask).to(ACC)
        if not COUPLED:
            uf = tl.load(u + n + q, mask=mask).to(ACC)
        s = tl.load(s0 + b * n + q, mask=mask).to(ACC)
        c = tl.load(cells + b * n + q, mask=mask).to(ACC)
        length = tl.load(lengths + b)
        for t in range(0, length):
            row = tl.load(starts + t) + b
            pg = gates + row * G * n + q
            g = _tanh(tl.load(pg + (G - 2) * n, mask=mask).to(ACC) + ug * s)
            o = _sigmoid(tl.load(pg + (G - 1) * n, mask=mask).to(ACC) + uo * s)
            out_ty = gates.dtype.element_ty
            if COUPLED:  # [i, g, o]: f = 1 - i, forget_bias lowering i
                i = _sigmoid(tl.load(pg, mask=mask).to(ACC) + ui * s - forget_bias)
                c = c + i * (g - c)
            else:
                i = _sigmoid(tl.load(pg, mask=mask).to(ACC) + ui * s)
                f = _sigmoid(tl.load(pg + n, mask=mask).to(ACC) + uf * s + forget_bias)
                tl.store(pg + n, f.to(out_ty), mask=mask)
                c = f * c + i * g
            tl.store(pg, i.to(out_ty), mask=mask)
            tl.store(pg + (G - 2) * n, g.to(out_ty), mask=mask)
            tl.store(pg + (G - 1) * n, o.to(out_ty), mask=mask)
            mv = o * _tanh(c)
            tl.store(cells + (batch + row) * n + q, c.to(cells.dtype.element_ty), mask=mask)
            tl.store(m + row * n + q, mv.to(m.dtype.element_ty), mask=mask)
            if PROJ:
                s = _tanh(c)
            else:
                s = mv

    @triton.jit
    def _diagonal_backward_kernel(dm, dc_last, gates, cells, u, dpre, ds_out, dc_out, starts, lengths, batch, n,
                                  PROJ: tl.constexpr, COUPLED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        q = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = q < n
        G: tl.constexpr = 3 if COUPLED else 4
        ui = tl.load(u + q, mask=mask).to(ACC)
        ug = tl.load(u + (G - 2) * n + q, mask=mask).to(ACC)
        uo = tl.load(u + (G - 1) * n + q, mask=mask).to(ACC)
        if not COUPLED:
            uf = tl.load(u + n + q, mask=mask).to(ACC)
        dc = tl.load(dc_last + b * n + q, mask=mask).to(ACC)  # dL/dc_T: the sequence's last step
        ds = tl.zeros([BLOCK], dtype=ACC)
        length = tl.load(lengths + b)
        for k in range(0, length):
            t = length - 1 - k
            row = tl.load(starts + t) + b
            # c_{t-1}: c0's row for t = 0, else the sequence's row of step t-1 (starts[0] = 0 keeps
            # the load in bounds at t = 0)
            prev = tl.where(t == 0, b, batch + tl.load(starts + tl.maximum(t - 1, 0)) + b)
            cp = tl.load(cells + prev * n + q, mask=mask).to(ACC)
            pg = gates + row * G * n + q
            i = tl.load(pg, mask=mask).to(ACC)
            g = tl.load(pg + (G - 2) * n, mask=mask).to(ACC)
            o = tl.load(pg + (G - 1) * n, mask=mask).to(ACC)
            d = tl.load(dm + row * n + q, mask=mask).to(ACC)
            if not PROJ:
                d += ds
            tc = _tanh(tl.load(cells + (batch + row) * n + q, mask=mask).to(ACC))
            dct = dc + d * o * (1.0 - tc * tc)
            dg = dct * i * (1.0 - g * g)
            do = d * tc * o * (1.0 - o)
            pd = dpre + row * G * n + q
            out_ty = dpre.dtype.element_ty
            if COUPLED:  # c = c_prev + i·(g − c_prev): dc/di = g − c_prev, dc/dc_prev = 1 − i
                di = dct * (g - cp) * i * (1.0 - i)
                sg = ui * di + ug * dg + uo * do
                dc = dct * (1.0 - i)
            else:
                f = tl.load(pg + n, mask=mask).to(ACC)
                di = dct * g * i * (1.0 - i)
                df = dct * cp * f * (1.0 - f)
                tl.store(pd + n, df.to(out_ty), mask=mask)
                sg = ui * di + uf * df + ug * dg + uo * do
                dc = dct * f
            tl.store(pd, di.to(out_ty), mask=mask)
            tl.store(pd + (G - 2) * n, dg.to(out_ty), mask=mask)
            tl.store(pd + (G - 1) * n, do.to(out_ty), mask=mask)
            if PROJ:  # s_{t-1} = tanh(c_{t-1}) for t > 0; s0 at t = 0
                tp = _tanh(cp)
                first = t == 0
                dc = tl.where(first, dc, dc + sg * (1.0 - tp * tp))
                ds = tl.where(first, sg, ds)
            else:  # s_{t-1} = m_{t-1}, or s0
                ds = sg
        tl.store(ds_out + b * n + q, ds.to(ds_out.dtype.element_ty), mask=mask)
        tl.store(dc_out + b * n + q, dc.to(dc_out.dtype.element_ty), mask=mask)


def _index(batch_sizes, batch: int, device) -> tuple[Tensor, Tensor]:
    """(starts (T,), lengths (B,)) int64: each step's first row, each sequence's number of steps."""
    sizes = torch.tensor(list(batch_sizes), dtype=torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    lengths = (sizes[:, None] > torch.arange(batch)[None, :]).sum(0)
    return starts.to(device), lengths.to(device)


def _launch(n: int, batch: int, dtype: torch.dtype):
    block = min(1024, triton.next_power_of_2(n))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return (batch, triton.cdiv(n, block)), block, acc


def diagonal_forward_scan(z: Tensor, u: Tensor, forget_bias: float, s0: Tensor, c0: Tensor, batch_sizes,
                          proj: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`factorlm.ops._scan_diagonal.diagonal_forward_scan` in one kernel launch."""
    rows, four_n = z.shape
    num_gates = u.shape[0]
    n, batch = four_n // num_gates, c0.shape[0]
    cells = z.new_empty(batch + rows, n)
    cells[:batch].copy_(c0)
    m = z.new_empty(rows, n)
    starts, lengths = _index(batch_sizes, batch, z.device)
    grid, block, acc = _launch(n, batch, z.dtype)
    _diagonal_forward_kernel[grid](z, u.contiguous(), s0.contiguous(), cells, m, starts, lengths, batch, n,
                                   float(forget_bias), PROJ=bool(proj), COUPLED=num_gates == 3, ACC=acc, BLOCK=block)
    return z, cells, m


def diagonal_backward_scan(dm: Tensor, dc_last: Tensor, gates: Tensor, cells: Tensor, u: Tensor, batch_sizes,
                           proj: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`factorlm.ops._scan_diagonal.diagonal_backward_scan` in one kernel launch."""
    rows, four_n = gates.shape
    num_gates = u.shape[0]
    n, batch = four_n // num_gates, dc_last.shape[0]
    dpre = torch.empty_like(gates)
    ds, dc = torch.empty_like(dc_last), torch.empty_like(dc_last)
    starts, lengths = _index(batch_sizes, batch, gates.device)
    grid, block, acc = _launch(n, batch, gates.dtype)
    _diagonal_backward_kernel[grid](dm.contiguous(), dc_last.contiguous(), gates, cells, u.contiguous(), dpre, ds, dc,
                                    starts, lengths, batch, n, PROJ=bool(proj), COUPLED=num_gates == 3, ACC=acc,
                                    BLOCK=block)
    return dpre, ds, dc
