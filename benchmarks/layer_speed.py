"""Forward+backward throughput of one recurrent layer: torch.nn.LSTM vs factorlm LSTM / FLSTM / GLSTM.

For each shape (p, n, B) with T = 20, input size = proj_size = p, every layer runs
``output = layer(x); output.backward(grad)`` on the same inputs; the median of >= 10 timed runs
after warm-up is reported with tokens/s, achieved GFLOP/s (FLOPs = 2·MACs, fwd+bwd = 3× fwd, MACs
from layer.macs_per_token()), the speedup over torch.nn.LSTM measured in the same run, the
theoretical speedup (dense MACs / the layer's MACs) and their ratio. The machine's matmul peak is
measured in the same run for reference.

``--bidirectional`` builds every layer, torch.nn.LSTM included, with bidirectional=True.
``--packed`` feeds every layer the same PackedSequence of B sequences whose lengths are drawn
uniformly from [T/2, T] (seeded; unsorted, enforce_sorted=False; packing is not timed); tokens/s
then counts real tokens, and the column "vs full" is the layer's time per token on that batch over
its time per token on the full (T, B) batch without padding (1.00: the shorter sequences cost
exactly their tokens; padding them would cost about T·B / Σ lengths ≈ 1.33).
``--compile`` wraps every layer in ``torch.compile`` (default backend); compiling happens in the
first warm-up run, whose time is reported on its own ("compile s"), and is left out of the median.

    flock /tmp/factorlm-cpu.lock python benchmarks/layer_speed.py --quick
    python benchmarks/layer_speed.py --lock /tmp/factorlm-cpu.lock      # full grid, lock per shape
    python benchmarks/layer_speed.py --quick --bidirectional --packed --lock /tmp/factorlm-cpu.lock
    python benchmarks/layer_speed.py --quick --compile --lock /tmp/factorlm-cpu.lock   # torch.compile'd layers
    python benchmarks/layer_speed.py --device cuda --dtype bf16 --out results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

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


def build(spec: dict, p: int, n: int, device, dtype, bidirectional: bool = False):
    kind, cell_args = spec["kind"], {k: v for k, v in spec.items() if k != "kind"}
    if kind == "torch":
        layer = torch.nn.LSTM(p, n, proj_size=p, bidirectional=bidirectional)
    else:
        layer = cell_class(kind)(p, n, proj_size=p, bidirectional=bidirectional, **cell_args)
    return layer.to(device=device, dtype=dtype)


class Inputs:
    """What every layer of one shape runs on: the full (T, B, p) batch ``x``, and with packed=True a
    PackedSequence of lengths drawn uniformly from [T/2, T] (seed 0) whose data is its own leaf, so
    the timed step does not pack; ``tokens`` counts the real tokens of what ``step`` feeds."""

    def __init__(self, p: int, batch: int, device, dtype, packed: bool, output_size: int):
        new = dict(device=device, dtype=dtype)
        self.x = torch.randn(STEPS, batch, p, **new, requires_grad=True)
        self.full_grad = torch.randn(STEPS, batch, output_size, **new)
        self.packed = None
        if packed:
            lengths = torch.randint(STEPS // 2, STEPS + 1, (batch,), generator=torch.Generator().manual_seed(0))
            pack = pack_padded_sequence(self.x.detach(), lengths, enforce_sorted=False)
            data = pack.data.clone().requires_grad_()
            self.packed = PackedSequence(data, pack.batch_sizes, pack.sorted_indices, pack.unsorted_indices)
            self.packed_grad = torch.randn(data.shape[0], output_size, **new)
        self.tokens = STEPS * batch if self.packed is None else int(self.packed.data.shape[0])

    def step(self, layer, full: bool = False):
        """One forward + backward of ``layer`` on the packed batch (or the full one)."""
        if self.packed is None or full:
            out, _ = layer(self.x)
            out.backward(self.full_grad)
        else:
            out, _ = layer(self.packed)
            out.data.backward(self.packed_grad)


def measure_shape(p: int, n: int, batch: int, device, dtype, warmup: int, repeats: int,
                  bidirectional: bool = False, packed: bool = False, compile: bool = False) -> list[dict]:
    with torch.device("meta"):  # only the MAC count is needed: allocate nothing
        dense_macs = fnn.LSTM(p, n, proj_size=p, bidirectional=bidirectional).macs_per_token()
    inputs = Inputs(p, batch, device, dtype, packed, output_size=p * (2 if bidirectional else 1))
    rows, baseline = [], None
    for label, spec in layer_specs(n):
        layer = build(spec, p, n, device, dtype, bidirectional)
        macs = dense_macs if spec["kind"] == "torch" else layer.macs_per_token()
        compile_seconds = None
        if compile:
            torch._dynamo.reset()  # each layer compiled afresh, never hitting the recompile limit
            layer = torch.compile(layer)
            compile_seconds, _ = _timing.median_seconds(lambda: inputs.step(layer), device, warmup=0, repeats=1)
        seconds, times = _timing.median_seconds(lambda: inputs.step(layer), device, warmup=warmup, repeats=repeats)
        tokens = inputs.tokens
        row = {
            "p": p, "n": n, "B": batch, "T": STEPS, "layer": label,
            "bidirectional": bidirectional, "input": "packed" if packed else "full", "compile_s": compile_seconds,
            "params": fnn.count_parameters(layer),
            "ms": seconds * 1e3,
            "ms_all": [t * 1e3 for t in times],
            "us_per_step": seconds * 1e6 / STEPS,
            "tokens_per_s": tokens / seconds,
            "gflops": 3 * 2 * macs * tokens / seconds / 1e9,
            "theoretical_speedup": dense_macs / macs,
        }
        if packed:  # the same layer on the full batch: what a packed token costs against a full one
            full_seconds, _ = _timing.median_seconds(lambda: inputs.step(layer, full=True), device, warmup=warmup,
                                                     repeats=repeats)
            row["ms_full"] = full_seconds * 1e3
            row["packed_cost"] = (seconds / tokens) / (full_seconds / (STEPS * batch))
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


def add_layer_grid_arguments(parser: argparse.ArgumentParser, quick_grid, warmup_what: str, quick_note: str = ""):
    """The options every per-layer benchmark takes: which shapes, device, dtype, how many runs, threads, lock."""
    parser.add_argument("--quick", action="store_true", help=f"only shapes {quick_grid}{quick_note}")
    parser.add_argument("--shape", type=parse_shape, action="append", help="p,n,B to run (repeatable); overrides the grid")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_timing.DTYPES), help="fp32 (default) or bf16")
    parser.add_argument("--warmup", type=int, default=3, help=f"{warmup_what} (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per layer, median reported (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--lock", default=None, help="flock this file around each shape (e.g. /tmp/factorlm-cpu.lock)")


def apply_layer_grid_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Refuse too few repeats for a median; set the thread count asked for."""
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_grid_arguments(parser, QUICK_GRID, "untimed runs per layer", quick_note=" (about a minute)")
    parser.add_argument("--bidirectional", action="store_true", help="every layer bidirectional (torch.nn.LSTM too)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every layer (default backend)")
    parser.add_argument("--packed", action="store_true",
                        help="a PackedSequence of lengths uniform in [T/2, T] instead of the full batch; adds the "
                             "per-token cost against the full batch")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/layer_speed_<device>_<dtype>.json)")
    args = parser.parse_args(argv)
    apply_layer_grid_arguments(parser, args)
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
            shape_rows = measure_shape(p, n, batch, device, dtype, args.warmup, args.repeats,
                                       bidirectional=args.bidirectional, packed=args.packed, compile=args.compile)
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
        "bidirectional": args.bidirectional,
        "compile": args.compile,
        "input": "packed, lengths uniform in [T/2, T]" if args.packed else "full (T, B)",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }
    variant = "".join(f"_{flag}" for flag in ("bidirectional", "packed", "compile") if getattr(args, flag))
    _timing.report(payload, table(rows), args.out, f"layer_speed_{device.type}_{args.dtype}{variant}.json")
    return payload


def table(rows: list[dict]) -> str:
    columns = [
        ("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"), ("params", "params", ","),
        ("ms", "ms", ".1f"), ("µs/step", "us_per_step", ".0f"), ("tokens/s", "tokens_per_s", ",.0f"),
        ("GFLOP/s", "gflops", ".1f"), ("% peak", "fraction_of_peak", ".0%"), ("speedup", "speedup", ".2f"),
        ("theory", "theoretical_speedup", ".2f"), ("ratio", "speedup_ratio", ".0%"),
    ]
    if any("packed_cost" in row for row in rows):
        columns.append(("vs full", "packed_cost", ".2f"))
    if any(row.get("compile_s") is not None for row in rows):
        columns.append(("compile s", "compile_s", ".1f"))
    return _timing.markdown_table(rows, columns)


if __name__ == "__main__":
    main()
