"""The layers' speedups under each CPU instruction set, side by side (the table issue #10 asks for).

Runs ``layer_speed.py`` (forward + backward) and, with ``--inference``, ``inference_speed.py``
(forward only and batch-1 tokens) once per instruction set, each in a child process whose
environment restricts PyTorch's kernels, the extension's build flags (they follow
``torch.backends.cpu.get_cpu_capability()``), MKL and oneDNN to that set (:data:`ISAS`). One child
at a time: two benchmark processes on the same cores distort each other 5-100×. The children's
own tables stream as they run; then one table puts each layer's speedup over torch.nn.LSTM (and
its ratio to the theoretical speedup) under every set next to each other. A restriction can only
lower the set, so sets above this CPU's are skipped, saying so.

Each child's ``cpu_capability`` is checked against the set it was asked for; a mismatch (an
environment variable the build ignored) is flagged in the table. MKL may ignore
``MKL_ENABLE_INSTRUCTIONS`` (it did on an AMD EPYC, whose torch.matmul peak stayed the same): the
matmul peak printed per set shows whether it did.

    python benchmarks/isa_compare.py --shape 512,2048,128 --shape 256,2048,128 --shape 64,256,32
    python benchmarks/isa_compare.py --quick --inference --isa avx2 --isa default
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402
from layer_speed import parse_shape  # noqa: E402

from factorlm.machine import ISA_ENV  # noqa: E402

HERE = Path(__file__).resolve().parent

#: name -> (the capability PyTorch then reports, the environment that restricts everything to it:
#: a value for each of factorlm.machine.ISA_ENV)
ISAS = {
    "avx512": ("AVX512", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                          "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    "avx2": ("AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    "default": ("DEFAULT", {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                            "ONEDNN_MAX_CPU_ISA": "SSE41"}),
}
#: x86 capabilities from the widest down; a restriction can only move down this list
RANK = ["AVX512", "AVX2", "DEFAULT"]


def unrestricted_env() -> dict[str, str]:
    """This process's environment without any of the variables that restrict the instruction set."""
    return {k: v for k, v in os.environ.items() if k not in ISA_ENV}


def native_capability() -> str:
    """This CPU's capability as PyTorch detects it without restrictions (asked in a clean child,
    since this process may itself run under a restricting environment)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=unrestricted_env(), capture_output=True, text=True,
                          check=True).stdout.strip()


def runnable(isa: str, native: str) -> str | None:
    """None if ``isa`` can run on a CPU whose capability is ``native``, else why not."""
    wanted = ISAS[isa][0]
    if native not in RANK:  # not x86 (e.g. ARM's SVE256): only the portable baseline can be forced
        return None if wanted == "DEFAULT" else f"this CPU is {native}, not x86"
    if RANK.index(wanted) < RANK.index(native):
        return f"this CPU has {native} only; a restriction can only lower the instruction set"
    return None


def run_child(script: str, isa: str, forwarded: list[str], out: Path) -> dict:
    """Run ``benchmarks/<script>`` under ``isa``'s environment (its output streams through), and
    return the JSON it wrote."""
    env = unrestricted_env() | ISAS[isa][1]
    command = [sys.executable, str(HERE / script), *forwarded, "--out", str(out)]
    restriction = " ".join(f"{k}={v}" for k, v in ISAS[isa][1].items())
    print(f"\n=== {isa}: {restriction} {Path(sys.executable).name} {' '.join(command[1:])}", flush=True)
    subprocess.run(command, env=env, check=True)
    return json.loads(out.read_text())


def side_by_side(runs: dict[str, dict], cell) -> list[dict]:
    """One row per (p, n, B, layer) in the first run's order, with ``cell(row)`` under each set."""
    rows: dict[tuple, dict] = {}
    for isa, payload in runs.items():
        for row in payload["rows"]:
            key = (row["p"], row["n"], row["B"], row["layer"])
            merged = rows.setdefault(key, {"p": row["p"], "n": row["n"], "B": row["B"], "layer": row["layer"],
                                           "theory": row["theoretical_speedup"]})
            merged[isa] = cell(row)
    return list(rows.values())


def training_cell(row: dict, mode: str | None = None) -> str:
    """Speedup (ratio to theory) of the row's first mode, or of ``mode`` ("isolated",
    "interleaved"; layer_speed.py --mode) where the row has it ("–" where not)."""
    if mode is None:
        return f"{row['speedup']:.2f}× ({row['speedup_ratio']:.0%})"
    if f"{mode}_speedup" not in row:
        return "–"
    return f"{row[f'{mode}_speedup']:.2f}× ({row[f'{mode}_ratio']:.0%})"


def training_modes(runs: dict[str, dict]) -> list[str | None]:
    """The timing modes every run reported (layer_speed.py --mode), [None] for runs older than the modes."""
    modes = [run.get("modes") for run in runs.values()]
    return list(modes[0]) if modes and all(m == modes[0] for m in modes) and modes[0] else [None]


def inference_cell(row: dict) -> str:
    return f"{row['forward_speedup']:.2f}× / {row['batch1_speedup']:.2f}×"


def heading(isa: str, payload: dict) -> str:
    """What the set's run really got: the capability PyTorch reported and the matmul peak."""
    got, wanted = payload["machine"].get("cpu_capability"), ISAS[isa][0]
    flag = "" if got == wanted else f" **(asked for {wanted}: the restriction did not take)**"
    peak = payload.get("matmul_peak_gflops", {}).get("torch.matmul")
    peak_text = f", torch.matmul peak {peak:.0f} GFLOP/s" if peak else ""
    return f"- {isa}: get_cpu_capability() = {got}{flag}{peak_text}, C++ extension: {payload.get('c++ extension')}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", action="append", choices=sorted(ISAS),
                        help="instruction set to run under (repeatable; default: every one this CPU has)")
    parser.add_argument("--shape", type=parse_shape, action="append", help="p,n,B (repeatable), passed on")
    parser.add_argument("--quick", action="store_true", help="the children's --quick grids")
    parser.add_argument("--inference", action="store_true", help="also run inference_speed.py under each set")
    parser.add_argument("--layers", default=None, help="passed on: only the layers whose labels start with one of "
                                                       "these, comma-separated (torch.nn.LSTM always runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per layer in each child (default 10)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/isa_compare_cpu.json)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")

    native = native_capability()
    wanted = args.isa or list(ISAS)
    isas = []
    for isa in dict.fromkeys(wanted):
        why = runnable(isa, native)
        if why:
            print(f"skipping {isa}: {why}", file=sys.stderr)
        else:
            isas.append(isa)
    if not isas:
        parser.error(f"none of {', '.join(wanted)} can run on this CPU ({native})")

    forwarded = [f"--shape={p},{n},{b}" for p, n, b in args.shape or []]
    forwarded += ["--quick"] if args.quick else []
    forwarded += ["--repeats", str(args.repeats)]
    forwarded += ["--layers", args.layers] if args.layers else []
    training, inference = {}, {}
    with tempfile.TemporaryDirectory(prefix="isa_compare_") as tmp:
        for isa in isas:
            training[isa] = run_child("layer_speed.py", isa, forwarded, Path(tmp) / f"layer_{isa}.json")
            if args.inference:
                inference[isa] = run_child("inference_speed.py", isa, forwarded, Path(tmp) / f"inference_{isa}.json")

    base = [("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"), ("theory", "theory", ".2f")]
    modes = training_modes(training)
    merged: list[dict] = []
    columns = list(base)
    for mode in modes:  # one column per (mode, set): isolated under each set, then interleaved under each
        label = f"{mode} " if mode else ""
        rows = side_by_side({f"{isa}|{mode}": training[isa] for isa in isas},
                            lambda row, mode=mode: training_cell(row, mode))
        merged = rows if not merged else [a | b for a, b in zip(merged, rows)]
        columns += [(f"{isa}: {label}speedup (ratio)", f"{isa}|{mode}", "s") for isa in isas]
    tables = ["Forward + backward, speedup over torch.nn.LSTM in the same run (ratio to theory); isolated: a "
              "layer's calls back to back, interleaved: every layer in turn with a dense layer between:", "",
              *[heading(isa, training[isa]) for isa in isas], "",
              _timing.markdown_table(merged, columns)]
    if args.inference:
        columns = base + [(f"{isa}: forward / batch-1", isa, "s") for isa in isas]
        tables += ["", "Inference, speedup over torch.nn.LSTM: forward only / batch-1 tokens:", "",
                   _timing.markdown_table(side_by_side(inference, inference_cell), columns)]
    payload = {
        "benchmark": "isa_compare",
        "machine": _timing.machine_info(torch.device("cpu")),
        "native_capability": native,
        "isas": {isa: {"capability": ISAS[isa][0], "environment": ISAS[isa][1], "layer_speed": training[isa],
                       **({"inference_speed": inference[isa]} if args.inference else {})} for isa in isas},
    }
    _timing.report(payload, "\n".join(tables), args.out, "isa_compare_cpu.json")
    return payload


if __name__ == "__main__":
    main()
