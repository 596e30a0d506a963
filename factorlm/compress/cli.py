"""``factorlm compress METHOD RUN ... --out RUN2``: svd (-> F-LSTM), blocks (-> G-LSTM), prune.

Each reads the run (or checkpoint) RUN, never writes to it, and writes RUN2 as an ordinary run
directory (factorlm.compress.runs) with the report as compress.txt / compress.json (svd adds
spectrum.png). Values are checked before the checkpoint is read.

Given a bare layer instead (``torch.save(lstm.state_dict())`` of a torch.nn.LSTM, or a layer file
that one of these commands wrote), each writes one layer file OUT.pt (factorlm.compress.layer_file;
svd adds OUT.spectrum.png beside it), which ``factorlm.compress.load_layer`` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from factorlm.compress.prune import check_sparsity
from factorlm.compress.spectrum import check_energy
from factorlm.errors import CLIError
from factorlm.nn.cell_args import parse_int_list

#: the methods: name -> help
METHODS = {
    "svd": "dense LSTM -> F-LSTM: each layer's [W_ih W_hh] by its best rank-r approximation W2·W1 (SVD)",
    "blocks": "dense LSTM -> G-LSTM: the block diagonal of each gate matrix after a permutation of the units "
              "that keeps the most weight",
    "prune": "zero the smallest recurrent weights (masks kept in the checkpoint), or with --units remove whole "
             "hidden units (the layers shrink)",
    "quantize": "int8 weights (per output channel) and dynamic per-token int8 activations, for CPU inference "
                "(factorlm.quant)",
}


def _int_list(text: str):
    try:
        return parse_int_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN",
                        help="the run directory (or checkpoint.pt) to compress, or a bare layer: a torch.nn.LSTM "
                        "state dict saved with torch.save, or a layer file of factorlm compress; never written")
    parser.add_argument("--out", required=True, metavar="RUN2",
                        help="the new run directory (must hold no checkpoint); for a bare layer the new layer file "
                        "(must not exist)")
    parser.add_argument("--no-ema", action="store_true",
                        help="compress the raw weights even when the run kept an EMA (default: the EMA, which "
                        "evaluate scores)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    svd = methods.add_parser("svd", help=METHODS["svd"], description=METHODS["svd"])
    _common(svd)
    how = svd.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=_int_list, metavar="R", help="the rank of every layer, or one per layer (64,32)")
    how.add_argument("--energy", type=float, metavar="E",
                     help="per layer the smallest rank keeping this fraction (0 < E < 1) of the spectral energy")

    blocks = methods.add_parser("blocks", help=METHODS["blocks"], description=METHODS["blocks"])
    _common(blocks)
    blocks.add_argument("--groups", type=int, required=True, metavar="K",
                        help="groups per layer (divides the embedding, hidden and output sizes)")

    prune = methods.add_parser("prune", help=METHODS["prune"], description=METHODS["prune"])
    _common(prune)
    prune.add_argument("--sparsity", type=float, required=True, metavar="S",
                       help="the fraction (0 < S < 1) of each recurrent matrix's weights zeroed, or with --units "
                       "of each layer's hidden units removed")
    prune.add_argument("--units", action="store_true",
                       help="remove whole cells (and projection units) by importance: n (and p) shrink")

    from factorlm.quant import cli as quant_cli

    quantize = methods.add_parser("quantize", help=METHODS["quantize"], description=METHODS["quantize"])
    quant_cli.add_arguments(quantize)


def run(args: argparse.Namespace) -> int:
    from factorlm.compress.runs import check_output

    if args.method == "quantize":  # its own checks and checkpoint (an int8 run, not a float one)
        from factorlm.quant import cli as quant_cli

        return quant_cli.run(args)

    if args.method == "svd" and args.energy is not None:
        check_energy(args.energy, "--energy")
    if args.method == "prune":
        check_sparsity(args.sparsity, "--sparsity")
    from factorlm.compress.layer_file import read_layer_source

    layer = read_layer_source(args.source)
    if layer is not None:
        return _run_layer(args, *layer)
    out = check_output(args.source, args.out)
    return {"svd": _run_svd, "blocks": _run_blocks, "prune": _run_prune}[args.method](args, out)


def _finish(args, out: Path, source, payload: dict, converted, step: dict, report: str, extra=None) -> int:
    from factorlm.compress.runs import write_run
    from factorlm.nn.base import count_parameters

    before, after = count_parameters(source.rnn), count_parameters(converted.rnn)
    step = {"source": str(args.source), "used_ema": not args.no_ema and bool(payload.get("ema")),
            "cell": [source.config.cell, converted.config.cell], "rnn_params": [before, after], **step}
    report = f"{report}\nrecurrent parameters {before:,} -> {after:,} ({after / before:.1%})"
    path = write_run(out, converted, payload, step, report=report, extra=extra)
    print(report)
    print(f"wrote {path}; evaluate it with: factorlm evaluate --checkpoint {out}")
    return 0


def _run_svd(args, out: Path) -> int:
    from factorlm.compress.runs import load_source
    from factorlm.compress.spectrum import format_spectra, plot_spectra
    from factorlm.compress.svd import svd_to_flstm

    model, _, payload = load_source(args.source, use_ema=not args.no_ema)
    converted, spectra = svd_to_flstm(model, rank=args.rank, energy=args.energy)
    rank = converted.config.cell_args["rank"]
    step = {"method": "svd", "rank_asked": args.rank, "energy_asked": args.energy,
            "rank": list(rank) if isinstance(rank, tuple) else rank, "layers": [s.to_dict() for s in spectra]}
    status = _finish(args, out, model, payload, converted, step, format_spectra(spectra))
    print(f"spectrum plot: {plot_spectra(spectra, out / 'spectrum.png')}")
    return status


def _run_blocks(args, out: Path) -> int:
    from factorlm.compress.blocks import dense_to_glstm
    from factorlm.compress.runs import load_source

    model, _, payload = load_source(args.source, use_ema=not args.no_ema)
    converted, report = dense_to_glstm(model, args.groups)
    return _finish(args, out, model, payload, converted, {"method": "blocks", **report.to_dict()}, report.format())


def _run_prune(args, out: Path) -> int:
    from factorlm.compress.prune import MASKS_KEY, format_prune_report, magnitude_prune, prunable_parameters
    from factorlm.compress.runs import load_source
    from factorlm.compress.units import format_units_report, prune_units

    model, _, payload = load_source(args.source, use_ema=not args.no_ema)
    earlier = payload.get(MASKS_KEY) or {}
    if args.units:
        converted, report = prune_units(model, args.sparsity)
        # a masked source's zeros live on in the kept rows and columns: so do their masks (read off the zeros)
        extra = {MASKS_KEY: {name: p != 0 for name, p in prunable_parameters(converted).items()}} if earlier else None
        return _finish(args, out, model, payload, converted, {"method": "prune-units", **report},
                       format_units_report(report), extra=extra)
    converted, masks, report = magnitude_prune(model, args.sparsity)
    for name, mask in masks.items():  # an earlier pruning's zeros stay pruned (they were the smallest anyway)
        if name in earlier and earlier[name].shape == mask.shape:
            masks[name] = mask & earlier[name].bool()
    return _finish(args, out, model, payload, converted, {"method": "prune", **report},
                   format_prune_report(report), extra={MASKS_KEY: masks})


# ------------------------------------------------------------- a bare layer
def _run_layer(args, layer, payload: dict) -> int:
    """The command on a bare layer (``layer``, read from a torch.nn.LSTM state dict or a layer file
    whose payload is ``payload``): one layer file --out, the report printed as for a run."""
    from factorlm.compress.layer_file import check_layer_output, save_layer, spectrum_path
    from factorlm.compress.prune import MASKS_KEY, format_prune_report, magnitude_prune
    from factorlm.compress.units import format_units_report, prune_units
    from factorlm.nn.base import count_parameters

    if args.no_ema:
        raise CLIError(f"--no-ema chooses a run's raw weights over its average, but {args.source} is a bare layer, "
                       f"which has one set of weights; leave --no-ema out")
    out = check_layer_output(args.source, args.out)
    masks, step = None, {"method": args.method}
    if args.method == "svd":
        from factorlm.compress.spectrum import format_spectra
        from factorlm.compress.svd import svd_to_flstm

        converted, spectra = svd_to_flstm(layer, rank=args.rank, energy=args.energy)
        step.update(rank_asked=args.rank, energy_asked=args.energy, rank=list(converted.rank),
                    layers=[s.to_dict() for s in spectra])
        report = format_spectra(spectra)
    elif args.method == "blocks":
        from factorlm.compress.blocks import dense_to_glstm

        converted, blocks = dense_to_glstm(layer, args.groups)
        step.update(blocks.to_dict())
        report = (f"{blocks.format()}\nthe layer's input features and output h keep their order; c_n (and the "
                  "earlier layers' h_n) are in the new order, which the layer reads back consistently")
    elif args.units:
        converted, units = prune_units(layer, args.sparsity)
        step.update(method="prune-units", **units)
        report = (f"{format_units_report(units)}\nonly cells behind the projection went: the input and the output h "
                  f"keep their sizes; c_n is now (num_layers, batch, {converted.hidden_size})")
    else:
        converted, masks, pruned = magnitude_prune(layer, args.sparsity)
        earlier = payload.get(MASKS_KEY) or {}
        for name, mask in masks.items():  # an earlier pruning's zeros stay pruned (they were the smallest anyway)
            if name in earlier and earlier[name].shape == mask.shape:
                masks[name] = mask & earlier[name].bool()
        step.update(method="prune", **pruned)
        report = format_prune_report(pruned)
    if getattr(args, "units", False) and payload.get(MASKS_KEY):  # as for a run: the zeros of a masked source keep their masks
        masks = {name: p != 0 for name, p in converted.named_parameters() if p.dim() >= 2}
    before, after = count_parameters(layer), count_parameters(converted)
    step.update(source=str(args.source), cell=[type(layer).__name__, type(converted).__name__],
                params=[before, after])
    report = f"{report}\nlayer parameters {before:,} -> {after:,} ({after / before:.1%})"
    history = list(payload.get("compression") or []) + [step]
    save_layer(out, converted, report=report, history=history, masks=masks)
    print(report)
    if args.method == "svd":
        from factorlm.compress.spectrum import plot_spectra

        print(f"spectrum plot: {plot_spectra(spectra, spectrum_path(out))}")
    print(f"wrote {out} ({type(converted).__name__}); load it in Python with: "
          f"layer = factorlm.compress.load_layer({str(out)!r})")
    if masks:
        print(f"its pruning masks: torch.load({str(out)!r}, weights_only=True)[{MASKS_KEY!r}]; to keep the zeros "
              f"while training, factorlm.compress.apply_masks(layer, masks) after every optimizer step")
    return 0
