"""Forward+backward throughput of one recurrent layer: torch.nn.LSTM vs factorlm LSTM / FLSTM / GLSTM.

For each shape (p, n, B) with T = 20, input size = proj_size = p, every layer runs
``output = layer(x); output.backward(grad)`` on the same inputs; the median of >= 10 timed runs
after warm-up is reported with tokens/s, achieved GFLOP/s (FLOPs = 2·MACs, fwd+bwd = 3× fwd, MACs
from layer.macs_per_token()), the speedup over torch.nn.LSTM measured in the same run, the
theoretical speedup (dense MACs / the layer's MACs) and their ratio. The machine's matmul peak is
measured in the same run for reference.

    flock /tmp/factorlm-cpu.lock python benchmarks/layer_speed.py --quick
    python benchmarks/layer_speed.py --lock /tmp/factorlm-cpu.lock      # full grid, lock per shape
    python benchmarks/layer_speed.py --device cuda --dtype bf16 --out results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

import factorlm.nn as fnn  # noqa: E402
from factorlm.nn.registry import cell_class, example_cell_args  # noqa: E402
from factorlm.ops import _extension  # noqa: E402

STEPS = 20
GRID = [(64, 256, 32), (128, 1024, 128), (256, 2048, 128), (512, 2048, 128), (1024, 8192, 32)]
QUICK_GRID = [(64, 256, 32), (256, 2048, 128)]


def layer_specs(n: int) -> list[tuple[str, dict]]:
    """(label, constructor spec) for every layer compared at cell size n: kind "torch" or a name in
    factorlm.nn.CELLS, and that cell's arguments. A registered cell not chosen here runs with its
    declared example arguments (CellArg.example)."""
    specs = [
        ("torch.nn.LSTM", dict(kind="torch")),
        ("factorlm LSTM", dict(kind="lstm")),
        (f"FLSTM r={n // 8}", dict(kind="flstm", rank=n // 8)),
        (f"FLSTM r={n // 16}", dict(kind="flstm", rank=n // 16)),
        ("GLSTM k=2", dict(kind="glstm", groups=2)),
        ("GLSTM k=4", dict(kind="glstm", groups=4)),
        ("GLSTM k=8", dict(kind="glstm", groups=8)),
    ]
    chosen = {spec["kind"] for _, spec in specs}
    for cell in fnn.CELLS:
        if cell not in chosen:
            args = example_cell_args(cell)
            specs.append((" ".join([cell, *(f"{k}={v}" for k, v in args.items())]), dict(kind=cell, **args)))
    return specs


def build(spec: dict, p: int, n: int, device, dtype):
    kind, cell_args = spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
    if kind == "torch":
        layer = torch.nn.LSTM(p, n, proj_size=p)
    else:
        layer = cell_class(kind)(p, n, proj_size=p, **cell_args)
    return layer.to(device=device, dtype=dtype)


def measure_shape(p: int, n: int, batch: int, device, dtype, warmup: int, repeats: int) -> list[dict]:
    with torch.device("meta"):  # only the MAC count is needed: allocate nothing
        dense_macs = fnn.LSTM(p, n, proj_size=p).macs_per_token()
    x = torch.randn(STEPS, batch, p, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(STEPS, batch, p, device=device, dtype=dtype)
    rows, baseline = [], None
    for label, spec in layer_specs(n):
        layer = build(spec, p, n, device, dtype)
        macs = dense_macs if spec["kind"] == "torch" else layer.macs_per_token()

        def step():
            out, _ = layer(x)
            out.backward(grad)

        seconds, times = _timing.median_seconds(step, device, warmup=warmup, repeats=repeats)
        tokens = STEPS * batch
        row = {
            "p": p, "n": n, "B": batch, "T": STEPS, "layer": label,
            "params": fnn.count_parameters(layer),
            "ms": seconds * 1e3,
            "ms_all": [t * 1e3 for t in times],
            "us_per_step": seconds * 1e6 / STEPS,
            "tokens_per_s": tokens / seconds,
            "gflops": 3 * 2 * macs * tokens / seconds / 1e9,
            "theoretical_speedup": dense_macs / macs,
        }
        if baseline is None:
            baseline = seconds
        row["speedup"] = baseline / seconds
        row["speedup_ratio"] = row["speedup"] / row["theoretical_speedup"]
        rows.append(row)
        del layer
    return rows


def describe_peak(peak: dict) -> str:
    """One line: the best GFLOP/s per GEMM route, and the bf16 reference where measured."""
    parts = [f"{key} {peak[key]:.0f} GFLOP/s" for key in ("torch.matmul", "onednn") if peak.get(key)]
    if peak.get("bf16_matmul_reference"):
        parts.append(f"(bf16 matmul, other arithmetic: {peak['bf16_matmul_reference']:.0f})")
    sizes = "/".join(peak.get("by_size", {}))
    return f"matmul peak, best of {sizes}: " + ", ".join(parts)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(v.strip().isdigit() for v in parts):
        raise argparse.ArgumentTypeError(f"a shape is 'p,n,B' (three integers), got {text!r}")
    return tuple(int(v) for v in parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only shapes {QUICK_GRID} (about a minute)")
    parser.add_argument("--shape", type=parse_shape, action="append", help="p,n,B to run (repeatable); overrides the grid")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_timing.DTYPES), help="fp32 (default) or bf16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per layer (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per layer, median reported (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--lock", default=None, help="flock this file around each shape (e.g. /tmp/factorlm-cpu.lock)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/layer_speed_<device>_<dtype>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = _timing.DTYPES[args.dtype]
    shapes = args.shape or (QUICK_GRID if args.quick else GRID)
    torch.manual_seed(0)

    with _timing.maybe_locked(args.lock):
        extension = _extension.is_available() if device.type == "cpu" else False  # build outside the timings
        peak = _timing.matmul_peak(device, dtype)
    print(describe_peak(peak), flush=True)
    rows = []
    for p, n, batch in shapes:
        with _timing.maybe_locked(args.lock):
            shape_rows = measure_shape(p, n, batch, device, dtype, args.warmup, args.repeats)
        best_peak = max(v for k, v in peak.items() if k in ("torch.matmul", "onednn") and v)
        for row in shape_rows:
            row["fraction_of_peak"] = row["gflops"] / best_peak
        rows += shape_rows
        print(table(shape_rows), "\n", flush=True)

    payload = {
        "benchmark": "layer_speed",
        "machine": _timing.machine_info(device),
        "device": str(device),
        "dtype": args.dtype,
        "c++ extension": extension,
        "matmul_peak_gflops": peak,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"layer_speed_{device.type}_{args.dtype}.json"
    _timing.write_json(out, payload)
    print(table(rows))
    print(f"\nwrote {out}")
    return payload


def table(rows: list[dict]) -> str:
    return _timing.markdown_table(
        rows,
        [
            ("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"), ("params", "params", ","),
            ("ms", "ms", ".1f"), ("µs/step", "us_per_step", ".0f"), ("tokens/s", "tokens_per_s", ",.0f"),
            ("GFLOP/s", "gflops", ".1f"), ("% peak", "fraction_of_peak", ".0%"), ("speedup", "speedup", ".2f"),
            ("theory", "theoretical_speedup", ".2f"), ("ratio", "speedup_ratio", ".0%"),
        ],
    )


if __name__ == "__main__":
    main()
