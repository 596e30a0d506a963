"""Inference speed of one recurrent layer: torch.nn.LSTM vs factorlm LSTM / FLSTM / GLSTM, no backward.

Two measurements per shape (p, n, B), input size = proj_size = p, every layer on the same inputs
under ``torch.inference_mode()`` (the layers then keep nothing for a backward):

- **forward**: ``layer(x)`` on a (T = 20, B, p) batch: median ms over >= 10 runs after warm-up,
  tokens/s and the speedup over torch.nn.LSTM measured in the same run, with the theoretical
  speedup (dense MACs / the layer's MACs);
- **batch 1, token by token** (what ``factorlm generate`` and ``score`` do): 64 calls of
  ``layer(x_t, state)`` with x_t (1, 1, p) and the state carried from call to call; median µs per
  token over >= 10 such runs, and the speedup over torch.nn.LSTM. At batch 1 every step is a
  matrix-vector product, bound by reading the weights, so the factorized layers' smaller matrices
  should pay off directly unless the per-call overhead eats it.

    python benchmarks/inference_speed.py --quick
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/inference_speed.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402
from layer_speed import (  # noqa: E402
    STEPS, add_layer_grid_arguments, apply_layer_grid_arguments, built_layers,
)

import factorlm.nn as fnn  # noqa: E402
from factorlm.ops import _extension  # noqa: E402

GRID = [(64, 256, 32), (256, 2048, 128), (512, 2048, 128), (1024, 8192, 32)]
QUICK_GRID = [(64, 256, 32), (256, 2048, 128), (512, 2048, 128)]
#: tokens fed one at a time in one timed batch-1 run
TOKENS = 64


def _generate(layer, tokens) -> None:
    """Feed ``tokens`` (TOKENS, 1, 1, p) one call at a time, carrying the state."""
    state = None
    for x_t in tokens:
        _, state = layer(x_t, state)


def measure_shape(p: int, n: int, batch: int, device, dtype, warmup: int, repeats: int,
                  only: list[str] | None = None) -> list[dict]:
    with torch.device("meta"):
        dense_macs = fnn.LSTM(p, n, proj_size=p).macs_per_token()
    new = dict(device=device, dtype=dtype)
    x = torch.randn(STEPS, batch, p, **new)
    tokens = torch.randn(TOKENS, 1, 1, p, **new)
    rows, baseline = [], None
    for label, spec, layer in built_layers(p, n, device, dtype, only=only):
        layer.eval()
        macs = dense_macs if spec["kind"] == "torch" else layer.macs_per_token()
        with torch.inference_mode():
            forward, forward_all = _timing.median_seconds(lambda: layer(x), device, warmup=warmup, repeats=repeats)
            one, one_all = _timing.median_seconds(lambda: _generate(layer, tokens), device, warmup=1, repeats=repeats)
        row = {
            "p": p, "n": n, "B": batch, "T": STEPS, "layer": label, "params": fnn.count_parameters(layer),
            "forward_ms": forward * 1e3, "forward_ms_all": [t * 1e3 for t in forward_all],
            "forward_tokens_per_s": STEPS * batch / forward,
            "batch1_us_per_token": one * 1e6 / TOKENS, "batch1_us_all": [t * 1e6 / TOKENS for t in one_all],
            "theoretical_speedup": dense_macs / macs,
        }
        if baseline is None:
            baseline = row
        row["forward_speedup"] = baseline["forward_ms"] / row["forward_ms"]
        row["batch1_speedup"] = baseline["batch1_us_per_token"] / row["batch1_us_per_token"]
        rows.append(row)
        del layer
    return rows


def table(rows: list[dict]) -> str:
    columns = [
        ("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"), ("params", "params", ","),
        ("forward ms", "forward_ms", ".2f"), ("tokens/s", "forward_tokens_per_s", ",.0f"),
        ("forward speedup", "forward_speedup", ".2f"), ("batch-1 µs/token", "batch1_us_per_token", ".0f"),
        ("batch-1 speedup", "batch1_speedup", ".2f"), ("theory", "theoretical_speedup", ".2f"),
    ]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_grid_arguments(parser, QUICK_GRID, "untimed forward runs per layer")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/inference_speed_<device>_<dtype>.json)")
    args = parser.parse_args(argv)
    apply_layer_grid_arguments(parser, args)
    device = torch.device(args.device)
    dtype = _timing.DTYPES[args.dtype]
    torch.manual_seed(0)
    extension = _extension.is_available() if device.type == "cpu" else False  # build outside the timings
    rows = []
    for p, n, batch in args.shape or (QUICK_GRID if args.quick else GRID):
        print(f"measuring p={p} n={n} B={batch} ...", file=sys.stderr, flush=True)
        with _timing.maybe_locked(args.lock):
            shape_rows = measure_shape(p, n, batch, device, dtype, args.warmup, args.repeats, args.layers)
        rows += shape_rows
        print(table(shape_rows), "\n", flush=True)
    payload = {
        "benchmark": "inference_speed",
        "machine": _timing.machine_info(device),
        "device": str(device),
        "dtype": args.dtype,
        "c++ extension": extension,
        "batch1_tokens_per_run": TOKENS,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }
    _timing.report(payload, table(rows), args.out, f"inference_speed_{device.type}_{args.dtype}.json")
    return payload


if __name__ == "__main__":
    main()
