"""What a measurement ran on: CPU model and instruction set, threads, versions, GPU."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import factorlm

#: the environment variables that restrict the CPU instruction set: PyTorch's own kernels (and with
#: them the C++ extension's build flags), MKL's and oneDNN's
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

#: the lscpu fields worth recording beside a timing
_LSCPU_KEYS = ("Model name", "CPU(s)", "Core(s) per socket", "Socket(s)", "Thread(s) per core")


def machine_info(device: torch.device | str = "cpu") -> dict:
    """A description to store with every figure: platform, Python, torch and factorlm versions,
    torch's threads and CPU capability (AVX2, AVX512, ...; ATEN_CPU_CAPABILITY restricts it), the
    CPU model from lscpu, the GPU's name on CUDA, and the command line that is running."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "factorlm": factorlm.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(),
        "command": " ".join([_program(), *sys.argv[1:]]),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in _LSCPU_KEYS:
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info.setdefault("Model name", platform.processor() or "unknown")
    info["native_bf16"] = native_bf16()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_capability() -> str:
    """torch.backends.cpu.get_cpu_capability() (AVX2, AVX512, ...; ATEN_CPU_CAPABILITY restricts
    it), "DEFAULT" where this torch cannot say: the baseline ISA."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch or an unusual build
        return "DEFAULT"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether PyTorch multiplies bf16 in hardware here (AVX512-BF16, AMX-BF16, or ARM's bf16):
    without it a bf16 matmul is emulated and can be 100× slower than fp32. On x86 the CPU's flags
    are not enough: under an instruction-set restriction below AVX-512 (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA, as benchmarks/isa_compare.py sets) the kernels are emulated all the same
    (a 3072³ bf16 matmul ran for over 10 minutes on an AVX-512-BF16 Xeon restricted to AVX2)."""
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
        restricted = bool(onednn) and not onednn.startswith(("AVX512", "AVX10", "AMX", "ALL", "DEFAULT"))
        return cpu_capability() not in ("DEFAULT", "AVX2") and not restricted
    return "bf16" in flags


def _program() -> str:
    """The command's name: ``factorlm`` also under ``python -m factorlm``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return "factorlm" if name in ("__main__.py", "factorlm") else name


def machine_line(info: dict) -> str:
    """One line of machine_info for a report header."""
    where = info.get("gpu") or f"{info['Model name']} ({info.get('CPU(s)', '?')} CPUs, {info['threads']} threads, " \
                                f"{info['cpu_capability']})"
    return f"{where}; torch {info['torch']}, factorlm {info['factorlm']}, Python {info['python']}"
