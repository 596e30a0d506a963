"""The GPU check (issue #25): one command that tests and times factorlm's CUDA path on a lent GPU.

    python3 benchmarks/gpu_check.py --out $OUT            # on the GPU machine: at most ~8 minutes on an H100
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gc   # every part at toy sizes, on the CPU if no GPU

Parts, each in its own subprocess under its own time limit (a part that fails or runs out of time is
recorded, with the tail of its traceback or output, and the next part runs):

    cuda_tests      pytest -m cuda tests/test_cuda.py: every cell against its float64 reference on the
                    GPU, forward and backward, impl triton and torch, fp64 / fp32 / bf16 autocast
    doctor          factorlm doctor: which time loop runs where, and every loop against the reference
    layer_speed     one layer, forward + backward, T = 20, at p = 1024, n = 8192, B = 32 and 128 and at
                    p = 256, n = 2048, B = 128 (benchmarks/layer_speed.py's measure_shape, torch.nn.LSTM,
                    i.e. cuDNN, in the same run), fp32 and bf16 autocast: per-step time, the share of the
                    theoretical speedup reached, the share of the bf16 matmul peak measured here
    lm_step         the paper's training step at full size (vocabulary 793,470, sampled softmax 8192,
                    batch 128, T = 20) for BIGLSTM / F512 / G4 / G8 (benchmarks/lm_throughput.py's
                    measure): words/s over 30 steps after warm-up, fp32 and bf16 autocast, and a
                    torch.profiler table of the slowest model's step
    launch_overhead the recurrence's forward (no grad) per step: eager; the kernels' own time from the
                    profiler (wall − kernels = what launches cost); the whole T-step forward captured
                    once as a CUDA graph and replayed

Everything goes into ``--out`` (default $OUT): gpu_check.json (all figures, each part's status),
gpu_check.md (the same as tables), gpu_check.log (every part's output). Both summaries are rewritten
after each part, so a run stopped from outside keeps what finished. At most 8 files come back from
a lent machine: the parts write theirs in a temporary folder and only these three land in --out.

``--dry-run`` shrinks every size, repeat count and time limit so that the whole script runs on a
CPU in about a minute: what needs CUDA (the tests' bodies, Triton, CUDA graphs, device kernel
times) is skipped and the reason recorded. Every part runs with FACTORLM_NO_EXTENSION=1 (see
NO_EXTENSION). ``--parts`` runs some parts only (a rerun of one that failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(ROOT))

import _timing  # noqa: E402
import layer_speed  # noqa: E402
import lm_throughput  # noqa: E402

#: characters of a traceback or of a part's output kept when it fails
TAIL = 3000
#: set for every part: the CPU's C++ recurrence is not built (a minute of compiling on the lent
#: machine's clock, and nothing measured on the GPU uses it); the doctor reports it as disabled
NO_EXTENSION = {"FACTORLM_NO_EXTENSION": "1"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size and count the parts use: FULL on the GPU, DRY for --dry-run."""

    layer_shapes: tuple[tuple[int, int, int], ...]  # (p, n, B), T = layer_speed.STEPS
    layer_warmup: int
    layer_repeats: int
    peak_size: int  # the square matmul whose rate is the peak
    lm: dict  # lm_throughput's arguments
    lm_models: tuple[str, ...]
    lm_profile_steps: int
    launch_shapes: tuple[tuple[int, int, int], ...]  # (p, n, B)
    launch_steps: int  # T
    launch_repeats: int


FULL = Sizes(
    layer_shapes=((1024, 8192, 32), (1024, 8192, 128), (256, 2048, 128)),
    layer_warmup=3, layer_repeats=10, peak_size=8192,
    lm=dict(hidden_size=8192, proj_size=1024, batch_size=128, vocab_size=793_470, num_sampled=8192, steps=20,
            warmup=3, repeats=30, dense_gradients=False),
    lm_models=("biglstm", "biglstm-f512", "biglstm-g4", "biglstm-g8"), lm_profile_steps=2,
    launch_shapes=((256, 2048, 32), (1024, 8192, 32)), launch_steps=20, launch_repeats=20,
)
DRY = Sizes(
    layer_shapes=((16, 64, 4),), layer_warmup=1, layer_repeats=2, peak_size=256,
    lm=dict(hidden_size=64, proj_size=16, batch_size=4, vocab_size=1000, num_sampled=32, steps=5, warmup=1,
            repeats=2, dense_gradients=False),
    lm_models=("biglstm", "biglstm-f512", "biglstm-g4", "biglstm-g8"), lm_profile_steps=1,
    launch_shapes=((16, 64, 4),), launch_steps=5, launch_repeats=3,
)

#: name -> label, the precisions every timed part runs: the layers' own float32, and float32
#: parameters under bf16 autocast (how mixed-precision training runs them)
PRECISIONS = {"fp32": None, "bf16-autocast": torch.bfloat16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def triton_note(dev: torch.device) -> str | None:
    """Why the Triton cells are not what the factorlm layers run here, or None when they are."""
    from factorlm.ops import _triton_cells

    if dev.type != "cuda":
        return "skipped: no CUDA device, so the Triton cells do not run (the layers use the C++ or PyTorch loop)"
    if not _triton_cells.available():
        return "Triton is not installed: the layers use the PyTorch loop on CUDA"
    return None


class Recorder:
    """A part's results, written to its JSON file at every change: a part killed at its time limit
    still leaves what it had finished."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def append(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        self.flush()

    def flush(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str))
        temporary.replace(self.path)


def tail(text: str, limit: int = TAIL) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def record_failure(rec: Recorder, what: str, **context) -> None:
    """One failed item of a part (a shape, a model) in rec["errors"], with its traceback's tail; the
    part carries on with the next item."""
    rec.append("errors", {"what": what, **context, "traceback": tail(traceback.format_exc())})
    print(f"  {what}: FAILED ({traceback.format_exc().strip().splitlines()[-1]})", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ parts
def part_cuda_tests(rec: Recorder, sizes: Sizes, dry: bool) -> None:
    """pytest -m cuda on tests/test_cuda.py; counts, failures and skip reasons from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs",
                   "-p", "no:cacheprovider", f"--junitxml={junit}"]
        rec["command"] = " ".join(command[1:])
        sys.stdout.flush()
        # pytest writes straight into this part's log: if the part is killed at its limit, the log
        # still shows how far it got (the JUnit file is only written at the end)
        result = subprocess.run(command, cwd=ROOT)
        rec["exit_code"] = result.returncode
        if junit.exists():
            counts, failures, skips = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}, [], {}
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                counts["tests"] += 1
                for kind in ("failure", "error", "skipped"):
                    found = case.find(kind)
                    if found is None:
                        continue
                    counts["failures" if kind == "failure" else "errors" if kind == "error" else "skipped"] += 1
                    message = found.get("message") or ""
                    if kind == "skipped":
                        skips[message] = skips.get(message, 0) + 1
                    else:
                        failures.append({"test": case.get("name"), "message": tail(message, 600),
                                         "detail": tail(found.text or "", 1500)})
            rec["counts"], rec["failures"], rec["skip_reasons"] = counts, failures[:30], skips
            rec["summary"] = (f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
                              f"{counts['skipped']} skipped")
        if result.returncode not in (0, 5):  # 5: nothing collected (no CUDA tests selected)
            raise RuntimeError(f"pytest exited with {result.returncode} (the failures are listed above and in the log)")


def part_doctor(rec: Recorder, sizes: Sizes, dry: bool) -> None:
    """factorlm doctor's report."""
    result = subprocess.run([sys.executable, "-m", "factorlm", "doctor"], cwd=ROOT, capture_output=True, text=True)
    print(result.stdout, result.stderr, sep="\n", flush=True)
    rec["exit_code"] = result.returncode
    rec["report"] = tail(result.stdout, 6000)
    if result.returncode != 0:
        rec["stderr_tail"] = tail(result.stderr)
        raise RuntimeError(f"factorlm doctor exited with {result.returncode}: {tail(result.stderr, 800)}")


def matmul_peaks(dev: torch.device, size: int) -> dict:
    """TFLOP/s of one square torch.mm of ``size`` in bf16 and in float32 (TF32 off), the median of
    10 after 3 warm-ups, on random data (zeros run faster than real data)."""
    peaks = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if dev.type == "cpu" and dtype == torch.bfloat16 and not _timing.native_bf16():
            peaks[label] = None  # emulated bf16 on a CPU crawls; nothing to learn
            continue
        a, b = (torch.randn(size, size, device=dev, dtype=dtype) for _ in range(2))
        seconds, _ = _timing.median_seconds(lambda: torch.mm(a, b), dev, warmup=3, repeats=10)
        peaks[label] = 2.0 * size**3 / seconds / 1e12
        del a, b
    peaks["size"] = size
    return peaks


def exact_float32() -> None:
    """Float32 products in float32 everywhere (cuDNN's RNNs use TF32 by default, torch.mm does not): the
    fp32 comparison against torch.nn.LSTM is then like for like."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def part_layer_speed(rec: Recorder, sizes: Sizes, dry: bool) -> None:
    """layer_speed.measure_shape per shape and precision, with the bf16 matmul peak of this device."""
    dev = device()
    exact_float32()
    rec["device"] = str(dev)
    rec["triton"] = triton_note(dev) or "the factorlm layers run the Triton cells (impl='auto' on CUDA)"
    rec["tf32"] = False
    peaks = matmul_peaks(dev, sizes.peak_size)
    rec["matmul_peak_tflops"] = peaks
    print(f"matmul peak ({sizes.peak_size}³): {peaks}", flush=True)
    for precision, autocast in PRECISIONS.items():
        for p, n, batch in sizes.layer_shapes:
            what = f"p={p} n={n} B={batch} {precision}"
            print(f"layer speed {what} ...", flush=True)
            try:
                with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    rows = layer_speed.measure_shape(p, n, batch, dev, torch.float32, sizes.layer_warmup,
                                                     sizes.layer_repeats, modes=("isolated",))
            except Exception:  # noqa: BLE001 - recorded, and the next shape runs
                record_failure(rec, what, p=p, n=n, B=batch, precision=precision)
                free_memory()
                continue
            for row in rows:
                row["precision"] = precision
                row["share_of_bf16_peak"] = (row["gflops"] / 1e3 / peaks["bf16"]) if peaks.get("bf16") else None
                row["share_of_fp32_peak"] = row["gflops"] / 1e3 / peaks["fp32"]
                row.pop("ms_all", None), row.pop("isolated_ms_all", None)
                rec.append("rows", row)
            print(layer_table(rows), flush=True)
            free_memory()


def layer_table(rows: list[dict]) -> str:
    return _timing.markdown_table(rows, [
        ("precision", "precision", "s"), ("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"),
        ("µs/step", "us_per_step", ".0f"), ("tokens/s", "tokens_per_s", ",.0f"), ("speedup", "speedup", ".2f"),
        ("theory", "theoretical_speedup", ".2f"), ("share of theory", "speedup_ratio", ".0%"),
        ("GFLOP/s", "gflops", ",.0f"), ("share of bf16 peak", "share_of_bf16_peak", ".1%"),
    ])


def part_lm_step(rec: Recorder, sizes: Sizes, dry: bool) -> None:
    """lm_throughput.measure per preset and precision, each with a short profile; the slowest
    model's profile table is kept for the report."""
    dev = device()
    exact_float32()
    rec["device"] = str(dev)
    rec["triton"] = triton_note(dev) or "the factorlm layers run the Triton cells (impl='auto' on CUDA)"
    rec["tf32"] = False
    rec["sizes"] = sizes.lm
    args = argparse.Namespace(**sizes.lm)
    for precision, autocast in PRECISIONS.items():
        for name in sizes.lm_models:
            print(f"LM step {name} {precision} ...", flush=True)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row = lm_throughput.measure(name, args, dev, torch.Generator().manual_seed(0), autocast=autocast,
                                            profile_steps=sizes.lm_profile_steps)
            except Exception:  # noqa: BLE001 - recorded, and the next model runs
                record_failure(rec, f"{name} {precision}", model=name, precision=precision)
                free_memory()
                continue
            row["precision"] = precision
            row.pop("ms_all", None)
            if dev.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"  {row['words_per_s']:,.0f} words/s ({row['ms']:.0f} ms/step)", flush=True)
            rec.append("rows", row)
            free_memory()
    rows = rec.data.get("rows", [])
    for precision in PRECISIONS:  # only the slowest model's profile per precision is kept
        measured = [row for row in rows if row["precision"] == precision]
        if measured:
            slowest = min(measured, key=lambda row: row["words_per_s"])
            for row in measured:
                if row is not slowest:
                    row.pop("profile", None)
    rec["rows"] = rows


def part_launch_overhead(rec: Recorder, sizes: Sizes, dry: bool) -> None:
    """Per step of the forward recurrence (no grad): eager wall time, the kernels' own time, and a
    CUDA graph of the whole T-step forward replayed."""
    from factorlm.nn.registry import cell_class

    dev = device()
    exact_float32()
    cuda = dev.type == "cuda"
    rec["device"] = str(dev)
    if not cuda:
        rec["skipped"] = ("no CUDA device: CUDA graphs and device kernel times are skipped; only the eager "
                          "per-step time is measured")
    steps = sizes.launch_steps
    for p, n, batch in sizes.launch_shapes:
        for label, kind, args in (("torch.nn.LSTM", "torch", {}), (f"FLSTM r={n // 16}", "flstm", {"rank": n // 16}),
                                  ("GLSTM k=4", "glstm", {"groups": 4})):
            what = f"{label} p={p} n={n} B={batch}"
            print(f"launch overhead {what} ...", flush=True)
            try:
                with torch.device(dev):
                    layer = (torch.nn.LSTM(p, n, proj_size=p) if kind == "torch"
                             else cell_class(kind)(p, n, proj_size=p, **args))
                    x = torch.randn(steps, batch, p)
                rec.append("rows", launch_row(layer, x, dev, sizes.launch_repeats) | {
                    "layer": label, "p": p, "n": n, "B": batch, "T": steps})
            except Exception:  # noqa: BLE001 - recorded, and the next layer runs
                record_failure(rec, what)
            free_memory()


def launch_row(layer, x: torch.Tensor, dev: torch.device, repeats: int) -> dict:
    """Eager and graph-replayed forward times of ``layer`` on x (T, B, p), per step, in µs."""
    steps = x.shape[0]
    row: dict = {}
    with torch.no_grad():
        eager, _ = _timing.median_seconds(lambda: layer(x), dev, warmup=3, repeats=repeats)
        row["eager_us_per_step"] = eager * 1e6 / steps
        if dev.type != "cuda":
            return row
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.time_range.elapsed_us() for e in kernels)  # kernels, copies and sets
        row["kernels_per_step"] = len(kernels) / steps
        row["kernel_us_per_step"] = kernel_us / steps
        row["launch_gap_us_per_step"] = row["eager_us_per_step"] - row["kernel_us_per_step"]
        try:
            static_x = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(3):
                    layer(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out, _ = layer(static_x)
            graph.replay()
            torch.cuda.synchronize()
            expected, _ = layer(static_x)
            row["graph_max_difference"] = (static_out - expected).abs().max().item()
            replay, _ = _timing.median_seconds(graph.replay, dev, warmup=3, repeats=repeats)
            row["graph_us_per_step"] = replay * 1e6 / steps
            row["graph_speedup"] = eager / replay
        except Exception:  # noqa: BLE001 - the eager figures stand; why capture failed is kept
            row["graph_error"] = tail(traceback.format_exc(), 1200)
    return row


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    limit_s: int  # on the GPU
    dry_limit_s: int
    run: Callable[[Recorder, Sizes, bool], None]


#: in order; the limits add up to 480 s (8 minutes)
PARTS = (
    Part("cuda_tests", "CUDA tests (pytest -m cuda)", 160, 90, part_cuda_tests),
    Part("doctor", "factorlm doctor", 40, 60, part_doctor),
    Part("layer_speed", "Layer speed against cuDNN torch.nn.LSTM", 110, 60, part_layer_speed),
    Part("lm_step", "LM training step at the paper's size", 130, 60, part_lm_step),
    Part("launch_overhead", "Launch overhead of the recurrence, eager and CUDA graph", 40, 60,
         part_launch_overhead),
)
PARTS_BY_NAME = {part.name: part for part in PARTS}


# ------------------------------------------------------------------------------------------ driver
def environment() -> dict:
    """Device, driver, versions and the command, for the report's head."""
    info = _timing.machine_info(device())
    info["cuda_available"] = torch.cuda.is_available()
    info["environment_set"] = dict(NO_EXTENSION)
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = props.total_memory / 2**30
        info["multiprocessors"] = props.multi_processor_count
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["driver"] = f"unknown ({exc})"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def part_command(part: Part, result_path: Path, dry: bool) -> list[str]:
    """The command running ``part`` in its own process, its results recorded into ``result_path``."""
    return [sys.executable, str(Path(__file__).resolve()), "--part", part.name, "--result", str(result_path),
            *(["--dry-run"] if dry else [])]


def run_part(part: Part, dry: bool, scratch: Path, log) -> dict:
    """One part in its own subprocess (its own process group, killed whole at the limit); its
    status, time and whatever results it recorded."""
    limit = part.dry_limit_s if dry else part.limit_s
    result_path = scratch / f"{part.name}.json"
    output_path = scratch / f"{part.name}.log"
    command = part_command(part, result_path, dry)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **NO_EXTENSION, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    print(f"== {part.name}: {part.title} (limit {limit} s)", flush=True)
    start = time.monotonic()
    with open(output_path, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # pytest's or the doctor's children too
            process.wait()
            status = f"timed out after {limit} s"
    seconds = time.monotonic() - start
    text = output_path.read_text(errors="replace")
    log.write(f"\n===== {part.name} ({status}, {seconds:.0f} s) =====\n{text}")
    log.flush()
    try:
        results = json.loads(result_path.read_text()) if result_path.exists() else {}
    except json.JSONDecodeError:
        results = {}
    entry = {"title": part.title, "status": status, "seconds": round(seconds, 1), "limit_s": limit,
             "results": results}
    if status != "ok" and "error" not in results:
        entry["output_tail"] = tail(text)
    print(f"   {status} in {seconds:.0f} s", flush=True)
    return entry


def part_main(name: str, result: Path, dry: bool) -> int:
    """Inside a part's subprocess: run it, recording an exception's traceback before exiting 1."""
    rec = Recorder(result)
    rec["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        PARTS_BY_NAME[name].run(rec, DRY if dry else FULL, dry)
    except Exception:  # noqa: BLE001 - the driver reports it and runs the next part
        rec["error"] = tail(traceback.format_exc())
        traceback.print_exc()
        return 1
    return 0


def markdown(summary: dict) -> str:
    """gpu_check.md: the environment, each part's status, then its figures as tables."""
    env = summary["environment"]
    lines = ["# factorlm GPU check" + (" (dry run)" if summary["dry_run"] else ""), "",
             f"- device: {env.get('gpu', 'CPU: ' + str(env.get('Model name')))}; driver {env.get('driver', '–')}; "
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); "
             f"Triton {env.get('triton')}; Python {env.get('python')}",
             f"- command: `{summary['command']}`; commit {env.get('git_commit')}; started {summary['started']}",
             "", "| part | status | seconds | limit |", "|---|---|---|---|"]
    for name, entry in summary["parts"].items():
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.0f} | {entry['limit_s']} |")
    for name, entry in summary["parts"].items():
        results = entry["results"]
        lines += ["", f"## {entry['title']}", "", f"Status: {entry['status']}."]
        if name == "cuda_tests" and "counts" in results:
            lines.append(f"`{results.get('command')}`: {results['counts']}; {results.get('summary', '')}")
            for reason, count in results.get("skip_reasons", {}).items():
                lines.append(f"- skipped ({count}): {reason}")
            for failure in results.get("failures", []):
                lines += [f"- FAILED {failure['test']}: {failure['message']}"]
        if name == "doctor" and results.get("report"):
            lines += ["", "```", results["report"].strip(), "```"]
        if name == "layer_speed" and results.get("rows"):
            lines += [f"Matmul peak (TFLOP/s, {results['matmul_peak_tflops'].get('size')}³): "
                      f"bf16 {results['matmul_peak_tflops'].get('bf16')}, fp32 {results['matmul_peak_tflops'].get('fp32')}."
                      f" Triton: {results.get('triton')}.", "", layer_table(results["rows"])]
        if name == "lm_step" and results.get("rows"):
            rows = results["rows"]
            lines += ["", _timing.markdown_table(rows, [
                ("precision", "precision", "s"), ("model", "model", "s"), ("RNN params", "rnn_params", ","),
                ("ms/step", "ms", ".0f"), ("words/s", "words_per_s", ",.0f"), ("peak GiB", "peak_memory_gib", ".1f")])]
            for row in rows:
                if row.get("profile"):
                    lines += ["", f"Profile of the slowest, {row['model']} {row['precision']} "
                                  f"({row['ms']:.0f} ms/step):", "", "```", row["profile"].rstrip(), "```"]
        if name == "launch_overhead":
            if results.get("skipped"):
                lines.append(f"Skipped in part: {results['skipped']}")
            if results.get("rows"):
                lines += ["", _timing.markdown_table(results["rows"], [
                    ("layer", "layer", "s"), ("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"),
                    ("eager µs/step", "eager_us_per_step", ".1f"), ("kernels/step", "kernels_per_step", ".1f"),
                    ("kernel µs/step", "kernel_us_per_step", ".1f"), ("gap µs/step", "launch_gap_us_per_step", ".1f"),
                    ("graph µs/step", "graph_us_per_step", ".1f"), ("graph speedup", "graph_speedup", ".2f")])]
                lines += [f"- {row['layer']} p={row['p']}: graph capture failed: "
                          f"{row['graph_error'].strip().splitlines()[-1]}" for row in results["rows"]
                          if row.get("graph_error")]
        for error in results.get("errors", []):
            lines += ["", f"{error['what']} failed:", "```", error["traceback"].strip(), "```"]
        if results.get("error"):
            lines += ["", "```", results["error"].strip(), "```"]
        elif entry.get("output_tail"):
            lines += ["", "Output tail:", "```", entry["output_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the results (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes and short limits: a check of the script")
    parser.add_argument("--parts", default=",".join(PARTS_BY_NAME),
                        help=f"comma-separated parts to run, in order (default all: {','.join(PARTS_BY_NAME)})")
    parser.add_argument("--part", choices=sorted(PARTS_BY_NAME), help=argparse.SUPPRESS)  # inside a part's process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return part_main(args.part, args.result, args.dry_run)
    if not args.out:
        parser.error("--out DIR is required when $OUT is not set")
    names = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS_BY_NAME]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS_BY_NAME)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "gpu_check", "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
               "parts": {}}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch, open(out / "gpu_check.log", "w") as log:
        for name in names:
            summary["parts"][name] = run_part(PARTS_BY_NAME[name], args.dry_run, Path(scratch), log)
            summary["seconds"] = round(time.monotonic() - start, 1)
            _timing.write_json(out / "gpu_check.json", summary)
            (out / "gpu_check.md").write_text(markdown(summary))
    print((out / "gpu_check.md").read_text())
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, {out / 'gpu_check.log'} "
          f"in {summary['seconds']:.0f} s", flush=True)
    return 0 if all(entry["status"] == "ok" for entry in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
