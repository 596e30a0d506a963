"""Where the time of one training step goes: the recurrent layers, the softmax, the optimizer, the rest.

Builds the run exactly as ``factorlm train`` / ``factorlm compare`` do (a preset, optionally at the
paper family's ``--scale``), takes ``--warmup`` untimed steps, then profiles ``--steps`` steps with
torch.profiler: the heaviest operators by self time, and the recurrent layers' own calls (the
autograd Functions of the fast path, torch.lstm for the dense LSTM) by total time, children
included. Prints Markdown tables and writes JSON.

    python benchmarks/step_profile.py --preset biglstm --scale 1/8 --data ../shared/data/ptb
    python benchmarks/step_profile.py --preset biglstm-f512 --scale 1/8 --data ../shared/data/ptb
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.compare.family import parse_scale, scale_paper_model  # noqa: E402
from factorlm.configs import preset  # noqa: E402
from factorlm.data import open_corpus  # noqa: E402
from factorlm.train.loop import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="biglstm", help="a factorlm preset (default biglstm)")
    parser.add_argument("--scale", type=parse_scale, default=None, help="the paper family's scale, e.g. 1/8")
    parser.add_argument("--data", default=None, help="corpus directory (default: the built-in corpus)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (default 10)")
    parser.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_profile_<preset>.json)")
    args = parser.parse_args(argv)
    model_config, train_config = preset(args.preset)
    if args.scale is not None:
        model_config = scale_paper_model(model_config, args.scale)
    if args.batch_size:
        train_config = train_config.replace(batch_size=args.batch_size)
    train_config = train_config.replace(max_steps=args.warmup + args.steps, max_time=None, epochs=None)
    corpus = open_corpus(args.data)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model_config, train_config, corpus, run_dir, device="cpu", show_progress=False)
        trainer.model.train()
        batches = trainer.batcher.epoch_batches(0)
        for _ in range(args.warmup):
            trainer.train_step(next(batches))
        step_times = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                batch = next(batches)
                start = time.perf_counter()
                trainer.train_step(batch)
                step_times.append(time.perf_counter() - start)
    step = statistics.median(step_times)
    tokens = train_config.batch_size * train_config.num_steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) or 1
    rows = [{"operator": e.key, "self ms/step": e.self_cpu_time_total / 1e3 / args.steps,
             "share": e.self_cpu_time_total / total_self, "calls/step": e.count / args.steps}
            for e in events[: args.top]]
    layers = [{"call": e.key, "total ms/step": e.cpu_time_total / 1e3 / args.steps,
               "share of step": e.cpu_time_total / 1e3 / args.steps / (step * 1e3)}
              for e in events if "LSTMFunction" in e.key or e.key in ("aten::lstm", "aten::_thnn_fused_lstm_cell")]
    layers.sort(key=lambda r: r["total ms/step"], reverse=True)
    print(f"{args.preset} (scale {args.scale or 1}): {step * 1e3:.0f} ms/step (median of {args.steps}), "
          f"{tokens / step:,.0f} words/s")
    print(_timing.markdown_table(rows, [("operator", "operator", "s"), ("self ms/step", "self ms/step", ".1f"),
                                        ("share", "share", ".0%"), ("calls/step", "calls/step", ".0f")]))
    print()
    print(_timing.markdown_table(layers, [("recurrent layer call", "call", "s"), ("total ms/step", "total ms/step", ".1f"),
                                          ("share of step", "share of step", ".0%")]))
    payload = {"benchmark": "step_profile", "machine": _timing.machine_info(torch.device("cpu")),
               "preset": args.preset, "scale": args.scale, "model": model_config.to_dict(),
               "batch_size": train_config.batch_size, "num_steps": train_config.num_steps,
               "ms_per_step": step * 1e3, "ms_all": [t * 1e3 for t in step_times], "words_per_s": tokens / step,
               "operators": rows, "recurrent_calls": layers}
    out = args.out or Path(__file__).resolve().parent / "results" / f"step_profile_{args.preset}.json"
    _timing.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
