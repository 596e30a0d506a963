"""``factorlm video``: train and evaluate a ConvLSTM video predictor on moving digits.

    factorlm video --out runs/digits --gates separable --max-time 600
    factorlm video --out runs/digits --resume --max-time 1200      # continue to 20 minutes in all
    factorlm video --gates bottleneck --rank 16 --count            # counts only, nothing trained

Every option left out keeps VideoConfig's default (a new run) or the saved value (a resume).
"""

from __future__ import annotations

import argparse

from factorlm.data.moving_digits import SOURCES
from factorlm.errors import CLIError
from factorlm.nn.cell_args import parse_int_list
from factorlm.nn.convlstm import GATES

__all__ = ["add_arguments", "run"]

#: option dest -> VideoConfig field (the same names)
_FIELDS = ("source", "canvas", "digit_size", "num_digits", "frames_in", "frames_out", "valid_sequences",
           "test_sequences", "gates", "hidden_channels", "kernel_size", "groups", "rank", "peephole", "patch",
           "encoder_channels", "batch_size", "lr", "clip_norm", "seed", "max_steps", "max_time",
           "checkpoint_minutes", "log_every")


def _channels(text: str) -> tuple[int, ...]:
    try:
        value = parse_int_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value if isinstance(value, tuple) else (value,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="run directory (checkpoint, logs, results.json, strip.png); "
                        "required unless --count")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out where it stopped; only budgets, --log-every and "
                        "--checkpoint-minutes may differ from it")
    parser.add_argument("--count", action="store_true",
                        help="print the model's exact parameters and multiply-adds per frame, and stop")
    budget = parser.add_argument_group("budgets (whichever ends first stops training; one is needed)")
    budget.add_argument("--max-time", type=float, metavar="SECONDS", help="training seconds (summed over resumes)")
    budget.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    data = parser.add_argument_group("data: moving digits")
    data.add_argument("--source", choices=SOURCES,
                      help="digits (scikit-learn's 8×8 digits, the 'vision' extra), shapes (procedural, no "
                      "dependency), auto (default: digits when scikit-learn is installed)")
    data.add_argument("--canvas", type=int, help="frame side in pixels (default 64)")
    data.add_argument("--digit-size", type=int, help="sprite side (default: 24 on a 64 canvas, scaled)")
    data.add_argument("--num-digits", type=int, help="sprites per sequence (default 2)")
    data.add_argument("--frames-in", type=int, help="frames given (default 10)")
    data.add_argument("--frames-out", type=int, help="frames predicted (default 10)")
    data.add_argument("--valid-sequences", type=int, help="valid sequences evaluated at the end (default 128)")
    data.add_argument("--test-sequences", type=int, help="test sequences evaluated at the end (default 256)")
    model = parser.add_argument_group("model")
    model.add_argument("--gates", choices=GATES, help="how the ConvLSTM's gate convolution is factorized "
                       "(default dense)")
    model.add_argument("--hidden-channels", type=_channels, metavar="C[,C...]",
                       help="hidden channels, one per layer (default 32,32)")
    model.add_argument("--kernel-size", type=int, help="odd gate kernel side (default 5)")
    model.add_argument("--groups", type=int, help="channel groups, for --gates grouped")
    model.add_argument("--rank", type=int, help="bottleneck channels, for --gates bottleneck")
    model.add_argument("--peephole", action="store_const", const=True, default=None,
                       help="per-channel peephole weights on the cell state")
    model.add_argument("--patch", type=int, help="pixels per patch side: frames enter as patches (default 4)")
    model.add_argument("--encoder-channels", type=int, help="channels of the encoder convolution (default 16)")
    train = parser.add_argument_group("training")
    train.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 0.001)")
    train.add_argument("--clip-norm", type=float, help="gradient norm clipping (default 1.0)")
    train.add_argument("--seed", type=int, help="data and initial weights (default 0)")
    train.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints (default 10)")
    train.add_argument("--log-every", type=int, metavar="STEPS", help="steps between log records (default 20)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the logs are still written)")


def _given(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    from factorlm.video.config import VideoConfig
    from factorlm.video.model import count_video_model, format_counts

    given = _given(args)
    if args.count:
        if args.resume:
            raise CLIError("--count describes a model from the options; it does not take --resume")
        config = VideoConfig(**given)
        print(format_counts(config, count_video_model(config)))
        return 0
    if not args.out or not args.out.strip():
        raise CLIError(f"--out must name the run directory, got {args.out!r}")
    from factorlm.video.run import VideoRun

    if args.resume:
        run_ = VideoRun.resume(args.out, given, device=args.device, show_progress=not args.quiet)
    else:
        config = VideoConfig(**given)
        count_video_model(config)  # the model's own checks (odd kernel, groups that divide), before any file is made
        run_ = VideoRun(config, args.out, device=args.device, show_progress=not args.quiet)
    results = run_.fit()
    _print_results(run_.config, results)
    return 0


def _print_results(config, results: dict) -> None:
    fps = results["frames_per_sec"]
    lines = [f"trained {results['steps']} steps ({results['train_seconds']:.0f} s, "
             f"{fps or 0:,.1f} frames/s) on moving {results['source']}; checkpoint {results['checkpoint']}",
             f"{results['counts']['total_params']:,} parameters ({results['counts']['convlstm_params']:,} in the "
             f"ConvLSTM), {results['counts']['total_macs_per_frame']:,} multiply-adds per frame"]
    for split in ("valid", "test"):
        r = results[split]
        lines.append(f"{split} ({r['sequences']} sequences): MSE {r['mse_mean']:.5f}, MAE {r['mae_mean']:.5f}, "
                     f"SSIM {r['ssim_mean']:.4f} (means over the {len(r['mse'])} predicted frames)")
    test = results["test"]
    lines += ["", "| frame | MSE | MAE | SSIM |", "|---|---|---|---|"]
    lines += [f"| {config.frames_in + t + 1} | {m:.5f} | {a:.5f} | {s:.4f} |"
              for t, (m, a, s) in enumerate(zip(test["mse"], test["mae"], test["ssim"]))]
    lines.append(f"prediction strip: {results['strip']}")
    print("\n".join(lines))

