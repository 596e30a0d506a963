"""Token-by-token generation speed of the paper's language models: BIGLSTM / F512 / G2 / G4 / G8.

What ``factorlm generate`` does, timed: ``factorlm.evaluate.generate`` samples ``--tokens`` words
after a 3-word prompt, one forward call of the whole model per token at batch 1 (embedding, both
recurrent layers with the state carried, the full softmax over the vocabulary, sampling), in eval
mode under ``torch.inference_mode()``. Models are the paper family at ``--scale`` of its sizes
(factorlm.compare.family: p = 1024·scale, n = 8p, F-LSTM rank p/2) with a ``--vocab``-word full
softmax (default 10,000, Penn Treebank's size) and untrained random weights, which cost the same
as trained ones. Reported: median µs per generated token over ``--repeats`` (>= 10) runs after one
warm-up, and the speedup over BIGLSTM measured in the same run. The softmax (p × vocab) is the
same for every model and is included, as a user sees it.

    python benchmarks/generate_speed.py
    python benchmarks/generate_speed.py --scale 1/4 --vocab 50000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.compare.family import parse_scale, scale_paper_model  # noqa: E402
from factorlm.configs import PAPER_PRESETS, model_preset  # noqa: E402
from factorlm.evaluate import generate  # noqa: E402
from factorlm.models.lm import LanguageModel  # noqa: E402
from factorlm.ops import _extension  # noqa: E402
from factorlm.validate import check_int  # noqa: E402

PROMPT = [5, 6, 7]


def measure(name: str, scale: float, vocab: int, tokens: int, repeats: int, device: torch.device) -> dict:
    config = scale_paper_model(model_preset(name), scale).replace(vocab_size=vocab, num_sampled=0)
    model = LanguageModel(config).to(device).eval()
    # A boundary id the prompt never holds and sampling is unlikely to hit: every run generates
    # close to ``tokens`` words, and the time is divided by the number actually generated.
    boundary = vocab - 1
    generator = torch.Generator().manual_seed(0)
    counts = []

    def run():
        counts.append(len(generate(model, PROMPT, boundary, max_tokens=tokens, generator=generator, device=device)))

    with torch.inference_mode():
        _, times = _timing.median_seconds(run, device, warmup=1, repeats=repeats)
    per_token = sorted(t / max(1, c) for t, c in zip(times, counts[1:]))
    return {
        "model": name, "scale": scale, "vocab": vocab, "embedding": config.embedding_size,
        "hidden_size": config.hidden_size, "proj_size": config.proj_size, "cell": config.cell,
        "cell_args": dict(config.cell_args),
        "rnn_params": sum(p.numel() for p in model.rnn.parameters()),
        "us_per_token": per_token[len(per_token) // 2] * 1e6,
        "us_per_token_all": [t * 1e6 for t in per_token],
        "tokens_per_run": counts[1:],
    }


def table(rows: list[dict]) -> str:
    columns = [
        ("model", "model", "s"), ("p", "proj_size", "d"), ("n", "hidden_size", "d"), ("vocab", "vocab", ","),
        ("RNN params", "rnn_params", ","), ("µs/token", "us_per_token", ",.0f"),
        ("tokens/s", "tokens_per_s", ",.0f"), ("vs BIGLSTM", "speedup", ".2f"),
    ]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="1/8", help="fraction of the paper's sizes, e.g. 1/8 (default) or 0.25")
    parser.add_argument("--vocab", type=int, default=10_000, help="vocabulary size, full softmax (default 10,000)")
    parser.add_argument("--tokens", type=int, default=100, help="words generated per run (default 100)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model, median reported (default 10)")
    parser.add_argument("--models", nargs="+", choices=list(PAPER_PRESETS), default=list(PAPER_PRESETS),
                        help="presets to run (default all five)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default benchmarks/results/generate_speed_<device>.json)")
    args = parser.parse_args(argv)
    try:
        scale = parse_scale(args.scale)
        check_int("--vocab", args.vocab, 2)
        check_int("--tokens", args.tokens, 1)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    extension = _extension.is_available() if device.type == "cpu" else False  # build outside the timings
    rows = []
    for name in args.models:
        print(f"measuring {name} at scale {args.scale} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, scale, args.vocab, args.tokens, args.repeats, device))
    baseline = next((r for r in rows if r["model"] == "biglstm"), rows[0])
    for row in rows:
        row["tokens_per_s"] = 1e6 / row["us_per_token"]
        row["speedup"] = baseline["us_per_token"] / row["us_per_token"]
    payload = {
        "benchmark": "generate_speed",
        "machine": _timing.machine_info(device),
        "device": str(device),
        "c++ extension": extension,
        "prompt": PROMPT,
        "tokens_per_run": args.tokens,
        "repeats": args.repeats,
        "rows": rows,
    }
    _timing.report(payload, table(rows), args.out, f"generate_speed_{device.type}.json")
    return payload


if __name__ == "__main__":
    main()
