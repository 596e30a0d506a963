"""The single factorlm command line: ``factorlm COMMAND ...`` (also ``python -m factorlm``).

Each command is a function ``run_NAME(args) -> int`` registered in COMMANDS with the function
that adds its arguments; errors a user can fix are raised as CLIError (or ValueError) and
printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from factorlm.models.config import PAPER_PRESETS, MODEL_PRESETS, model_preset


class CLIError(Exception):
    """A user-facing error: printed as ``factorlm: error: MESSAGE`` with exit status 2."""


def _int_list(text: str):
    """'512' -> 512, '4,8' -> (4, 8): one value, or one per layer."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None
    return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------- count
def add_count_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets",
        nargs="*",
        metavar="PRESET",
        help=f"model presets to count (default: the paper's {', '.join(PAPER_PRESETS)}); "
        f"known: {', '.join(MODEL_PRESETS)}",
    )
    sizes = parser.add_argument_group("sizes (override every listed preset; with none listed, biglstm)")
    sizes.add_argument("--cell", choices=("lstm", "flstm", "glstm"))
    sizes.add_argument("--vocab", type=int, dest="vocab_size", help="vocabulary size V")
    sizes.add_argument("--emb", type=int, dest="embedding_size", help="embedding size E")
    sizes.add_argument("--hidden", type=int, dest="hidden_size", help="cells per layer n")
    sizes.add_argument("--proj", type=int, dest="proj_size", help="projection size p (0: none)")
    sizes.add_argument("--layers", type=int, dest="num_layers", help="number of recurrent layers")
    sizes.add_argument("--rank", type=_int_list, help="F-LSTM rank r (or r1,r2,... per layer)")
    sizes.add_argument("--groups", type=_int_list, help="G-LSTM groups k (or k1,k2,... per layer)")
    sizes.add_argument("--num-sampled", type=int, dest="num_sampled", help="sampled-softmax candidates")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON to PATH ('-' for stdout)")


def run_count(args: argparse.Namespace) -> int:
    from factorlm.count import BIAS_NOTE, count_model, format_table

    override_keys = ("cell", "vocab_size", "embedding_size", "hidden_size", "proj_size", "num_layers",
                     "rank", "groups", "num_sampled")
    overrides = {k: getattr(args, k) for k in override_keys if getattr(args, k) is not None}
    names = args.presets or (["biglstm"] if overrides else list(PAPER_PRESETS))
    rows = []
    for name in names:
        config = model_preset(name)
        label = name
        if overrides:
            if "cell" in overrides:  # a new cell type does not inherit the preset's rank/groups
                overrides = {"rank": None, "groups": None, **overrides}
            config = config.replace(**overrides)
            label = name + " (" + ", ".join(f"{k}={v}" for k, v in overrides.items() if v is not None) + ")"
        rows.append((label, config, count_model(config)))
    print(format_table(rows))
    print()
    print(BIAS_NOTE)
    if args.json:
        data = [{"model": label, "config": config.to_dict(), **counts} for label, config, counts in rows]
        text = json.dumps(data, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


#: name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "count": ("print parameter and multiply-add counts of models", add_count_arguments, run_count),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factorlm",
        description="Fast, compact LSTM language models (F-LSTM / G-LSTM, arXiv 1703.10722).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, NotImplementedError, FileNotFoundError) as exc:
        print(f"factorlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"factorlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
