"""Words/sec of a full language-model training step for the paper's BIGLSTM / F512 / G2 / G4 / G8.

One step = embedding -> 2 recurrent layers -> sampled softmax (8192 candidates) loss -> backward
-> clip the recurrent gradients (global norm 1.0, as the paper's runs) -> Adagrad (lr 0.2, initial
accumulator 1.0) with sparse embedding / softmax gradients (only the rows the batch touches, exact for
Adagrad, as factorlm train does; --dense-gradients for the dense update), on synthetic Zipf-distributed word ids (log-uniform over the 793,470-word
vocabulary, the distribution the sampled softmax assumes), the state carried between steps.

The paper's shapes (n = 8192, p = E = 1024, batch 128 per GPU) need a GPU (--device cuda, not
measured yet); the CPU default is the same architecture at reduced sizes: n = 2048, p = E = 256,
batch 32, full vocabulary, F-LSTM rank scaled with n (512·n/8192 = 128 at n = 2048: the same
r/n = 1/16 as F512).

    python benchmarks/lm_throughput.py --lock /tmp/factorlm-cpu.lock
    python benchmarks/lm_throughput.py --device cuda --hidden-size 8192 --proj-size 1024 --batch-size 128
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.configs import PAPER_PRESETS, preset  # noqa: E402
from factorlm.models.lm import LanguageModel, detach_state  # noqa: E402
from factorlm.train.optim import build_optimizer, clip_parameters, sparse_ok  # noqa: E402

PRESETS = list(PAPER_PRESETS)
PAPER_HIDDEN = 8192


def zipf_tokens(steps: int, batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(steps + 1, batch) int64 ids, P(k) = log((k+2)/(k+1)) / log(V+1): log-uniform (Zipf-like)."""
    u = torch.rand(steps + 1, batch, generator=generator, dtype=torch.float64)
    return (torch.exp(u * math.log(vocab + 1)) - 1).long().clamp_(0, vocab - 1)


def build_config(name: str, args):
    config = preset(name)[0]
    changes = dict(
        hidden_size=args.hidden_size,
        proj_size=args.proj_size,
        embedding_size=args.proj_size,
        vocab_size=args.vocab_size,
        num_sampled=args.num_sampled,
    )
    if "rank" in config.cell_args:  # F-LSTM: keep the paper's r/n
        rank = max(1, config.cell_args["rank"] * args.hidden_size // PAPER_HIDDEN)
        changes["cell_args"] = {**config.cell_args, "rank": rank}
    return config.replace(**changes)


def measure(name: str, args, device, generator, *, autocast: torch.dtype | None = None, profile_steps: int = 0) -> dict:
    """One preset's training step at ``args``' sizes: the median of ``args.repeats`` steps after
    ``args.warmup``, as words/s. ``autocast``: run the forward and the loss under
    ``torch.autocast(device.type, autocast)`` (None: the parameters' dtype). ``profile_steps`` > 0: then
    profile that many more steps with torch.profiler (CPU, and CUDA where the model is) and add the
    operator table, heaviest first by self device time on a GPU, to the row as "profile"."""
    config = build_config(name, args)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the paper's 1.8e9 parameters take long to fill on a CPU
        model = LanguageModel(config)
    model.train()
    # the training recipe exactly as factorlm train builds it (Adagrad, clipping, sparse rows)
    recipe = preset(name)[1].replace(batch_size=args.batch_size, num_steps=args.steps,
                                     sparse_gradients=not args.dense_gradients)
    model.use_sparse_gradients(sparse_ok(recipe))
    optimizer = build_optimizer(model, recipe)
    rnn_params = clip_parameters(model, recipe)
    state = model.init_state(args.batch_size, device=device)
    words = args.steps * args.batch_size

    def step():
        nonlocal state
        tokens = zipf_tokens(args.steps, args.batch_size, config.vocab_size, generator).to(device)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            hidden, new_state = model(tokens[:-1], state)
            loss = model.loss(hidden, tokens[1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rnn_params, 1.0)
        optimizer.step()
        state = detach_state(new_state)

    seconds, times = _timing.median_seconds(step, device, warmup=args.warmup, repeats=args.repeats)
    profile_table = profile_step(step, device, profile_steps) if profile_steps else None
    return {
        "model": name,
        "cell": config.cell,
        "cell_args": dict(config.cell_args),
        "hidden_size": config.hidden_size,
        "proj_size": config.proj_size,
        "vocab_size": config.vocab_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rnn_params": sum(p.numel() for p in rnn_params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "rnn_macs_per_token": model.rnn_macs_per_token(),
        "sparse_gradients": model.embedding.sparse,
        "ms": seconds * 1e3,
        "ms_all": [t * 1e3 for t in times],
        "words_per_s": words / seconds,
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        **({"profile": profile_table} if profile_table is not None else {}),
    }


def profile_step(step, device: torch.device, steps: int, rows: int = 25) -> str:
    """torch.profiler's operator table over ``steps`` calls of ``step``: CPU and, on a GPU, CUDA
    activity, sorted by self device time there (by self CPU time on a CPU), ``rows`` operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _timing.synchronize(device)
    # self time: where the time goes (inclusive totals put the autograd engine's wrappers on top)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=PRESETS, choices=PRESETS, help="presets to run (default all five)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden-size", type=int, default=2048, help="n (paper: 8192; default 2048 for CPU)")
    parser.add_argument("--proj-size", type=int, default=256, help="p = E (paper: 1024; default 256 for CPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="B (paper: 128 per GPU; default 32 for CPU)")
    parser.add_argument("--vocab-size", type=int, default=793_470, help="V (default: the paper's 793,470)")
    parser.add_argument("--num-sampled", type=int, default=8192, help="sampled-softmax candidates (default 8192)")
    parser.add_argument("--steps", type=int, default=20, help="unrolled steps T (default 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dense-gradients", action="store_true",
                        help="dense embedding/softmax gradients (default: sparse rows, as factorlm train)")
    parser.add_argument("--lock", default=None, help="flock this file around each model (e.g. /tmp/factorlm-cpu.lock)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lm_throughput_<device>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name in args.models:
        with _timing.maybe_locked(args.lock):
            row = measure(name, args, device, generator)
        rows.append(row)
        print(f"{name}: {row['words_per_s']:,.0f} words/s ({row['ms']:.0f} ms/step)", flush=True)
    base = rows[0]["words_per_s"]
    for row in rows:
        row["speedup"] = row["words_per_s"] / base
    payload = {
        "benchmark": "lm_throughput",
        "machine": _timing.machine_info(device),
        "device": str(device),
        "rows": rows,
    }
    columns = [
        ("model", "model", "s"), ("n", "hidden_size", "d"), ("p", "proj_size", "d"), ("B", "batch_size", "d"),
        ("RNN params", "rnn_params", ","), ("all params", "total_params", ","), ("ms/step", "ms", ".0f"),
        ("words/s", "words_per_s", ",.0f"), (f"vs {rows[0]['model']}", "speedup", ".2f"),
    ]
    _timing.report(payload, _timing.markdown_table(rows, columns), args.out, f"lm_throughput_{device.type}.json")
    return payload


if __name__ == "__main__":
    main()
