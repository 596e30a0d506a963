"""Words/s of `factorlm train` with 1 and N processes (torchrun, gloo on CPU or NCCL on GPUs), the time of
the gradient exchange per step, and the bytes the exchange moves: measured for the model trained here,
and computed for the paper's full model at 8 GPUs from the sizes the sparse exchange really sees.

Each configuration is a real training run (`python -m factorlm train` / `torchrun -m factorlm train`,
one thread per process) of --steps steps; words/s and exchange seconds are read from its metrics.jsonl
(the first record, which includes start-up and the C++ build check, is dropped), and the median over
--repeats runs is reported.

    python benchmarks/torchrun_scaling.py --preset biglstm --scale 1/16 --procs 1,2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.compare.family import parse_scale, scale_paper_model  # noqa: E402
from factorlm.configs import PAPER_PRESETS, preset  # noqa: E402
from factorlm.count import count_model  # noqa: E402

BYTES = 4  # fp32 gradients


def run_once(args, procs: int, out: Path) -> dict:
    """One training run with ``procs`` processes; its median words/s and exchange seconds per step."""
    config = {"preset": args.preset, "model": _model_overrides(args), "train": {"log_every": args.log_every}}
    config_path = out.with_suffix(".json")
    config_path.write_text(json.dumps(config))
    train = ["-m", "factorlm", "train", "--config", str(config_path), "--out", str(out), "--max-steps",
             str(args.steps), "--device", args.device, "--quiet", "--batch-size", str(args.batch_size)]
    if args.data:
        train += ["--data", args.data]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r["kind"] == "train"][1:]  # the first window includes start-up
    if not train_records:
        raise SystemExit(f"{out}: too few steps for a measurement after the first log window; raise --steps")
    return {
        "words_per_sec": statistics.median(r["words_per_sec"] for r in train_records),
        "exchange_seconds_per_step": statistics.median(r.get("exchange_seconds_per_step", 0.0) for r in train_records),
    }


def _model_overrides(args) -> dict:
    model = scale_paper_model(preset(args.preset)[0], args.scale) if args.preset in PAPER_PRESETS else preset(args.preset)[0]
    keys = ("embedding_size", "proj_size", "hidden_size", "num_sampled")
    return {**{k: getattr(model, k) for k in keys}, "cell_args": dict(model.cell_args)}


def exchange_bytes(name: str, *, batch: int, steps: int, world: int, vocab: int = 793_470) -> dict:
    """Bytes one rank sends and receives per step for the paper's model at full size (the scaling model).

    Dense gradients (the recurrent layers and the softmax bias): a ring all-reduce moves 2 (N-1)/N
    of the buffer through each rank. Sparse rows: each rank's touched rows (row ids int64 + p floats)
    are all-gathered, so each rank receives N - 1 other ranks' rows. Touched rows per rank: the
    distinct ids among the B·T inputs (embedding) and among the B·T targets plus the S candidates
    (softmax), counted on log-uniform (Zipf) ids, the distribution of word frequencies that the
    sampled softmax assumes.
    """
    config = preset(name)[0]
    counts = count_model(config)
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(2, steps * batch, generator=generator, dtype=torch.float64)
    ids = (torch.exp(u * math.log(vocab + 1)) - 1).long().clamp_(0, vocab - 1)
    candidates = (torch.exp(torch.rand(config.num_sampled * 2, generator=generator, dtype=torch.float64)
                            * math.log(vocab + 1)) - 1).long().clamp_(0, vocab - 1).unique()[: config.num_sampled]
    emb_rows = ids[0].unique().numel()
    softmax_rows = torch.cat([ids[1], candidates]).unique().numel()
    row_bytes = config.output_size * BYTES + 8
    dense_params = counts["rnn_params"] + vocab  # recurrent layers + softmax bias
    dense_ring = 2 * (world - 1) / world * dense_params * BYTES
    sparse_gather = (world - 1) * (emb_rows + softmax_rows) * row_bytes
    all_dense = 2 * (world - 1) / world * counts["total_params"] * BYTES
    return {"model": name, "world": world, "embedding_rows": emb_rows, "softmax_rows": softmax_rows,
            "dense_allreduce_bytes": dense_ring, "sparse_allgather_bytes": sparse_gather,
            "total_bytes": dense_ring + sparse_gather, "all_dense_allreduce_bytes": all_dense}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="biglstm")
    parser.add_argument("--scale", type=parse_scale, default=parse_scale("1/16"))
    parser.add_argument("--data", help="corpus directory (default: the built-in corpus)")
    parser.add_argument("--procs", default="1,2", help="process counts to compare")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per process")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/torchrun_scaling.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in [int(p) for p in args.procs.split(",")]:
            runs = []
            for repeat in range(args.repeats):
                print(f"{procs} process(es), run {repeat + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                runs.append(run_once(args, procs, Path(tmp) / f"p{procs}-r{repeat}"))
            rows.append({"procs": procs, "words_per_sec": statistics.median(r["words_per_sec"] for r in runs),
                         "exchange_seconds_per_step": statistics.median(r["exchange_seconds_per_step"] for r in runs),
                         "runs": runs})
    base = rows[0]["words_per_sec"]
    paper = [exchange_bytes(name, batch=128, steps=20, world=8) for name in PAPER_PRESETS]
    payload = {"machine": _timing.machine_info(torch.device(args.device)), "args": {**vars(args), "scale": args.scale},
               "rows": rows, "paper_exchange_8_gpus": paper}
    _timing.write_json(args.out, payload)
    print(f"| processes | words/s (all) | × 1 process | exchange s/step |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['procs']} | {row['words_per_sec']:,.0f} | {row['words_per_sec'] / base:.2f} "
              f"| {row['exchange_seconds_per_step'] * 1000:.1f} ms |")
    print("\nPaper models at full size, 8 ranks, batch 128 × 20 steps per rank, fp32 gradients, per rank per step:\n")
    print("| model | dense all-reduce | sparse all-gather (emb rows, softmax rows) | total | all-dense all-reduce |")
    print("|---|---|---|---|---|")
    for p in paper:
        print(f"| {p['model']} | {p['dense_allreduce_bytes'] / 1e9:.2f} GB | {p['sparse_allgather_bytes'] / 1e9:.2f} GB "
              f"({p['embedding_rows']:,}, {p['softmax_rows']:,}) | {p['total_bytes'] / 1e9:.2f} GB "
              f"| {p['all_dense_allreduce_bytes'] / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
