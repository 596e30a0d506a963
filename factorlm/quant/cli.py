"""``factorlm compress quantize RUN --out RUN_INT8``: a trained run's int8 checkpoint (factorlm.quant).

The lead registers it under ``factorlm compress quantize``; the pair below is all a command needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from factorlm.errors import CLIError
from factorlm.quant.model import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN", help="the float run: its directory or checkpoint.pt")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory for the int8 run (DIR/checkpoint.pt; evaluate, score and generate read it)")
    parser.add_argument("--backend", choices=BACKENDS, default="torchao",
                        help="torchao (default; the extra 'quant'): the products over whole sequences (softmax, "
                        "each layer's input side) through torchao's int8 Linear, the per-step ones through "
                        "torch._int_mm; native: every product through torch._int_mm, PyTorch alone")
    parser.add_argument("--no-ema", action="store_true", help="quantize the raw weights even when the run kept an EMA")


def run(args: argparse.Namespace) -> int:
    from factorlm.outputs import ensure_directory
    from factorlm.quant import _torchao
    from factorlm.quant.checkpoint import quantized_payload
    from factorlm.quant.model import QuantizedLanguageModel, quantize_model, state_bytes
    from factorlm.runs import load_model
    from factorlm.train.checkpoint import save_checkpoint

    if args.backend == "torchao":
        _torchao.require()
    if Path(args.source).expanduser().resolve() == Path(args.out).expanduser().resolve():
        raise CLIError(f"--out {args.out} is the run itself; give the int8 run its own directory")
    out = ensure_directory(args.out, "output directory")  # before the model is read: fail fast
    target = out / "checkpoint.pt"
    if target.exists():
        raise CLIError(f"{target} exists; choose another --out (an int8 run is written once)")
    model, _, payload = load_model(args.source, use_ema=not args.no_ema)
    if isinstance(model, QuantizedLanguageModel):
        raise CLIError(f"{args.source} is already an int8 run ({payload['quantization']['backend']} backend); "
                       f"quantize its float source {payload['quantization']['source']}")
    float_bytes = state_bytes(model)
    int8_model = quantize_model(model, args.backend)
    save_checkpoint(quantized_payload(int8_model, payload, args.source, float_bytes), target)
    int8_bytes = state_bytes(int8_model)
    print(f"int8 run written to {target}: weights {int8_bytes / 2**20:.2f} MiB (float32 {float_bytes / 2**20:.2f} "
          f"MiB, {float_bytes / int8_bytes:.1f}x smaller), backend {args.backend}; evaluate it with "
          f"factorlm evaluate --checkpoint {out}", file=sys.stdout)
    return 0
