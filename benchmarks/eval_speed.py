"""Exact-evaluation speed: the full-softmax scoring step against the matmul peak, and tokens/s end to end.

1. Scoring step. ``FullSoftmax.nll`` without autograd (what evaluation runs per window: N = rows
   hidden states of size p scored against all V words, factorlm.models.exact_nll's tiles) for a few
   (rows, p, vocab) sizes, next to the plain way it replaced (``F.cross_entropy(F.linear(h, W, b))``:
   the (N, V) logits, then a (N, V) log_softmax) and the bare matmul ``h @ Wᵀ`` of the same shape.
   (Calls of at most exact_nll.SMALL_LOGITS logits run the plain way.) GFLOP/s counts the matmul's 2·N·p·V flops only, so 100% of the matmul peak (square matmuls of
   the same run, ``_timing.matmul_peak``) is the ceiling; the softmax's own passes are the gap.
2. End to end. ``evaluate_stream`` on the built-in synthetic corpus's valid split (30,002 targets)
   with one small model (untrained weights cost what trained ones do), batch 64, 20 steps per
   window: the old two full passes (``stop_early=False``) against the early stop, in tokens/s
   (targets / median seconds) and the token positions scored (pass 1 plus the re-scored ones).

Median of ``--repeats`` (>= 10) timed runs after warm-up for every figure.

    python benchmarks/eval_speed.py
    python benchmarks/eval_speed.py --size 1280,1024,793470 --device cuda
    taskset -c 1 python benchmarks/eval_speed.py --quick     # a smoke run, not figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.data import open_corpus, split_stream  # noqa: E402
from factorlm.evaluate import evaluate_stream  # noqa: E402
from factorlm.models import LanguageModel, ModelConfig  # noqa: E402
from factorlm.models.softmax import FullSoftmax  # noqa: E402

# (rows, p, vocab): rows = 64 batch rows x 20 steps, as evaluation scores them; PTB's 10,000
# words, a 100,000-word vocabulary, and p from a scale-1/8 model (128) to the paper's (1024)
SIZES = [(1280, 128, 10_000), (1280, 512, 10_000), (1280, 1024, 10_000), (1280, 128, 100_000),
         (1280, 1024, 100_000)]
QUICK_SIZES = [(256, 32, 2_000)]  # 512K logits: above SMALL_LOGITS, so the tiles run
# the end-to-end model: 2 LSTM layers with projections, n = 512, p = 128, full softmax
E2E_MODEL = dict(embedding_size=128, hidden_size=512, proj_size=128, num_layers=2, cell="lstm")
QUICK_E2E_MODEL = dict(embedding_size=16, hidden_size=32, proj_size=16, num_layers=2, cell="lstm")


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        rows, p, vocab = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be rows,p,vocab (three integers), got {text!r}") from None
    if min(rows, p, vocab) < 1:
        raise argparse.ArgumentTypeError(f"--size values must be >= 1, got {text!r}")
    return rows, p, vocab


def measure_scoring(rows: int, p: int, vocab: int, device: torch.device, dtype: torch.dtype, warmup: int,
                    repeats: int) -> dict:
    """Median seconds and GFLOP/s of the tiled scoring, the plain cross entropy and the bare matmul."""
    head = FullSoftmax(p, vocab).to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, p, generator=generator).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    flops = 2.0 * rows * p * vocab
    runs = {
        "tiled": lambda: head.nll(hidden, targets),
        "cross_entropy": lambda: F.cross_entropy(F.linear(hidden, head.weight, head.bias), targets, reduction="none"),
        "matmul": lambda: hidden @ head.weight.t(),
    }
    row: dict = {"rows": rows, "p": p, "vocab": vocab}
    with torch.inference_mode():
        for name, fn in runs.items():
            seconds, times = _timing.median_seconds(fn, device, warmup=warmup, repeats=repeats)
            row[f"{name}_ms"] = seconds * 1e3
            row[f"{name}_ms_all"] = [t * 1e3 for t in times]
            row[f"{name}_gflops"] = flops / seconds / 1e9
    row["speedup"] = row["cross_entropy_ms"] / row["tiled_ms"]
    return row


def measure_end_to_end(model_args: dict, stream: torch.Tensor, vocab: int, device: torch.device, warmup: int,
                       repeats: int) -> list[dict]:
    """Tokens/s of evaluate_stream with the two full passes and with the early stop."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=vocab, **model_args)).to(device).eval()
    rows = []
    for label, stop_early in (("two full passes", False), ("early stop", True)):
        results = []

        def run():
            results.append(evaluate_stream(model, stream, batch_size=64, num_steps=20, stop_early=stop_early,
                                           device=device))

        seconds, times = _timing.median_seconds(run, device, warmup=warmup, repeats=repeats)
        result = results[-1]
        one_pass = _pass_positions(result.tokens, 64)
        rows.append({"evaluation": label, "tokens": result.tokens, "passes": result.passes,
                     "rescored_tokens": result.rescored_tokens,
                     "scored_positions": one_pass + result.rescored_tokens,
                     "perplexity": result.perplexity, "seconds": seconds, "seconds_all": times,
                     "tokens_per_s": result.tokens / seconds, "one_pass_positions": one_pass})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    rows[1]["perplexity_ratio_minus_1"] = rows[1]["perplexity"] / rows[0]["perplexity"] - 1
    return rows


def _pass_positions(targets: int, batch_size: int) -> int:
    """Token positions of one batched pass (factorlm.data.batching.stream_rows' padded rows)."""
    length = -(-targets // min(batch_size, targets))
    return length * -(-targets // length)


def scoring_table(rows: list[dict]) -> str:
    columns = [
        ("rows", "rows", ","), ("p", "p", ","), ("vocab", "vocab", ","), ("tiled ms", "tiled_ms", ".2f"),
        ("tiled GFLOP/s", "tiled_gflops", ".1f"), ("% of peak", "tiled_peak_pct", ".0f"),
        ("cross-entropy GFLOP/s", "cross_entropy_gflops", ".1f"), ("matmul alone GFLOP/s", "matmul_gflops", ".1f"),
        ("tiled vs cross-entropy", "speedup", ".2f"),
    ]
    return _timing.markdown_table(rows, columns)


def end_to_end_table(rows: list[dict]) -> str:
    columns = [
        ("evaluation", "evaluation", "s"), ("targets", "tokens", ","), ("positions scored", "scored_positions", ","),
        ("re-scored", "rescored_tokens", ","), ("seconds", "seconds", ".2f"), ("tokens/s", "tokens_per_s", ",.0f"),
        ("speedup", "speedup", ".2f"), ("perplexity", "perplexity", ".6f"),
    ]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, action="append", metavar="ROWS,P,VOCAB",
                        help="a scoring size (repeatable; default: PTB's and a 100K vocabulary at p = 128-1024)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a tiny model on a 2,000-token stretch: checks the script runs")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure, median reported (>= 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each figure (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"], help="scoring dtype (default fp32)")
    parser.add_argument("--no-end-to-end", action="store_true", help="only the scoring step")
    parser.add_argument("--lock", default=None, help="hold an flock on this file while timing (shared machines)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/eval_speed_<device>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    device = torch.device(args.device)
    dtype = _timing.DTYPES[args.dtype]
    sizes = args.size or (QUICK_SIZES if args.quick else SIZES)
    with _timing.maybe_locked(args.lock):
        peak = _timing.matmul_peak(device, dtype, sizes=(256,) if args.quick else (1024, 2048, 3072),
                                   repeats=args.repeats)
    best_peak = max(v for v in (peak["torch.matmul"], peak["onednn"]) if v is not None)
    scoring = []
    for rows, p, vocab in sizes:
        print(f"measuring the scoring of {rows} rows, p={p}, vocab={vocab} ...", file=sys.stderr, flush=True)
        with _timing.maybe_locked(args.lock):
            row = measure_scoring(rows, p, vocab, device, dtype, args.warmup, args.repeats)
        row["tiled_peak_pct"] = 100 * row["tiled_gflops"] / best_peak
        row["cross_entropy_peak_pct"] = 100 * row["cross_entropy_gflops"] / best_peak
        row["matmul_peak_pct"] = 100 * row["matmul_gflops"] / best_peak
        scoring.append(row)
    end_to_end: list[dict] = []
    model_args = QUICK_E2E_MODEL if args.quick else E2E_MODEL
    if not args.no_end_to_end:
        corpus = open_corpus(None)
        stream = split_stream(corpus, "valid")
        if args.quick:
            stream = stream[:2_001]
        print(f"measuring evaluation of {stream.numel() - 1:,} tokens, two full passes and early stop ...",
              file=sys.stderr, flush=True)
        with _timing.maybe_locked(args.lock):
            end_to_end = measure_end_to_end(model_args, stream, len(corpus.vocab), device, args.warmup, args.repeats)
    payload = {
        "benchmark": "eval_speed",
        "machine": _timing.machine_info(device),
        "device": str(device),
        "dtype": args.dtype,
        "matmul_peak": peak,
        "matmul_peak_gflops": best_peak,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "scoring": scoring,
        "end_to_end_model": model_args,
        "end_to_end": end_to_end,
    }
    text = f"matmul peak: {best_peak:.1f} GFLOP/s ({args.dtype})\n\n" + scoring_table(scoring)
    if end_to_end:
        text += "\n\n" + end_to_end_table(end_to_end)
    _timing.report(payload, text, args.out, f"eval_speed_{device.type}.json")
    return payload


if __name__ == "__main__":
    main()
