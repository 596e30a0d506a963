"""onnxruntime against PyTorch on the same language model: the paper's family exported with ``factorlm.export``.

For each model (BIGLSTM / F512 / G2 / G4 / G8 at ``--scale`` of the paper's sizes, ``--vocab`` words, full
softmax, untrained random weights, which cost the same as trained ones): the ONNX file's size, the export's
seconds, and tokens/s of the whole model (embedding, both layers, the full log-softmax) in two regimes,
each in PyTorch (eval, ``torch.inference_mode()``, the layers' fast path) and in onnxruntime (CPU, float32,
``--threads`` intra-op threads, as torch's):

    batch 1   token by token (T = 1 per call, the state carried), as generation runs
    batch 32  chunks of T = 20, the state carried, as evaluation runs

Each number is the median of ``--repeats`` timed runs of ``--steps`` calls after one warm-up; the max
|log p| difference between the two over the same calls is reported too. ``--quick`` is a smoke run
(tiny sizes, 3 repeats): its numbers mean nothing.

    python benchmarks/onnx_speed.py --lock /tmp/factorlm-cpu.lock
    python benchmarks/onnx_speed.py --scale 1/4 --models biglstm biglstm-f512 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.compare.family import parse_scale, scale_paper_model  # noqa: E402
from factorlm.configs import PAPER_PRESETS, model_preset  # noqa: E402
from factorlm.export import to_onnx  # noqa: E402
from factorlm.export.runtime import onnx_session  # noqa: E402
from factorlm.models.lm import LanguageModel  # noqa: E402
from factorlm.validate import check_int  # noqa: E402

#: (label, batch, T per call)
REGIMES = (("batch 1, T = 1", 1, 1), ("batch 32, T = 20", 32, 20))


def measure(name: str, scale: float, vocab: int, steps: int, repeats: int, threads: int, directory: Path) -> dict:
    config = scale_paper_model(model_preset(name), scale).replace(vocab_size=vocab, num_sampled=0)
    model = LanguageModel(config).eval()
    path = directory / f"{name}.onnx"
    start = time.perf_counter()
    to_onnx(model, path)
    row = {"model": name, "scale": scale, "vocab": vocab, "proj_size": config.proj_size,
           "hidden_size": config.hidden_size, "cell": config.cell, "cell_args": dict(config.cell_args),
           "export_s": time.perf_counter() - start, "onnx_mb": path.stat().st_size / 2**20}
    session = onnx_session(path, threads=threads)
    worst = 0.0
    for label, batch, length in REGIMES:
        tokens = torch.randint(0, vocab, (steps, length, batch))
        results = {}

        def run_torch():
            state = model.init_state(batch)
            for t in tokens:
                hidden, state = model(t, state)
                results["torch"] = model.log_probs(hidden)

        def run_onnx():
            h, c = (s.numpy() for s in model.init_state(batch))
            for t in tokens:
                log_probs, h, c = session.run(None, {"tokens": t.numpy(), "h_0": h, "c_0": c})
            results["onnx"] = log_probs

        with torch.inference_mode():
            seconds_torch, _ = _timing.median_seconds(run_torch, torch.device("cpu"), warmup=1, repeats=repeats)
        seconds_onnx, _ = _timing.median_seconds(run_onnx, torch.device("cpu"), warmup=1, repeats=repeats)
        worst = max(worst, (results["torch"] - torch.from_numpy(results["onnx"])).abs().max().item())
        words = steps * length * batch
        key = "b1" if batch == 1 else "b32"
        row[f"torch_{key}"] = words / seconds_torch
        row[f"onnx_{key}"] = words / seconds_onnx
        row[f"ratio_{key}"] = seconds_torch / seconds_onnx
    row["max_abs_diff"] = worst
    return row


def table(rows: list[dict]) -> str:
    columns = [
        ("model", "model", "s"), ("p", "proj_size", "d"), ("n", "hidden_size", "d"), ("vocab", "vocab", ","),
        ("ONNX MB", "onnx_mb", ".1f"), ("export s", "export_s", ".1f"),
        ("b1 torch tok/s", "torch_b1", ",.0f"), ("b1 ORT tok/s", "onnx_b1", ",.0f"),
        ("b1 ORT/torch", "ratio_b1", ".2f"),
        ("b32 torch tok/s", "torch_b32", ",.0f"), ("b32 ORT tok/s", "onnx_b32", ",.0f"),
        ("b32 ORT/torch", "ratio_b32", ".2f"), ("max Δ log p", "max_abs_diff", ".1e"),
    ]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="1/8", help="fraction of the paper's sizes (default 1/8)")
    parser.add_argument("--vocab", type=int, default=10_000, help="vocabulary size, full softmax (default 10,000)")
    parser.add_argument("--steps", type=int, default=50, help="calls per timed run (default 50)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per regime, median reported (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime alike (default 1)")
    parser.add_argument("--models", nargs="+", choices=list(PAPER_PRESETS), default=list(PAPER_PRESETS))
    parser.add_argument("--quick", action="store_true", help="smoke run: scale 1/64, vocab 500, 3 repeats of 3 calls")
    parser.add_argument("--lock", default=None, help="hold this file lock while timing each model")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/onnx_speed.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.vocab, args.steps, args.repeats = "1/64", 500, 3, 3
    try:
        scale = parse_scale(args.scale)
        check_int("--vocab", args.vocab, 2)
        check_int("--steps", args.steps)
        check_int("--threads", args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats < 10 and not args.quick:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            print(f"measuring {name} at scale {args.scale} ...", file=sys.stderr, flush=True)
            with _timing.maybe_locked(args.lock):
                rows.append(measure(name, scale, args.vocab, args.steps, args.repeats, args.threads, Path(directory)))
    payload = {"benchmark": "onnx_speed", "machine": _timing.machine_info(torch.device("cpu")), "threads": args.threads,
               "steps": args.steps, "repeats": args.repeats, "quick": args.quick, "rows": rows}
    _timing.report(payload, table(rows), args.out, "onnx_speed.json")
    return payload


if __name__ == "__main__":
    main()
