"""``factorlm doctor``: which time loop the layers run on this machine, and whether it is right.

How fast F-LSTM and G-LSTM run depends on the time loop they get (:mod:`factorlm.ops._backend`):
the C++ recurrence on CPU (compiled on first use for the CPU's instruction set), the fused Triton
cells on CUDA, else the pure-PyTorch loop, which is up to 2× slower on small layers and slower than
nn.LSTM at batch 1 there (BENCHMARKS.md). A missing compiler shows up as one warning, easily lost in
a training log; this report says which loop ``impl="auto"`` picks for each device and dtype, why a
faster one is missing (the compiler's last error line, an environment variable), what restricts
the instruction set, and then runs every loop that can run here on small F-LSTM, G-LSTM and
diagonal LSTM stacks in float64 (padded and packed, forward and backward) against the per-step
reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from factorlm.machine import ISA_ENV, machine_info, machine_line, native_bf16
from factorlm.ops import _backend, _extension, _triton_cells

#: environment variables that change what runs (instruction sets, threads, the loops)
RELEVANT_ENV = (*ISA_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", _extension.DISABLE_ENV, _backend.TRITON_ENV,
                _backend.INTERPRET_ENV)

#: float64 agreement asked of every loop against the per-step reference (they differ by rounding
#: only: ~1e-15 relative; a wrong gate or a missing term shows at 1e-1)
TOLERANCE = 1e-9


@dataclass
class Agreement:
    """One loop on one layer: the largest difference from the reference over outputs and gradients."""

    loop: str
    layer: str
    device: str
    max_difference: float

    @property
    def ok(self) -> bool:
        return self.max_difference <= TOLERANCE  # NaN fails too


def devices() -> list[torch.device]:
    """The CPU, and the first GPU when there is one."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def loops_for(device: torch.device) -> list[str]:
    """The impl values that can run float64 on ``device`` here (the reference excluded)."""
    loops = ["torch"]
    if device.type == "cpu" and _extension.is_available():
        loops.append("extension")
    if device.type == "cuda" and _triton_cells.available():
        loops.append("triton")
    return loops


def auto_choices() -> list[tuple[str, str]]:
    """(device and dtype, the loop impl="auto" picks there) for the combinations that exist here."""
    combos = [(d, dtype) for d in devices() for dtype in (torch.float32, torch.bfloat16)]
    return [(f"{d.type} {str(dtype).removeprefix('torch.')}", _backend.select(torch.empty(0, device=d, dtype=dtype)).name)
            for d, dtype in combos]


def _layers() -> dict[str, torch.nn.Module]:
    from factorlm.nn import FLSTM, GLSTM, DiagonalLSTM

    with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's RNG untouched
        torch.manual_seed(0)
        return {
            "FLSTM(8, 16, proj 8, rank 4, 2 layers)": FLSTM(8, 16, proj_size=8, rank=4, num_layers=2),
            "GLSTM(8, 16, proj 8, groups 2, 2 layers)": GLSTM(8, 16, proj_size=8, groups=2, num_layers=2),
            "DiagonalLSTM(8, 16, proj 8, 2 layers)": DiagonalLSTM(8, 16, proj_size=8, num_layers=2),
        }


def _run(layer: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> list[torch.Tensor]:
    """Outputs (output, h_n, c_n) and the gradients of a fixed weighted sum of them, w.r.t. x and
    every parameter."""
    x = x.detach().requires_grad_()
    inputs = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    output, (h_n, c_n) = layer(inputs)
    output = output if lengths is None else output.data
    outs = [output, h_n, c_n]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [t.detach() for t in (*outs, *grads)]


def _largest_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max |got - expected| over all the tensors; NaN if any difference is NaN (torch's max keeps it)."""
    return torch.stack([(a - b).abs().max() for a, b in zip(got, expected)]).max().item()


def agreements() -> list[Agreement]:
    """Every loop that can run here, on each layer, padded and on a packed batch, against the
    per-step reference in float64."""
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batches = (None, torch.tensor([5, 2, 4]))  # padded, and packed from these lengths
    results = []
    for device in devices():
        for name, layer in _layers().items():
            layer = layer.to(device=device, dtype=torch.float64)

            def outcomes(impl: str) -> list[torch.Tensor]:
                layer.impl = impl
                return [t for lengths in batches for t in _run(layer, x.to(device), lengths)]

            expected = outcomes("reference")
            results += [Agreement(loop, name, device.type, _largest_difference(outcomes(loop), expected))
                        for loop in loops_for(device)]
    return results


def report() -> tuple[list[str], bool]:
    """The report's lines, and whether every check passed."""
    info = machine_info()
    capability = info["cpu_capability"]
    lines = [f"machine: {machine_line(info)}"]
    lines.append(f"CPU instruction set (as PyTorch detects it): {capability}; native bf16: "
                 f"{'yes' if native_bf16() else 'no (bf16 matmuls are emulated: use float32)'}")
    restricted = {k: os.environ[k] for k in RELEVANT_ENV if k in os.environ}
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in restricted.items()) or "nothing that changes the loops"))
    if _extension.is_available():
        lines.append(f"C++ recurrence (CPU): built for {capability}: {_extension.module_path()}")
    else:
        remedy = (f"unset {_extension.DISABLE_ENV} to use it" if _extension.disabled() else
                  "building it needs a C++ compiler (g++ or clang++) and ninja (pip install ninja)")
        lines.append(f"C++ recurrence (CPU): NOT available ({_extension.build_error()}); F-LSTM and G-LSTM on CPU run "
                     f"the pure-PyTorch loop, up to 2x slower on small layers; {remedy}")
    if torch.cuda.is_available():
        triton = "installed" if _triton_cells.available() else 'not installed (pip install -e ".[gpu]")'
        lines.append(f"CUDA: {torch.cuda.get_device_name(0)}; Triton {triton}")
    else:
        lines.append("CUDA: no GPU visible")
    lines.append("impl='auto' picks: " + "; ".join(f"{where} -> {loop}" for where, loop in auto_choices()))
    lines.append(f"checks (float64, padded and packed, outputs and gradients against the per-step reference, "
                 f"tolerance {TOLERANCE:g}):")
    checks = agreements()
    for a in checks:
        verdict = "ok" if a.ok else "WRONG"
        lines.append(f"  {verdict:5s} {a.loop:9s} {a.device:4s} {a.layer}: max difference {a.max_difference:.1e}")
    return lines, all(a.ok for a in checks)
