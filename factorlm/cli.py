"""The single factorlm command line: ``factorlm COMMAND ...`` (also ``python -m factorlm``).

Each command is a function ``run_NAME(args) -> int`` registered in COMMANDS with the function
that adds its arguments. Errors a user can fix (factorlm.errors.FactorlmError and its subclasses,
a ValueError from a library check, an OSError from the machine) and warnings are printed as one
line each, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from factorlm.configs import DEFAULT_PRESET, PAPER_PRESETS, PRESETS, resolve
from factorlm.compress import cli as compress_cli
from factorlm.data import cli as data_cli
from factorlm.errors import CLIError, FactorlmError
from factorlm.evaluate import check_temperature
from factorlm.export import cli as export_cli
from factorlm.nn.cell_args import parse_int_list
from factorlm.nn.registry import CELLS, cell_arg_declarations
from factorlm.outputs import check_writable_file
from factorlm.train.config import OPTIMIZERS
from factorlm.validate import check_int
from factorlm.video import cli as video_cli


# ------------------------------------------------------------------- shared
def _add_cell_choice(group) -> None:
    group.add_argument("--cell", choices=tuple(CELLS), help="the recurrent cell type")


#: the options every cell type takes (LSTMBase's), beside each cell's own arguments
_CELL_OPTIONS = ("coupled_gates", "shared_gates", "proj_rank")


def _add_cell_arguments(group) -> None:
    """One option per argument a registered cell takes (--rank, --groups, ...), from factorlm.nn.CELLS,
    and --coupled-gates, --shared-gates and --proj-rank, which every cell takes."""
    for arg in cell_arg_declarations().values():
        cells = [name for name, cls in CELLS.items() if arg.name in {a.name for a in cls.cell_args}]
        group.add_argument("--" + arg.name.replace("_", "-"), dest=arg.name, type=_option_type(arg),
                           help=f"{arg.help}; for --cell {' / '.join(cells)}")
    group.add_argument("--coupled-gates", dest="coupled_gates", action="store_const", const=True, default=None,
                       help="couple the input and forget gates (CIFG: f = 1 - i, 3 gate blocks instead of 4, a "
                       "quarter fewer gate parameters); any cell type")
    group.add_argument("--shared-gates", dest="shared_gates", action="store_const", const=True, default=None,
                       help="one gate map for all gates, each gate g scaled and shifted per cell (s_g * a + b_g): "
                       "about G times fewer gate weights; any cell type")
    group.add_argument("--proj-rank", dest="proj_rank", type=_int_list_option, metavar="R",
                       help="factor the projection W_hr = P2 P1 at rank R, one int or one per layer (needs --proj "
                       "> 0, 0 < R < min(hidden, proj)); any cell type")


def _int_list_option(text: str):
    """argparse type for an int or comma-separated ints per layer (--proj-rank 32 / 32,16)."""
    try:
        return parse_int_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _option_type(arg):
    """arg.parse as an argparse type: its error message becomes argparse's."""

    def parse(text: str):
        try:
            return arg.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = arg.name
    return parse


def _given(args: argparse.Namespace, names) -> dict:
    """{name: value} of the options among ``names`` that were given (not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# ----------------------------------------------------------------------- count
_COUNT_SIZES = ("vocab_size", "embedding_size", "hidden_size", "proj_size", "num_layers")


def add_count_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets",
        nargs="*",
        metavar="PRESET",
        help=f"model presets to count (default: the paper's {', '.join(PAPER_PRESETS)}); "
        f"known: {', '.join(PRESETS)}",
    )
    sizes = parser.add_argument_group("sizes (override every listed preset; with none listed, biglstm)")
    _add_cell_choice(sizes)
    sizes.add_argument("--vocab", type=int, dest="vocab_size", help="vocabulary size V")
    sizes.add_argument("--emb", type=int, dest="embedding_size", help="embedding size E")
    sizes.add_argument("--hidden", type=int, dest="hidden_size", help="cells per layer n")
    sizes.add_argument("--proj", type=int, dest="proj_size", help="projection size p (0: none)")
    sizes.add_argument("--layers", type=int, dest="num_layers", help="number of recurrent layers")
    _add_cell_arguments(sizes)
    sizes.add_argument("--num-sampled", type=int, dest="num_sampled", help="sampled-softmax candidates")
    budget = parser.add_argument_group("sizing to a budget")
    budget.add_argument("--rnn-params", metavar="N", type=_count_option("--rnn-params"),
                        help="size each model to at most N recurrent parameters (20M, 500k, 1500000): the "
                        "largest --vary value that fits")
    budget.add_argument("--vary", metavar="SIZE", default="hidden_size",
                        help="what --rnn-params changes: hidden_size (default, in multiples of 8), proj_rank "
                        "(with --proj) or an integer argument of the cell, e.g. rank")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON to PATH ('-' for stdout)")


def _count_option(name: str):
    """argparse type for a parameter count such as 20M (factorlm.budget.parse_count)."""
    def parse(text: str) -> int:
        from factorlm.budget import parse_count

        try:
            return parse_count(text, name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def run_count(args: argparse.Namespace) -> int:
    from factorlm.count import BIAS_NOTE, count_model, format_table

    overrides = _given(args, ("cell", *_COUNT_SIZES, *cell_arg_declarations(), *_CELL_OPTIONS, "num_sampled"))
    names = args.presets or (["biglstm"] if overrides else list(PAPER_PRESETS))
    suffix = " (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")" if overrides else ""
    if args.json and args.json != "-":
        check_writable_file(args.json, "--json file")
    if args.vary != "hidden_size" and args.rnn_params is None:
        raise CLIError(f"--vary {args.vary} sizes a model to --rnn-params N; give the budget too")
    rows, fits = [], []
    for name in names:
        config, _ = resolve(name, overrides={"model": overrides})
        label = name + suffix
        if args.rnn_params is not None:
            from factorlm.budget import fit_rnn_params

            fit = fit_rnn_params(config, args.rnn_params, vary=args.vary)
            config, label = fit.config, f"{label} [{fit.varied}={fit.value}]"
            fits.append(f"{name}: {fit.describe()}")
        rows.append((label, config, count_model(config)))
    print(format_table(rows))
    if fits:
        print()
        print("\n".join(fits))
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


# ----------------------------------------------------------------------- train
#: the gradual-pruning options (TrainConfig.prune_*, factorlm.compress.masks)
_PRUNE_OVERRIDES = ("prune_to", "prune_from", "prune_start", "prune_steps", "prune_every", "prune_scope")
#: the train options that override the preset's TrainConfig (the budgets among them)
_TRAIN_OVERRIDES = ("batch_size", "num_steps", "lr", "optimizer", "seed", "ema_decay", "checkpoint_minutes",
                    "log_every", "max_time", "max_steps", "epochs", "qat", *_PRUNE_OVERRIDES)


def _add_budget_arguments(parser) -> None:
    budget = parser.add_argument_group("budgets (any that ends first stops training)")
    budget.add_argument("--max-time", type=float, metavar="SECONDS", help="wall-clock training seconds")
    budget.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    budget.add_argument("--epochs", type=int, metavar="N", help="passes over the training split")


def _add_recipe_arguments(group) -> None:
    """The training-recipe overrides every training command takes."""
    group.add_argument("--batch-size", type=int)
    group.add_argument("--num-steps", type=int, help="unrolled steps per batch")
    group.add_argument("--lr", type=float)
    group.add_argument("--optimizer", choices=OPTIMIZERS)
    group.add_argument("--seed", type=int)
    group.add_argument("--ema-decay", type=float)
    group.add_argument("--checkpoint-minutes", type=float)
    group.add_argument("--log-every", type=int, metavar="STEPS")
    group.add_argument("--qat", action="store_const", const=True, default=None,
                       help="quantization-aware training: int8 rounding in the forward, straight-through gradients "
                       "(then factorlm compress quantize converts the run to int8)")


def _add_prune_arguments(parser) -> None:
    prune = parser.add_argument_group(
        "gradual magnitude pruning (Zhu & Gupta 2017: s_t = S + (s_i - S)(1 - (t - t0)/N)^3, every DT steps "
        "from step t0 to t0 + N; masks kept through checkpoints and resume)")
    prune.add_argument("--prune-to", type=float, metavar="S", help="final sparsity of each pruned matrix, in (0, 1)")
    prune.add_argument("--prune-from", type=float, metavar="S_I", help="sparsity of the first event (default 0)")
    prune.add_argument("--prune-start", type=int, metavar="T0",
                       help="step after which the first event prunes (default 0: before the first step)")
    prune.add_argument("--prune-steps", type=int, metavar="N",
                       help="steps from the first event to the last, where S is reached (default 1000)")
    prune.add_argument("--prune-every", type=int, metavar="DT", help="steps between events (default 100)")
    prune.add_argument("--prune-scope", choices=("rnn", "all"),
                       help="rnn (default): the recurrent layers' weight matrices; all: embedding and softmax too")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="PATH",
                        help="corpus directory (1B Word layout, or train/valid/test text splits); "
                        "default: the built-in synthetic corpus")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--preset", default=None, help=f"named recipe (default: {DEFAULT_PRESET}): {', '.join(PRESETS)}")
    how.add_argument("--config", metavar="FILE",
                     help='JSON file {"preset": NAME (optional base), "model": {...}, "train": {...}}')
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoint, logs, plots)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out exactly where it stopped; options that would change it are "
                        "refused, only budgets, --log-every and --checkpoint-minutes may differ")
    _add_budget_arguments(parser)
    over = parser.add_argument_group("overrides of the preset")
    _add_cell_choice(over)
    _add_cell_arguments(over)
    _add_recipe_arguments(over)
    _add_prune_arguments(parser)
    parser.add_argument("--max-vocab", type=int, help="keep the most frequent words when building a vocabulary")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the run's logs are still written)")


#: model sizes a command may set beside the cell (distill's student)
_MODEL_SIZES = ("embedding_size", "hidden_size", "proj_size", "num_layers")


def _model_flags(args) -> dict:
    return _given(args, ("cell", *cell_arg_declarations(), *_CELL_OPTIONS, *_MODEL_SIZES))


def _configs_from_args(args):
    """A new run's (model, train) configs: --preset or --config, then the override flags."""
    overrides = {"model": _model_flags(args), "train": _given(args, _TRAIN_OVERRIDES)}
    return resolve(args.preset, args.config, overrides)


def _elastic_restart(out: str) -> bool:
    """Whether torchrun restarted this worker group (--max-restarts) after a failure, with a
    checkpoint to continue from: then the run resumes as if --resume had been given."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and (Path(out) / "checkpoint.pt").exists()


def run_train(args: argparse.Namespace) -> int:
    return _run_training(_train, args)


def _run_training(train: Callable, args: argparse.Namespace) -> int:
    """Run ``train(args) -> results`` in every process; rank 0 prints the results."""
    from factorlm.distributed import ProcessInfo, shutdown

    try:  # under torchrun every rank runs this; rank 0 alone prints the results
        results = train(args)
    except BaseException:
        shutdown()
        raise
    shutdown(together=True)
    if not ProcessInfo.from_env().is_main:
        return 0
    _print_results(results)
    return 0


def _train(args: argparse.Namespace) -> dict:
    """Start or continue the run in --out and train it; the results dict."""
    from factorlm.data import open_corpus
    from factorlm.outputs import ensure_directory
    from factorlm.train.loop import Trainer

    if not args.out.strip():  # Path("") would be the current directory
        raise CLIError(f"--out must name the run directory, got {args.out!r}")
    if args.resume or _elastic_restart(args.out):
        trainer = _resume(args, Trainer)
    else:
        model_config, train_config = _configs_from_args(args)
        ensure_directory(args.out, "run directory")  # before the corpus is read: that may take minutes
        corpus = open_corpus(args.data, max_vocab=args.max_vocab)
        trainer = Trainer(model_config, train_config, corpus, args.out, device=args.device, show_progress=not args.quiet)
    return trainer.fit()


def _resume(args: argparse.Namespace, trainer_class, **resume_kwargs):
    """The trainer continuing the run in --out (``trainer_class.resume``), after checking that no
    option given would change it."""
    from factorlm.data import open_corpus
    from factorlm.outputs import ensure_directory
    from factorlm.train.checkpoint import load_checkpoint, saved_model_config, saved_train_config
    from factorlm.train.resume import resume_request

    path = Path(args.out) / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    # every option that would change the run must agree with it; budgets and the like apply.
    # A preset or config file is compared as the whole run it describes, with the flags on top.
    base = _configs_from_args(args) if getattr(args, "preset", None) or getattr(args, "config", None) else None
    changes = resume_request(saved_model_config(checkpoint, path), saved_train_config(checkpoint, path),
                             model=_model_flags(args), train=_given(args, _TRAIN_OVERRIDES), base=base,
                             source="the command line")
    ensure_directory(args.out, "run directory")
    # without --data, continue on the corpus the run was started with
    corpus = open_corpus(args.data if args.data is not None else checkpoint.get("data_path"),
                         max_vocab=getattr(args, "max_vocab", None))
    return trainer_class.resume(args.out, corpus, checkpoint=checkpoint, changes=changes, device=args.device,
                                show_progress=not args.quiet, **resume_kwargs)


def _print_results(results: dict) -> None:
    lines = [f"trained {results['steps']} steps ({results['train_seconds']:.0f} s, "
             f"{results['words_per_sec'] or 0:,.0f} words/s); checkpoint {results['checkpoint']}"]
    for split in ("valid", "test"):
        if split in results:
            r = results[split]
            line = f"{split}: perplexity {r['perplexity']:.2f} (loss {r['loss']:.4f} nats, {r['tokens']:,} tokens)"
            if "optimal_perplexity" in r:
                line += (f"; best possible {r['optimal_perplexity']:.2f}, "
                         f"gap {r['loss'] - r['optimal_loss']:.3f} nats/token")
            lines.append(line)
    print("\n".join(lines))


# -------------------------------------------------------------------- finetune
def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN",
                        help="run directory or checkpoint file to start from (any model: dense, SVD, blocks, pruned, "
                        "distilled); it is only read")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the new run directory (continue it with factorlm train --out DIR --resume)")
    parser.add_argument("--data", metavar="PATH", help="corpus directory (default: the one RUN was trained on)")
    parser.add_argument("--no-ema", action="store_true",
                        help="start from RUN's raw weights even when it kept an average (default: the averaged ones, "
                        "which evaluate scores)")
    _add_run_options(parser, "overrides of RUN's training recipe")


def _add_run_options(parser: argparse.ArgumentParser, recipe_title: str) -> None:
    """What a run started from another one (finetune, distill) takes: budgets, the recipe's overrides
    (under ``recipe_title``), pruning, device and quiet."""
    _add_budget_arguments(parser)
    _add_recipe_arguments(parser.add_argument_group(recipe_title))
    _add_prune_arguments(parser)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress output (the run's logs are still written)")


def run_finetune(args: argparse.Namespace) -> int:
    return _run_training(_finetune, args)


def _finetune(args: argparse.Namespace) -> dict:
    from factorlm.data import open_corpus
    from factorlm.outputs import ensure_directory
    from factorlm.train.checkpoint import load_checkpoint
    from factorlm.train.finetune import checkpoint_file, finetune_config, finetune_trainer
    from factorlm.train.loop import Trainer

    if not args.out.strip():
        raise CLIError(f"--out must name the run directory, got {args.out!r}")
    if _elastic_restart(args.out):  # torchrun restarted the workers: continue the fine-tuning run
        return _resume(args, Trainer).fit()
    source = checkpoint_file(args.checkpoint)
    checkpoint = load_checkpoint(source)
    finetune_config(checkpoint, source, _given(args, _TRAIN_OVERRIDES))  # a missing budget fails before any work
    ensure_directory(args.out, "run directory")
    corpus = open_corpus(args.data if args.data is not None else checkpoint.get("data_path"))
    trainer = finetune_trainer(source, corpus, args.out, changes=_given(args, _TRAIN_OVERRIDES),
                               use_ema=not args.no_ema, checkpoint=checkpoint, device=args.device,
                               show_progress=not args.quiet)
    return trainer.fit()


# --------------------------------------------------------------------- distill
_DISTILL_OPTIONS = ("alpha", "temperature", "top_k")


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", metavar="RUN", help="the teacher's run directory or checkpoint file (only read)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the student's run directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the distillation in --out (its teacher is found where it was; --teacher "
                        "if it moved)")
    parser.add_argument("--data", metavar="PATH", help="corpus directory (default: the one the teacher was trained on)")
    parser.add_argument("--init-from", metavar="RUN",
                        help="start the student from this run's model and weights (e.g. factorlm compress svd of the "
                        "teacher; the averaged weights when it kept them; its pruning masks are kept) instead of a "
                        "fresh student: no student options, --preset or --config then; only read")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--preset", default=None,
                     help=f"the student's recipe as a named preset (default: the teacher's model and recipe): "
                     f"{', '.join(PRESETS)}")
    how.add_argument("--config", metavar="FILE", help='the student as a JSON file {"preset": ..., "model": {...}, '
                     '"train": {...}}')
    student = parser.add_argument_group("the student (on top of the teacher's model, or --preset / --config)")
    _add_cell_choice(student)
    _add_cell_arguments(student)
    student.add_argument("--emb", type=int, dest="embedding_size", help="embedding size E")
    student.add_argument("--hidden", type=int, dest="hidden_size", help="cells per layer n")
    student.add_argument("--proj", type=int, dest="proj_size", help="projection size p (0: none)")
    student.add_argument("--layers", type=int, dest="num_layers", help="number of recurrent layers")
    soft = parser.add_argument_group("the loss: (1 - alpha)·data loss + alpha·T²·KL(teacher_T ‖ student_T)")
    soft.add_argument("--alpha", type=float, help="weight of the teacher's soft targets, in [0, 1] (default 0.5)")
    soft.add_argument("--temperature", type=float, metavar="T", help="softmax temperature (default 2)")
    soft.add_argument("--top-k", type=int, metavar="K",
                      help="KL over the teacher's K largest logits, renormalised (default: every logit with a full "
                      "softmax student, the top 64 with a sampled-softmax one)")
    _add_run_options(parser, "overrides of the training recipe")


def run_distill(args: argparse.Namespace) -> int:
    return _run_training(_distill, args)


def _distill(args: argparse.Namespace) -> dict:
    from factorlm.compress.distill import DistillConfig, DistillTrainer
    from factorlm.data import open_corpus
    from factorlm.outputs import ensure_directory
    from factorlm.train.checkpoint import load_checkpoint, saved_model_config, saved_train_config
    from factorlm.train.finetune import checkpoint_file, require_budget, start_from, without_budgets, without_pruning

    if not args.out.strip():
        raise CLIError(f"--out must name the run directory, got {args.out!r}")
    if args.init_from is not None:
        _check_init_from(args)
    if args.resume or _elastic_restart(args.out):
        saved = load_checkpoint(Path(args.out) / "checkpoint.pt").get("distill") or {}
        asked = {name: value for name, value in _given(args, _DISTILL_OPTIONS).items() if saved.get(name) != value}
        if asked:
            raise CLIError(f"a resumed distillation continues unchanged, but the command line asks for "
                           f"{', '.join(f'{k}={v!r} (saved: {saved.get(k)!r})' for k, v in asked.items())}")
        return _resume(args, DistillTrainer, teacher=args.teacher).fit()
    if args.teacher is None:
        raise CLIError("distill needs the teacher: --teacher RUN")
    teacher = checkpoint_file(args.teacher)
    payload = load_checkpoint(teacher)
    base = None
    if not (args.preset or args.config):  # the student starts as the teacher's model and recipe, less its budgets
        recipe = (saved_train_config(payload, teacher) if payload.get("train_config") is not None
                  else resolve(DEFAULT_PRESET)[1])
        base = (saved_model_config(payload, teacher), without_budgets(without_pruning(recipe)))
    overrides = {"model": _model_flags(args), "train": _given(args, _TRAIN_OVERRIDES)}
    model_config, train_config = resolve(args.preset, args.config, overrides, base=base)
    require_budget(train_config, "distillation")
    settings = DistillConfig(teacher=str(teacher.resolve()), **_given(args, _DISTILL_OPTIONS))
    ensure_directory(args.out, "run directory")
    corpus = open_corpus(args.data if args.data is not None else payload.get("data_path"))
    init = None
    if args.init_from is not None:  # the student is that run's model, weights and masks (as finetune starts)
        model_config, init = start_from(args.init_from, corpus, args.out, what="a distillation from --init-from")
    trainer = DistillTrainer(model_config, train_config, corpus, args.out, distill=settings,
                             teacher_checkpoint=payload, device=args.device, show_progress=not args.quiet,
                             init_from=init)
    return trainer.fit()


#: the option of each student-architecture setting, as distill spells it
_STUDENT_OPTIONS = {"embedding_size": "--emb", "hidden_size": "--hidden", "proj_size": "--proj",
                    "num_layers": "--layers"}


def _check_init_from(args: argparse.Namespace) -> None:
    """--init-from gives the student's architecture and starts a new run: refuse, in one line, what
    would also set them (student options, --preset, --config) and --resume."""
    if args.resume:
        raise CLIError(f"--init-from {args.init_from} starts a new distillation, --resume continues the one in "
                       f"{args.out} from its own checkpoint: give one of them")
    given = [_STUDENT_OPTIONS.get(name, "--" + name.replace("_", "-")) for name in _model_flags(args)]
    given += [f"--{name}" for name in ("preset", "config") if getattr(args, name)]
    if given:
        raise CLIError(f"--init-from {args.init_from} gives the student's architecture (its model and weights), so "
                       f"{', '.join(given)} cannot be given with it; drop {'it' if len(given) == 1 else 'them'}, or "
                       f"drop --init-from for a fresh student")


# --------------------------------------------------------------------- compare
#: --scale when none is given: the paper's sizes on a GPU, an eighth of them on a CPU
DEFAULT_CPU_SCALE = "1/8"


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="PATH", help="corpus directory; default: the built-in synthetic corpus")
    parser.add_argument("--presets", metavar="A,B,...",
                        help=f"comma-separated presets (default: the paper's {', '.join(PAPER_PRESETS)}); "
                        f"known: {', '.join(PRESETS)}")
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="a model to add, as a train config file (repeatable; named after the file)")
    family = parser.add_argument_group("a family of cell types (each preset once per cell, named PRESET-CELL)")
    family.add_argument("--cells", metavar="A,B,...",
                        help=f"comma-separated cell types: {', '.join(CELLS)}; their arguments below; the "
                        "base models are --presets (default: biglstm, scaled)")
    _add_cell_arguments(family)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-time", type=float, metavar="SECONDS", help="training seconds per model")
    budget.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps per model")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="comparison directory (results.md/csv, figures, one run folder per model); "
                        "re-running the same command continues it")
    parser.add_argument("--scale", metavar="S",
                        help="the paper's models at S times their sizes, ratios kept (emb = proj = 1024 S, "
                        f"cells 8 × proj, F rank proj / 2); default 1 on CUDA, {DEFAULT_CPU_SCALE} on a CPU")
    parser.add_argument("--batch-size", type=int, help="rows per batch for every model (default: each recipe's)")
    parser.add_argument("--max-vocab", type=int, help="keep the most frequent words when building a vocabulary")
    sizing = parser.add_argument_group("equal size (every model's cells per layer n changed to fit)")
    sizing.add_argument("--rnn-params", metavar="N", type=_count_option("--rnn-params"),
                        help="size every model to at most N recurrent parameters (20M, 500k, ...)")
    sizing.add_argument("--match", choices=("rnn-params",),
                        help="rnn-params: size every model to the first model's recurrent parameters "
                        "(or to --rnn-params N when given)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run_compare(args: argparse.Namespace) -> int:
    from factorlm.compare import Budget, build_entries, parse_scale, run_comparison
    from factorlm.data import open_corpus
    from factorlm.train.loop import pick_device

    device = pick_device(args.device)
    scale = parse_scale(args.scale or ("1" if device.type == "cuda" else DEFAULT_CPU_SCALE))
    cells = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else None
    presets = [name.strip() for name in args.presets.split(",") if name.strip()] if args.presets is not None else (
        [] if args.config else ["biglstm"] if cells else list(PAPER_PRESETS))
    entries = build_entries(presets, args.config, scale, cells, _given(args, cell_arg_declarations()))
    if args.coupled_gates:  # every model of the comparison, named NAME-cifg
        entries = [dataclasses.replace(e, name=f"{e.name}-cifg", model=e.model.replace(coupled_gates=True))
                   for e in entries]
    if args.shared_gates:  # every model, named NAME-shared
        entries = [dataclasses.replace(e, name=f"{e.name}-shared", model=e.model.replace(shared_gates=True))
                   for e in entries]
    if args.proj_rank is not None:  # every model, named NAME-hrR
        label = ",".join(map(str, args.proj_rank)) if isinstance(args.proj_rank, tuple) else args.proj_rank
        entries = [dataclasses.replace(e, name=f"{e.name}-hr{label}", model=e.model.replace(proj_rank=args.proj_rank))
                   for e in entries]
    if args.rnn_params is not None or args.match:
        entries = _size_entries(entries, args.rnn_params, quiet=args.quiet)
    if args.batch_size is not None:
        entries = [dataclasses.replace(e, train=e.train.replace(batch_size=args.batch_size)) for e in entries]
    budget = Budget(max_time=args.max_time, max_steps=args.max_steps)
    corpus = open_corpus(args.data, max_vocab=args.max_vocab)
    if not args.quiet:
        print(f"comparing {len(entries)} models on {corpus.name} ({budget.text()} each, the paper's models at "
              f"scale {scale:g}), writing to {args.out}", file=sys.stderr)
    rows = run_comparison(entries, corpus, args.out, budget, device=str(device), show_progress=not args.quiet)
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"table and figures in {args.out}: results.md, results.csv, loss_vs_time.png, loss_vs_steps.png, "
          f"ppl_vs_params.png ({len(rows)} models)")
    return 0


def _size_entries(entries: list, budget: int | None, quiet: bool) -> list:
    """--rnn-params / --match rnn-params: every entry's n changed to fit the budget (the first
    entry's own RNN parameter count when none is given)."""
    from factorlm.budget import fit_rnn_params, rnn_params

    if budget is None:
        budget = rnn_params(entries[0].model)
    sized = []
    for entry in entries:
        fit = fit_rnn_params(entry.model, budget)
        if not quiet:
            print(f"{entry.name}: {fit.describe()}", file=sys.stderr)
        sized.append(dataclasses.replace(entry, model=fit.config))
    return sized


# -------------------------------------------------------------------- evaluate
def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt or its run directory")
    parser.add_argument("--data", metavar="PATH", help="corpus directory (default: the built-in corpus)")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--batch-size", type=int, default=64, help="rows evaluated at once (the result does not depend on it)")
    parser.add_argument("--num-steps", type=int, default=20, help="steps per window")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when the run kept an EMA")
    parser.add_argument("--json", metavar="PATH", help="write {perplexity, loss, tokens, ...} as JSON")
    parser.add_argument("--device", default=None)


def _check_vocab(corpus, vocab, checkpoint):
    vocab.check_same(corpus.vocab, name=f"checkpoint {checkpoint}", other_name=f"the corpus {corpus.name!r}",
                     hint="; evaluate on the data it was trained with")


def run_evaluate(args: argparse.Namespace) -> int:
    from factorlm.data import open_corpus, split_stream
    from factorlm.evaluate import evaluate_stream
    from factorlm.runs import load_model
    from factorlm.train.loop import pick_device

    check_int("--batch-size", args.batch_size)
    check_int("--num-steps", args.num_steps)
    if args.json:  # before the evaluation, not after it
        check_writable_file(args.json, "--json file")
    device = pick_device(args.device)
    model, vocab, _ = load_model(args.checkpoint, device=device, use_ema=not args.no_ema)
    corpus = open_corpus(args.data)
    _check_vocab(corpus, vocab, args.checkpoint)
    if args.split not in corpus.splits:
        raise CLIError(f"corpus {corpus.name!r} has no {args.split!r} split (it has {', '.join(corpus.splits)})")
    result = evaluate_stream(model, split_stream(corpus, args.split), batch_size=args.batch_size,
                             num_steps=args.num_steps, device=device, progress=args.split)
    data = {"split": args.split, "checkpoint": str(args.checkpoint), **result.to_dict()}
    optimal = (getattr(corpus, "optimal_loss", None) or {}).get(args.split)
    if optimal is not None:
        data["optimal_loss"] = optimal
    print(f"{args.split}: perplexity {result.perplexity:.3f}, loss {result.loss:.5f} nats/token, "
          f"{result.tokens:,} tokens ({result.passes} passes, {result.rescored_tokens:,} token positions "
          f"re-scored after the first)")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------- score
def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH")
    parser.add_argument("file", metavar="FILE", help="one tokenized sentence per line ('-' for standard input)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)


def run_score(args: argparse.Namespace) -> int:
    from factorlm.evaluate import score_sentences
    from factorlm.runs import load_model
    from factorlm.train.loop import pick_device

    check_int("--batch-size", args.batch_size)
    text = _read_text(args.file)  # before the model is loaded: a wrong path fails at once
    device = pick_device(args.device)
    model, vocab, _ = load_model(args.checkpoint, device=device)
    lines = [line.split() for line in text.splitlines()]
    scores = score_sentences(model, [vocab.encode(words) for words in lines], vocab.boundary_id,
                             batch_size=args.batch_size, device=device)
    print("logprob\ttokens\tperplexity\tsentence")
    total, tokens = 0.0, 0
    for words, (logprob, n) in zip(lines, scores):
        total, tokens = total + logprob, tokens + n
        print(f"{logprob:.4f}\t{n}\t{math.exp(-logprob / n):.2f}\t{' '.join(words)}")
    if tokens:
        print(f"# {len(lines)} sentences, {tokens} tokens, perplexity {math.exp(-total / tokens):.3f}", file=sys.stderr)
    return 0


def _read_text(file: str) -> str:
    """The UTF-8 text of ``file`` ('-': standard input); CLIError naming the file otherwise."""
    if file == "-":
        return sys.stdin.read()
    if Path(file).is_dir():
        raise CLIError(f"{file} is a directory; expected a text file with one sentence per line")
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise CLIError(f"{file} does not exist") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"{file} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise CLIError(f"{file} cannot be read: {exc.strerror or exc}") from None


# -------------------------------------------------------------------- generate
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH")
    parser.add_argument("--prompt", default="", help="words to continue")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from factorlm.evaluate import generate
    from factorlm.runs import load_model
    from factorlm.train.loop import pick_device

    check_int("--num-samples", args.num_samples)
    check_int("--max-tokens", args.max_tokens, 0)
    check_int("--top-k", args.top_k, optional=True)
    check_temperature(args.temperature, "--temperature")
    device = pick_device(args.device)
    model, vocab, _ = load_model(args.checkpoint, device=device)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    prompt = args.prompt.split()
    for _ in range(args.num_samples):
        ids = generate(model, vocab.encode(prompt), vocab.boundary_id, max_tokens=args.max_tokens,
                       temperature=args.temperature, top_k=args.top_k, generator=generator, device=device)
        print(" ".join(prompt + vocab.decode(ids)))
    return 0


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run_doctor(args: argparse.Namespace) -> int:
    from factorlm.doctor import report

    print("factorlm doctor: building or loading the C++ recurrence and checking every time loop ...", file=sys.stderr,
          flush=True)
    lines, ok = report()
    print("\n".join(lines))
    if not ok:
        print("factorlm doctor: error: a time loop disagrees with the reference (lines marked WRONG): please "
              "report it with this output", file=sys.stderr)
    return 0 if ok else 1


#: name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "count": ("print parameter and multiply-add counts of models", add_count_arguments, run_count),
    "train": ("train a language model (default: the debug preset on the built-in corpus)", add_train_arguments, run_train),
    "finetune": ("train further from any checkpoint (a compressed model, a pruned one) into a new run",
                 add_finetune_arguments, run_finetune),
    "distill": ("train a small student against a trained teacher's softmax (KL at a temperature plus the data loss)",
                add_distill_arguments, run_distill),
    "compare": ("train several models under the same budget and compare them (the paper's experiment)",
                add_compare_arguments, run_compare),
    "evaluate": ("exact perplexity of a checkpoint on a corpus split", add_evaluate_arguments, run_evaluate),
    "score": ("per-sentence log-probabilities of a text file", add_score_arguments, run_score),
    "generate": ("sample sentences from a checkpoint", add_generate_arguments, run_generate),
    "video": ("train and evaluate a ConvLSTM video predictor on moving digits", video_cli.add_arguments, video_cli.run),
    "data": ("download corpora and show their statistics", data_cli.add_arguments, data_cli.run),
    "compress": ("make a trained model smaller: svd (-> F-LSTM), blocks (-> G-LSTM), prune", compress_cli.add_arguments, compress_cli.run),
    "doctor": ("which time loop the layers run here (C++, Triton, PyTorch), why, and whether each is right",
               add_doctor_arguments, run_doctor),
    "export": ("write a trained model in a deployment format (onnx: a streaming graph)", export_cli.add_arguments,
               export_cli.run),
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
    """Run one command; every expected failure is one line on stderr and exit status 2 (a run's
    non-finite loss: 1), a stop by a signal 128 + its number (SIGINT 130, SIGTERM 143)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores the previous display when the command ends
        warnings.showwarning = functools.partial(_show_warning, args.command)
        try:
            return args.run(args)
        except FactorlmError as exc:
            return _fail(args, exc, exc.exit_status)
        except (ValueError, NotImplementedError, UnicodeDecodeError) as exc:  # bad values caught by the library's checks
            return _fail(args, exc, 2)
        except OSError as exc:  # the machine's answer (missing file, full disk, read-only filesystem): not a bug
            return _fail(args, _os_error_text(exc), 2)
        except KeyboardInterrupt as exc:
            print(f"factorlm {args.command}: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
            return getattr(exc, "exit_status", 130)


def _fail(args: argparse.Namespace, exc, status: int) -> int:
    print(f"factorlm {args.command}: error: {exc}", file=sys.stderr)
    return status


def _os_error_text(exc: OSError) -> str:
    """``PATH: reason`` rather than Python's ``[Errno 28] No space left on device: 'PATH'``."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc) or type(exc).__name__


def _show_warning(command, message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line ``factorlm COMMAND: warning: ...``, without the source line Python adds."""
    print(f"factorlm {command}: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
