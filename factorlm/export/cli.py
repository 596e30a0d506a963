"""``factorlm export FORMAT RUN OUT``: a trained model in a deployment format.

    factorlm export onnx RUN model.onnx    the whole model as a streaming ONNX graph (factorlm.export.onnx),
                                           then checked in onnxruntime against PyTorch (--no-check skips it)
"""

from __future__ import annotations

import argparse

from factorlm.errors import CLIError

#: the formats: name -> help
FORMATS = {
    "onnx": "the whole language model (embedding, layers, log-softmax) as a streaming ONNX graph: tokens and "
            "state (h, c) in, log-probabilities and the next state out, any chunk length and batch size",
}

#: the largest |log p| difference between onnxruntime and PyTorch that the check accepts
CHECK_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help=FORMATS["onnx"], description=FORMATS["onnx"])
    onnx.add_argument("checkpoint", metavar="RUN", help="the run directory or its checkpoint.pt")
    onnx.add_argument("out", metavar="OUT", help="the ONNX file to write (e.g. model.onnx)")
    onnx.add_argument("--no-ema", action="store_true", help="export the raw weights even when the run kept an EMA")
    onnx.add_argument("--no-check", action="store_true",
                      help="skip running the graph in onnxruntime against PyTorch on a short chunked stream")


def run(args: argparse.Namespace) -> int:
    return {"onnx": _run_onnx}[args.format](args)


def _run_onnx(args: argparse.Namespace) -> int:
    from factorlm.export.onnx import CHECK_MODULES, EXPORT_MODULES, check_onnx, require, to_onnx
    from factorlm.outputs import check_writable_file
    from factorlm.runs import load_model

    # everything that can fail before the work does, cheapest first: the extra, the output, the run
    require(EXPORT_MODULES + (() if args.no_check else CHECK_MODULES), "factorlm export onnx")
    out = check_writable_file(args.out, "ONNX file")
    model, _, _ = load_model(args.checkpoint, device="cpu", use_ema=not args.no_ema)
    to_onnx(model, out)
    config = model.config
    L, V = config.num_layers, config.vocab_size
    print(f"wrote {out}: {config.cell} model, {L} layer(s), vocabulary {V:,}; inputs tokens (T, B) int64, "
          f"h_0 ({L}, B, {config.output_size}), c_0 ({L}, B, {config.hidden_size}); outputs log_probs (T, B, {V}), "
          f"h_n, c_n")
    if not args.no_check:
        worst = check_onnx(model, out)
        if worst > CHECK_TOLERANCE:
            raise CLIError(f"{out} was written, but onnxruntime's outputs differ from PyTorch's by up to {worst:.2e} "
                           f"(more than {CHECK_TOLERANCE:g}); please report it")
        print(f"checked: onnxruntime equals PyTorch to {worst:.1e} over a stream of 3 chunks with carried state")
    return 0
