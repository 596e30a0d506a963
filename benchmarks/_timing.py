"""Timing helpers shared by the benchmark scripts: medians, matmul peak, machine description, lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from factorlm.machine import machine_info as _machine_info
from factorlm.machine import native_bf16

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Each run is timed on its own (synchronising CUDA before and after), so the list of times
    shows the spread; the median resists the odd slow run.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072),
                repeats: int = 10) -> dict:
    """GFLOP/s of square matmuls through torch.matmul and, on CPU, oneDNN: the best over ``sizes``.

    One size alone is a poor probe: on the 2-core VM a 2048³ matmul measured anywhere from 97 to
    153 GFLOP/s between runs while 1024³ and 4096³ stayed near 150-170. oneDNN is reached
    through a mkldnn-layout nn.Linear (torch.utils.mkldnn); it is skipped (None) where mkldnn is
    unavailable or rejects the dtype. On CPU in fp32 the bf16 matmul is also measured, for
    reference only: it is different arithmetic (a ~2× higher ceiling on AVX512-BF16 CPUs), not
    a peak the fp32 layers could reach.
    """
    print(f"measuring the {dtype} matmul peak on {device} ({', '.join(map(str, sizes))}³) ...", file=sys.stderr,
          flush=True)
    by_size: dict[str, dict[str, float | None]] = {}
    peak: dict = {"torch.matmul": None, "onednn": None}
    for size in sizes:
        flops = 2.0 * size**3
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds, _ = median_seconds(lambda: torch.matmul(a, b), device, repeats=repeats)
        row = {"torch.matmul": flops / seconds / 1e9, "onednn": None}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            try:
                from torch.utils import mkldnn as mkldnn_utils

                linear = torch.nn.Linear(size, size, bias=False).to(dtype)
                with torch.no_grad():
                    dnn = mkldnn_utils.to_mkldnn(linear)
                    x = a.to_mkldnn()
                    seconds, _ = median_seconds(lambda: dnn(x), device, repeats=repeats)
                row["onednn"] = flops / seconds / 1e9
            except (RuntimeError, TypeError) as exc:  # dtype or layout not supported by this build
                peak["onednn_error"] = str(exc).splitlines()[0]
        by_size[str(size)] = row
        for key in ("torch.matmul", "onednn"):
            if row[key] is not None:
                peak[key] = max(peak[key] or 0.0, row[key])
    peak["by_size"] = by_size
    if device.type == "cpu" and dtype == torch.float32:
        if native_bf16():
            size = max(sizes)
            a = torch.randn(size, size, dtype=torch.bfloat16)
            seconds, _ = median_seconds(lambda: torch.matmul(a, a), device, repeats=repeats)
            peak["bf16_matmul_reference"] = 2.0 * size**3 / seconds / 1e9
        else:  # emulated bf16 crawls (a 3072³ matmul took minutes on an AVX2 EPYC): nothing to learn from it
            peak["bf16_matmul_reference"] = None
            peak["bf16_matmul_reference_skipped"] = "no native bf16 on this CPU (avx512_bf16 / amx_bf16)"
    return peak


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (factorlm.machine.machine_info), with the script's command."""
    info = _machine_info(device)
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    return info


@contextlib.contextmanager
def maybe_locked(path: str | None):
    """Hold an exclusive flock on ``path`` (if given) so concurrent benchmarks don't overlap."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def report(payload: dict, table: str, out: str | Path | None, default_name: str) -> Path:
    """A script's ending: ``payload`` as JSON to ``out`` (default ``benchmarks/results/<default_name>``),
    then the Markdown ``table`` and where the JSON went, on stdout. Returns the path."""
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / default_name
    write_json(path, payload)
    print(table)
    print(f"\nwrote {path}")
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> a Markdown table; columns are (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
