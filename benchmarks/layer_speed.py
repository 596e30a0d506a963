"""Forward+backward throughput of one recurrent layer: torch.nn.LSTM vs factorlm LSTM / FLSTM / GLSTM.

For each shape (p, n, B) with T = 20, input size = proj_size = p, every layer runs
``output = layer(x); output.backward(grad)`` on the same inputs; the median of >= 10 timed runs
after warm-up is reported with tokens/s, achieved GFLOP/s (FLOPs = 2·MACs, fwd+bwd = 3× fwd, MACs
from layer.macs_per_token()), the speedup over torch.nn.LSTM measured in the same run, the
theoretical speedup (dense MACs / the layer's MACs) and their ratio. The machine's matmul peak is
measured in the same run for reference.

``--mode`` chooses how a layer is timed. "isolated": its calls back to back, the layer alone on
the machine. "interleaved": as a model runs it, each repeat calls every layer once, in turn,
with a dense torch.nn.LSTM's forward + backward (untimed) before each, so a layer meets caches,
allocator and page tables as other work left them. "both" (the default) reports both, side by
side, each with its speedup over torch.nn.LSTM timed the same way in the same run.

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
import functools
import resource
import statistics
import sys
import time
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
#: --mode -> the timings taken, the first one also under the rows' plain keys (ms, speedup, ...)
MODES = {"isolated": ("isolated",), "interleaved": ("interleaved",), "both": ("isolated", "interleaved")}


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
        # F-LSTM r=n/16's parameters and multiply-adds, in 4 groups of that rank each
        (f"GFLSTM k=4 r={n // 16}", dict(kind="gflstm", groups=4, rank=n // 16)),
        ("diagonal", dict(kind="diagonal")),
        # b = 8: the dense method at every grid shape; b = 32: the FFT method from 2^20 gate entries on
        ("circulant b=8", dict(kind="circulant", block=8)),
        ("circulant b=32", dict(kind="circulant", block=32)),
        ("LSTM cifg", dict(kind="lstm", coupled_gates=True)),
        # shared gates run the materialised 4n-row weights (LSTMBase): the dense cost against a quarter
        # of its multiply-adds in the count, so a ratio near 1/4 is the expected, honest result
        ("LSTM shared", dict(kind="lstm", shared_gates=True)),
        (f"FLSTM r={n // 8} shared", dict(kind="flstm", rank=n // 8, shared_gates=True)),
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


def chosen(label: str, only: list[str] | None) -> bool:
    """Whether --layers keeps the layer ``label``: every layer without the option; else torch.nn.LSTM
    (every ratio's baseline) and the labels starting with one of ``only`` ("GLSTM" keeps k=2, 4, 8)."""
    return not only or label == "torch.nn.LSTM" or any(label.startswith(prefix) for prefix in only)


def built_layers(p: int, n: int, device, dtype, bidirectional: bool = False, only: list[str] | None = None):
    """(label, spec, layer) for each layer of :func:`layer_specs` that sizes p, n allow and --layers
    keeps (:func:`chosen`); a layer whose structure cannot take the sizes (circulant b=32 at p=8) is
    left out with a line on stderr saying why."""
    for label, spec in layer_specs(n):
        if not chosen(label, only):
            continue
        try:
            layer = build(spec, p, n, device, dtype, bidirectional)
        except ValueError as exc:
            print(f"  {label}: left out at p={p} n={n}: {exc}", file=sys.stderr)
            continue
        yield label, spec, layer


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


def interleaved_seconds(steps: list, neighbour, device, warmup: int, repeats: int) -> list[tuple[float, list[float]]]:
    """Per layer, (median seconds, every time) of ``steps[i]()`` when the layers run as a model runs
    them: each repeat calls every layer once, in turn, with ``neighbour()`` (a dense layer's
    forward + backward, untimed) before each. A layer then finds the caches, the allocator's free
    lists and the page tables as its neighbours left them, not as its own previous call did."""
    times: list[list[float]] = [[] for _ in steps]
    for repeat in range(warmup + repeats):
        for i, step in enumerate(steps):
            neighbour()
            _timing.synchronize(device)
            start = time.perf_counter()
            step()
            _timing.synchronize(device)
            if repeat >= warmup:
                times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), t) for t in times]


class FaultCounter:
    """Wraps a step to count the minor page faults of each call (getrusage, this process, every
    thread): a fresh buffer's first touch faults once per page, which is how a layer's time comes
    to depend on what ran before it. ``median(last)`` is the median over the last calls."""

    def __init__(self, fn):
        self.fn, self.counts = fn, []

    def __call__(self):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.fn()
        self.counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def median(self, last: int) -> float:
        return statistics.median(self.counts[-last:])


def measure_shape(p: int, n: int, batch: int, device, dtype, warmup: int, repeats: int,
                  bidirectional: bool = False, packed: bool = False, compile: bool = False,
                  modes: tuple[str, ...] = ("isolated",), only: list[str] | None = None) -> list[dict]:
    """One row per layer of :func:`layer_specs`: isolated (the layer's calls back to back) and/or
    interleaved (:func:`interleaved_seconds`) timings, each with its speedup over torch.nn.LSTM in
    the same mode and run. The row's plain keys (ms, speedup, ratio, ...) are the first mode's."""
    with torch.device("meta"):  # only the MAC count is needed: allocate nothing
        dense_macs = fnn.LSTM(p, n, proj_size=p, bidirectional=bidirectional).macs_per_token()
    inputs = Inputs(p, batch, device, dtype, packed, output_size=p * (2 if bidirectional else 1))
    rows, layers = [], []
    for label, spec, layer in built_layers(p, n, device, dtype, bidirectional, only):
        macs = dense_macs if spec["kind"] == "torch" else layer.macs_per_token()
        compile_seconds = None
        if compile:
            torch._dynamo.reset()  # each layer compiled afresh, never hitting the recompile limit
            layer = torch.compile(layer)
            compile_seconds, _ = _timing.median_seconds(lambda: inputs.step(layer), device, warmup=0, repeats=1)
        rows.append({
            "p": p, "n": n, "B": batch, "T": STEPS, "layer": label,
            "bidirectional": bidirectional, "input": "packed" if packed else "full", "compile_s": compile_seconds,
            "params": fnn.count_parameters(layer), "macs_per_token": macs,
            "theoretical_speedup": dense_macs / macs,
        })
        layers.append(layer)
        if "isolated" in modes:
            step = FaultCounter(functools.partial(inputs.step, layer))
            seconds, times = _timing.median_seconds(step, device, warmup=warmup, repeats=repeats)
            _fill(rows[-1], "isolated", seconds, times, inputs.tokens, step.median(repeats))
            if packed:  # the same layer on the full batch: what a packed token costs against a full one
                full_seconds, _ = _timing.median_seconds(lambda: inputs.step(layer, full=True), device,
                                                         warmup=warmup, repeats=repeats)
                rows[-1]["ms_full"] = full_seconds * 1e3
                rows[-1]["packed_cost"] = (seconds / inputs.tokens) / (full_seconds / (STEPS * batch))
    if "interleaved" in modes:
        neighbour = build(dict(kind="torch"), p, n, device, dtype, bidirectional)
        steps = [FaultCounter(functools.partial(inputs.step, layer)) for layer in layers]
        for row, step, (seconds, times) in zip(rows, steps, interleaved_seconds(
                steps, lambda: inputs.step(neighbour), device, warmup, repeats)):
            _fill(row, "interleaved", seconds, times, inputs.tokens, step.median(repeats))
    for mode in modes:
        baseline = rows[0][f"{mode}_seconds"]
        for row in rows:
            row[f"{mode}_speedup"] = baseline / row[f"{mode}_seconds"]
            row[f"{mode}_ratio"] = row[f"{mode}_speedup"] / row["theoretical_speedup"]
    for row in rows:  # the first mode under the plain keys every reader of these files knows
        first = modes[0]
        row["mode"] = first
        row["ms"], row["ms_all"] = row[f"{first}_ms"], row[f"{first}_ms_all"]
        seconds = row[f"{first}_seconds"]
        row["us_per_step"] = seconds * 1e6 / STEPS
        row["tokens_per_s"] = inputs.tokens / seconds
        row["gflops"] = 3 * 2 * row["macs_per_token"] * inputs.tokens / seconds / 1e9
        row["speedup"], row["speedup_ratio"] = row[f"{first}_speedup"], row[f"{first}_ratio"]
    return rows


def _fill(row: dict, mode: str, seconds: float, times: list[float], tokens: int, faults: float) -> None:
    row[f"{mode}_seconds"] = seconds
    row[f"{mode}_faults"] = faults
    row[f"{mode}_ms"] = seconds * 1e3
    row[f"{mode}_ms_all"] = [t * 1e3 for t in times]
    row[f"{mode}_tokens_per_s"] = tokens / seconds


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
    parser.add_argument("--layers", type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                        default=None, help="only the layers whose labels start with one of these, comma-separated "
                                           "(e.g. 'GLSTM,FLSTM'); torch.nn.LSTM always runs, the ratios' baseline")


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
    parser.add_argument("--mode", choices=sorted(MODES), default="both",
                        help="isolated: each layer's calls back to back; interleaved: every layer once per repeat, "
                             "in turn, a dense layer run between, as a model runs them; both (default)")
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
                                       bidirectional=args.bidirectional, packed=args.packed, compile=args.compile,
                                       modes=MODES[args.mode], only=args.layers)
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
        "modes": list(MODES[args.mode]),
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
    if rows and rows[0].get("mode") == "isolated" and "interleaved_ms" in rows[0]:
        columns += [("interleaved ms", "interleaved_ms", ".1f"), ("interleaved speedup", "interleaved_speedup", ".2f"),
                    ("interleaved ratio", "interleaved_ratio", ".0%"), ("faults", "isolated_faults", ",.0f"),
                    ("interleaved faults", "interleaved_faults", ",.0f")]
    elif rows and rows[0].get("mode") == "interleaved":
        columns[5] = ("interleaved ms", "ms", ".1f")
        columns.append(("faults", "interleaved_faults", ",.0f"))
    elif rows and "isolated_faults" in rows[0]:
        columns.append(("faults", "isolated_faults", ",.0f"))
    if any("packed_cost" in row for row in rows):
        columns.append(("vs full", "packed_cost", ".2f"))
    if any(row.get("compile_s") is not None for row in rows):
        columns.append(("compile s", "compile_s", ".1f"))
    return _timing.markdown_table(rows, columns)


if __name__ == "__main__":
    main()
