"""``factorlm export FORMAT RUN OUT``: a trained model in a deployment format.

    factorlm export onnx RUN model.onnx    the whole model as a streaming ONNX graph (factorlm.export.onnx),
                                           then checked in onnxruntime against PyTorch (--no-check skips it)
    factorlm export onnx RUN model.onnx --int8
                                           the same graph with onnxruntime's dynamic int8 products
                                           (factorlm.export.runtime.quantize_onnx): the float graph is
                                           checked, then the int8 one's distance from it reported
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
    onnx.add_argument("--int8", action="store_true",
                      help="int8 weights (per output column) and dynamic int8 activations for every matrix product, "
                      "onnxruntime's quantizer: about 4x smaller")


def run(args: argparse.Namespace) -> int:
    return {"onnx": _run_onnx}[args.format](args)


def _run_onnx(args: argparse.Namespace) -> int:
    from factorlm.export.onnx import CHECK_MODULES, EXPORT_MODULES, require, to_onnx
    from factorlm.outputs import check_writable_file
    from factorlm.runs import load_model

    # everything that can fail before the work does, cheapest first: the extra, the output, the run
    require(EXPORT_MODULES + (() if args.no_check and not args.int8 else CHECK_MODULES), "factorlm export onnx")
    out = check_writable_file(args.out, "ONNX file")
    model, vocab, payload = load_model(args.checkpoint, device="cpu", use_ema=not args.no_ema)
    if payload.get("quantization"):
        raise CLIError(f"{args.checkpoint} is an int8 run ({payload['quantization']['backend']} backend); export its "
                       f"float source {payload['quantization']['source']} (with --int8 for an int8 graph)")
    if args.int8:
        return _run_onnx_int8(args, model, vocab, out)
    to_onnx(model, out, vocab=vocab)
    _summary(model, out)
    if not args.no_check:
        _check(model, out)
    return 0


def _summary(model, out) -> None:
    config = model.config
    L, V = config.num_layers, config.vocab_size
    print(f"wrote {out}: {config.cell} model, {L} layer(s), vocabulary {V:,}; inputs tokens (T, B) int64, "
          f"h_0 ({L}, B, {config.output_size}), c_0 ({L}, B, {config.hidden_size}); outputs log_probs (T, B, {V}), "
          f"h_n, c_n; the vocabulary is in its metadata: factorlm evaluate, score and generate read it as "
          f"--checkpoint {out}")


def _check(model, path) -> None:
    from factorlm.export.onnx import check_onnx

    worst = check_onnx(model, path)
    if worst > CHECK_TOLERANCE:
        raise CLIError(f"{path} was written, but onnxruntime's outputs differ from PyTorch's by up to {worst:.2e} "
                       f"(more than {CHECK_TOLERANCE:g}); please report it")
    print(f"checked: onnxruntime equals PyTorch to {worst:.1e} over a stream of 3 chunks with carried state")


def _run_onnx_int8(args: argparse.Namespace, model, vocab, out) -> int:
    """The float graph beside ``out`` (checked unless --no-check), then ``out`` its int8 twin; the
    float file is removed afterwards, also when something fails."""
    import os
    import tempfile

    from factorlm.export.onnx import check_onnx, to_onnx
    from factorlm.export.runtime import quantize_onnx
    from factorlm.quant.model import state_bytes

    handle, name = tempfile.mkstemp(suffix=".onnx", prefix=".float-", dir=out.parent)
    os.close(handle)
    try:
        to_onnx(model, name, vocab=vocab)
        if not args.no_check:
            _check(model, name)
        quantize_onnx(name, out)
    finally:
        os.unlink(name)
    _summary(model, out)
    print(f"int8: {out.stat().st_size / 2**20:.2f} MiB (float32 {state_bytes(model) / 2**20:.2f} MiB of weights)")
    if not args.no_check:
        worst = check_onnx(model, out)
        print(f"int8 rounding: log-probabilities within {worst:.2g} of the float model's over the same stream "
              f"(its perplexity: factorlm evaluate --checkpoint {out} --data ...)")
    return 0

