"""The element-wise time recurrence of the diagonal LSTM (IndyLSTM) in plain PyTorch: the portable loop.

The diagonal LSTM's recurrent map is u_g ⊙ s_{t-1} per gate g (factorlm.nn.diagonal), so once the
input side z = x·W_ih^T + b has been computed for every row by one GEMM, what is left of the time
loop is element-wise: no product per step. These two functions are that scan, forward and
backward; the C++ extension (csrc/diagonal_scan.cpp) exports the same two functions with the same
signatures and buffer layouts, and :mod:`factorlm.ops.diagonal` chooses between them.

Rows as in :mod:`factorlm.ops._packed` / :mod:`factorlm.ops._scan_torch`: one row per (step,
sequence), step-major, N rows in all, step t has ``batch_sizes[t]`` rows (non-increasing), and step
t reads the first ``batch_sizes[t]`` rows of step t-1.

The recurrent input s_{t-1} (B_t, n) that step t reads: ``s0`` (given by the caller) at t = 0; after
it m_{t-1} = σ(o)⊙tanh(c_{t-1}) without a projection (``proj`` False, m is then h), and tanh(c_{t-1})
with one (``proj`` True: a diagonal needs an n-wide input, and the carried state (h, c) must
determine the next step, which m_{t-1} would not: h is the projected p-wide output).

Coupled input and forget gates (CIFG, G = 3 gate blocks [i, g, o], read off u's rows: u (G, n),
z (N, G·n)): ι = σ(pre_i − forget_bias), c_t = c_{t-1} + ι⊙(tanh(pre_g) − c_{t-1}) (= (1 − ι)⊙c_{t-1}
+ ι⊙tanh(pre_g)), whose backward is dL/dpre_i = dL/dc_t⊙(g − c_{t-1})⊙ι(1 − ι), dL/dpre_g =
dL/dc_t⊙ι⊙(1 − g²), dL/dc_{t-1} = dL/dc_t⊙(1 − ι) through the cell path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def diagonal_forward_scan(z: Tensor, u: Tensor, forget_bias: float, s0: Tensor, c0: Tensor, batch_sizes,
                          proj: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward recurrence.

    z (N, G·n): x·W_ih^T + b in nn.LSTM's gate order [i, f, g, o] (G = 4) or [i, g, o] (G = 3,
    coupled), overwritten in place with the activated gates; u (G, n) the per-gate recurrent
    weights; forget_bias a constant added to f (G = 3: subtracted from i);
    s0 (B, n) the recurrent input of step 0; c0 (B, n); batch_sizes the rows per step (ints);
    proj: whether s_{t-1} = tanh(c_{t-1}) (True) or m_{t-1} (False) for t > 0.

    Returns gates (z itself, (N, G·n)), cells (B + N, n) with c0 in the first B rows, m (N, n).
    """
    rows, four_n = z.shape
    num_gates = u.shape[0]
    n = four_n // num_gates
    batch = c0.shape[0]
    sizes = list(batch_sizes)
    cells = z.new_empty(batch + rows, n)
    cells[:batch].copy_(c0)
    m = z.new_empty(rows, n)
    gate_steps = z.view(rows, num_gates, n).split(sizes)
    c_steps, m_steps = cells[batch:].split(sizes), m.split(sizes)
    for t, size in enumerate(sizes):
        if t == 0:
            c_prev, s = cells[:size], s0[:size]
        else:
            c_prev = c_steps[t - 1][:size]
            s = torch.tanh(c_prev) if proj else m_steps[t - 1][:size]
        g = gate_steps[t]  # (B_t, G, n)
        g.addcmul_(u, s.unsqueeze(1))
        c = c_steps[t]
        if num_gates == 3:  # [i, g, o], f = 1 - i
            if forget_bias != 0.0:
                g[:, 0].sub_(forget_bias)
            g[:, 0].sigmoid_()
            g[:, 2].sigmoid_()
            g[:, 1].tanh_()
            torch.lerp(c_prev, g[:, 1], g[:, 0], out=c)
        else:
            if forget_bias != 0.0:
                g[:, 1].add_(forget_bias)
            g[:, :2].sigmoid_()
            g[:, 3].sigmoid_()
            g[:, 2].tanh_()
            torch.mul(g[:, 1], c_prev, out=c)
            c.addcmul_(g[:, 0], g[:, 2])
        torch.tanh(c, out=m_steps[t])
        m_steps[t].mul_(g[:, -1])
    return z, cells, m


def diagonal_backward_scan(dm: Tensor, dc_last: Tensor, gates: Tensor, cells: Tensor, u: Tensor, batch_sizes,
                           proj: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`diagonal_forward_scan` through time.

    dm (N, n): dL/dm_t from the layer's outputs (through the projection, and with dL/dh_T already
    added at each sequence's last row), not from the recurrence; dc_last (B, n) dL/dc_T; gates
    (N, G·n) activated and cells (B + N, n) from the forward; u (G, n); batch_sizes, proj as there.

    Returns dpre (N, G·n), dL/d(pre-activation) (= dL/dz); ds0 (B, n), dL/ds0 (the recurrent input
    of step 0); dc0 (B, n), dL/dc0 through the cell path only (the caller adds what reaches c0
    through s0 when s0 = tanh(c0)).
    """
    rows, four_n = gates.shape
    num_gates = u.shape[0]
    n = four_n // num_gates
    batch = dc_last.shape[0]
    sizes = list(batch_sizes)
    dpre = torch.empty(rows, num_gates, n, dtype=gates.dtype, device=gates.device)
    dc = dc_last.clone()  # rows of sequences not yet started (backwards) hold their dL/dc_T
    ds = torch.zeros_like(dc)  # dL/ds_{t-1} carried to the previous step (no projection: to dm)
    gate_steps, c_steps = gates.view(rows, num_gates, n).split(sizes), cells[batch:].split(sizes)
    dm_steps, dpre_steps = dm.split(sizes), dpre.split(sizes)
    for t in range(len(sizes) - 1, -1, -1):
        size = sizes[t]
        if num_gates == 3:
            i, g, o = gate_steps[t].unbind(1)
            f = 1 - i
        else:
            i, f, g, o = gate_steps[t].unbind(1)
        c_prev = cells[:size] if t == 0 else c_steps[t - 1][:size]
        dm_t = dm_steps[t] if proj else dm_steps[t] + ds[:size]
        tc = torch.tanh(c_steps[t])
        dct = dc[:size]
        dct.addcmul_(dm_t, o * (1 - tc * tc))  # now all of dL/dc_t
        d = dpre_steps[t]
        if num_gates == 3:  # c_t = c_{t-1} + ι⊙(g − c_{t-1})
            torch.mul(dct * (g - c_prev), i * (1 - i), out=d[:, 0])
            torch.mul(dct * i, 1 - g * g, out=d[:, 1])
        else:
            torch.mul(dct * g, i * (1 - i), out=d[:, 0])
            torch.mul(dct * c_prev, f * (1 - f), out=d[:, 1])
            torch.mul(dct * i, 1 - g * g, out=d[:, 2])
        torch.mul(dm_t * tc, o * (1 - o), out=d[:, -1])
        dct.mul_(f)  # dL/dc_{t-1} through the cell path
        s_grad = (d * u).sum(1)
        if proj and t > 0:  # s_{t-1} = tanh(c_{t-1})
            tp = torch.tanh(c_prev)
            dct.addcmul_(s_grad, 1 - tp * tp)
        else:  # s_{t-1} = m_{t-1}, or s0
            ds[:size] = s_grad
    return dpre.view(rows, four_n), ds, dc
