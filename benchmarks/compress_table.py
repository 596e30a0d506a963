"""Issue #22's measured table: every compression of one trained dense run, with its size, speed and perplexity.

    python benchmarks/compress_table.py --teacher runs/ptb-small-lstm --data ../shared/data/ptb \\
        --out benchmarks/results/compress_table_ptb.json --finetune-seconds 300 --distill-seconds 600
    python benchmarks/compress_table.py --quick          # a dry run of the plumbing (~30 s on one core)

Rows, one after the other in this process, each a run directory under ``--work`` (default
runs/compress-table/<teacher's name>; the teacher's run is only read):

- ``dense``: the teacher itself;
- ``svd r=R`` at three ranks (by default per layer the smallest keeping 50%, 80% and 95% of the
  spectral energy, or ``--ranks``), each as converted and after ``--finetune-seconds`` of fine-tuning;
- ``blocks k=K`` (G-LSTM by permuted blocks, k = 2 and 4 where the sizes divide), as converted and
  after fine-tuning;
- ``prune s=S`` (unstructured magnitude pruning, S = 0.5, 0.75, 0.9) as pruned and after fine-tuning,
  the masks kept through it (the zeros are stored and run dense: no smaller, no faster);
- ``units f=F`` (whole hidden units removed, F = 0.25, 0.5: n and p shrink), as pruned and after
  fine-tuning;
- ``distill flstm`` / ``distill glstm``: students of the middle SVD rank's shape and of k = 2, trained
  against the teacher for ``--distill-seconds`` from fresh weights;
- ``scratch flstm``: the middle SVD rank's F-LSTM trained from fresh weights with the teacher's recipe
  for as many seconds as that rank's conversion plus fine-tuning took (their sum, recorded;
  ``--scratch-with-teacher`` adds the teacher's own training seconds: the whole cost of that row).

Fine-tuning (factorlm.train.finetune) keeps the teacher's recipe with a constant learning rate,
``--finetune-lr`` (default: the rate of the teacher's last completed epoch under its recipe's
schedule, e.g. 1·0.5⁹ for ptb-small's 13 epochs).
Students and the scratch model get the teacher's recipe unchanged (its lr schedule included).

Columns, all measured on the weights ``factorlm evaluate`` scores (the EMA when the run kept one):
recurrent parameters (``model.rnn``) and how many of them are nonzero, all parameters, the
weights' size on disk (bytes of ``torch.save(model.state_dict())`` alone: no optimizer, masks,
vocabulary or configs), CPU tokens/s at batch 1 (token by token as ``factorlm generate`` steps,
each step the whole model and the full log-softmax, state carried) and at batch 32 (one T × 32
forward with the exact per-token loss, no grad; T = the teacher's num_steps), each the median of
``--repeats`` runs under ``torch.inference_mode()``, and the exact test perplexity
(factorlm.evaluate.evaluate_stream, as ``factorlm evaluate``; the trained rows' is their run's
own final evaluation in results.json, the same function on the same weights).

A row that fails is recorded with its error and the others go on; rows that need it (a fine-tuning
of a failed conversion) say so. The JSON and Markdown are rewritten after every row. Re-running
continues: a row whose directory holds ``row.json`` (written when its build finished) is measured
again but not rebuilt, if it was built from the same teacher with the same budgets (else it fails,
naming the difference); a directory without row.json (a build that stopped) fails too. Delete a
row's directory to build it again.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.nn.base import count_parameters  # noqa: E402

ENERGIES = (0.5, 0.8, 0.95)
GROUPS = (2, 4)
SPARSITIES = (0.5, 0.75, 0.9)
UNIT_FRACTIONS = (0.25, 0.5)
BATCH = 32
#: the --quick dry run: a small built-in corpus (its own vocabulary), a debug-preset teacher, tiny budgets
QUICK = {"train_tokens": 20_000, "valid_tokens": 2_000, "test_tokens": 2_000, "teacher_steps": 30,
         "finetune_seconds": 1.0, "distill_seconds": 1.0, "repeats": 2, "generate_tokens": 8}


# ----------------------------------------------------------------------------------------- the plan
def rank_label(rank) -> str:
    """'12' or '12,20' (one rank per layer)."""
    return ",".join(str(r) for r in rank) if isinstance(rank, (tuple, list)) else str(rank)


def blocks_fit(model_config, groups: int) -> bool:
    """Whether the G-LSTM by blocks can have ``groups`` groups: it divides the embedding, hidden and
    projection sizes (dense_to_glstm's condition)."""
    sizes = [model_config.embedding_size, model_config.hidden_size] + ([model_config.proj_size]
                                                                       if model_config.proj_size else [])
    return all(size % groups == 0 for size in sizes)


def plan_rows(ranks: list, groups: list[int], sparsities=SPARSITIES, fractions=UNIT_FRACTIONS) -> list[dict]:
    """The table's rows in order, each {"name", "kind", "needs" (the row whose run it starts from, or
    None), and its settings}; pure data. ``ranks``: the three SVD ranks (int, or a tuple per layer),
    the middle one sets the students' and the scratch model's shape; ``groups``: the block counts
    that fit the teacher."""
    rows = [{"name": "dense", "kind": "dense", "needs": None}]
    for rank in ranks:
        svd = f"svd r={rank_label(rank)}"
        rows += [{"name": svd, "kind": "svd", "needs": None, "rank": rank},
                 {"name": f"{svd} +ft", "kind": "finetune", "needs": svd}]
    for k in groups:
        rows += [{"name": f"blocks k={k}", "kind": "blocks", "needs": None, "groups": k},
                 {"name": f"blocks k={k} +ft", "kind": "finetune", "needs": f"blocks k={k}"}]
    for s in sparsities:
        rows += [{"name": f"prune s={s:g}", "kind": "prune", "needs": None, "sparsity": s},
                 {"name": f"prune s={s:g} +ft", "kind": "finetune", "needs": f"prune s={s:g}"}]
    for f in fractions:
        rows += [{"name": f"units f={f:g}", "kind": "units", "needs": None, "fraction": f},
                 {"name": f"units f={f:g} +ft", "kind": "finetune", "needs": f"units f={f:g}"}]
    middle = ranks[len(ranks) // 2] if ranks else None
    if middle is not None:
        rows.append({"name": f"distill flstm r={rank_label(middle)}", "kind": "distill", "needs": None,
                     "cell": "flstm", "cell_args": {"rank": middle}})
    rows.append({"name": "distill glstm k=2", "kind": "distill", "needs": None, "cell": "glstm",
                 "cell_args": {"groups": 2}})
    if middle is not None:
        svd = f"svd r={rank_label(middle)}"
        rows.append({"name": f"scratch flstm r={rank_label(middle)}", "kind": "scratch", "needs": f"{svd} +ft",
                     "converted": svd, "cell": "flstm", "cell_args": {"rank": middle}})
    return rows


def directory_name(name: str) -> str:
    """A row's run directory name: 'svd r=12,20 +ft' -> 'svd-r12_20-ft'."""
    return name.replace(" +", "-").replace(" ", "-").replace("=", "").replace(",", "_")


# ------------------------------------------------------------------------------------ measurements
def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the weights alone, as a file would hold them."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def sizes(model) -> dict:
    """Parameter counts (recurrent, recurrent nonzero, all) and the weights' bytes."""
    nonzero = sum(int((p != 0).sum()) for p in model.rnn.parameters())
    return {"rnn_params": count_parameters(model.rnn), "rnn_nonzero": nonzero,
            "params": count_parameters(model), "weights_bytes": weights_bytes(model)}


def speeds(model, stream: torch.Tensor, num_steps: int, repeats: int, generate_tokens: int) -> dict:
    """CPU tokens/s at batch 1 (token by token, each step the model and the full log-softmax, as
    generation steps) and at batch 32 (one (num_steps, 32) forward with the exact per-token loss).
    ``stream``: token ids to feed (the test split), at least num_steps·32 + 1 of them."""
    model.eval()
    device = torch.device("cpu")
    tokens = stream[:generate_tokens].tolist()
    inputs = stream[:num_steps * BATCH].reshape(BATCH, num_steps).t().contiguous()  # (T, B)
    targets = stream[1:num_steps * BATCH + 1].reshape(BATCH, num_steps).t().contiguous()

    def step_by_step():
        state = model.init_state(1)
        for token in tokens:
            hidden, state = model(torch.tensor([[token]]), state)
            model.log_probs(hidden[-1:])

    def batched():
        model(inputs, model.init_state(BATCH), targets)

    with torch.inference_mode():
        one, _ = _timing.median_seconds(step_by_step, device, warmup=1, repeats=repeats)
        many, _ = _timing.median_seconds(batched, device, warmup=1, repeats=repeats)
    return {"tokens_per_s_b1": len(tokens) / one, "tokens_per_s_b32": inputs.numel() / many}


def exact_test_perplexity(model, corpus, num_steps: int) -> dict:
    """factorlm.evaluate.evaluate_stream on the test split, as ``factorlm evaluate`` runs it."""
    from factorlm.data import split_stream
    from factorlm.evaluate import evaluate_stream

    return evaluate_stream(model, split_stream(corpus, "test"), batch_size=64, num_steps=num_steps,
                           device="cpu").to_dict()


def measure(run_dir: Path, corpus, stream, ctx) -> dict:
    """The columns of the run in ``run_dir``: sizes, speeds and the test perplexity."""
    from factorlm.runs import load_model

    model, _, payload = load_model(run_dir, device="cpu")
    config = model.config
    row = {"cell": config.cell, "cell_args": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in dict(config.cell_args).items()},
           "hidden_size": config.hidden_size, "proj_size": config.proj_size, **sizes(model)}
    row.update(speeds(model, stream, ctx.num_steps, ctx.repeats, ctx.generate_tokens))
    results = run_dir / "results.json"
    saved = json.loads(results.read_text()) if results.exists() else {}
    if saved.get("test") and payload.get("step") is not None and saved.get("steps") == payload["step"]:
        row["test"], row["test_from"] = saved["test"], "results.json"  # the run's final evaluation of these weights
    else:
        row["test"], row["test_from"] = exact_test_perplexity(model, corpus, ctx.num_steps), "evaluated"
    row["perplexity"] = row["test"]["perplexity"]
    return row


# ------------------------------------------------------------------------------------------ building
def compress(argv: list[str]) -> None:
    """``factorlm compress ARGV`` in this process (the CLI's own code, reports and files)."""
    from factorlm.compress import cli as compress_cli

    parser = argparse.ArgumentParser(prog="factorlm compress")
    compress_cli.add_arguments(parser)
    status = compress_cli.run(parser.parse_args(argv))
    if status != 0:
        raise RuntimeError(f"factorlm compress {' '.join(argv)} exited with {status}")


def student_configs(teacher_payload: dict, teacher_path: Path, cell: str, cell_args: dict, max_time: float):
    """The teacher's model and recipe (pruning schedule and budgets dropped) with ``cell`` and a time
    budget of ``max_time`` training seconds, as ``factorlm distill`` builds its student."""
    from factorlm.configs import resolve
    from factorlm.train.checkpoint import saved_model_config, saved_train_config
    from factorlm.train.config import TrainConfig
    from factorlm.train.finetune import without_pruning

    recipe = (saved_train_config(teacher_payload, teacher_path) if teacher_payload.get("train_config") is not None
              else TrainConfig())
    base = (saved_model_config(teacher_payload, teacher_path), without_pruning(recipe))
    # the teacher's own budgets go: a teacher trained with --max-steps would otherwise stop the student early
    budget = {"max_time": max_time, "max_steps": None, "epochs": None}
    return resolve(overrides={"model": {"cell": cell, "cell_args": cell_args}, "train": budget}, base=base)


def teacher_train_seconds(ctx) -> float | None:
    """The teacher's training seconds (summed over its resumes), as its checkpoint records them."""
    return (ctx.payload or {}).get("elapsed")


def scratch_budget(converted_name: str, converted: dict, tuned: dict, teacher_seconds: float | None = None):
    """(seconds, how they add up) of the scratch model: the conversion's wall seconds plus the
    fine-tuning's training seconds (plus the teacher's training seconds when given)."""
    parts = [] if teacher_seconds is None else [("teacher", teacher_seconds)]
    parts += [(f"{converted_name} conversion", converted["seconds"]), ("fine-tuning", tuned["train_seconds"])]
    return sum(seconds for _, seconds in parts), " + ".join(f"{name} {seconds:.1f} s" for name, seconds in parts)


def build(spec: dict, out: Path, built: dict, ctx) -> dict:
    """Make row ``spec``'s run in ``out`` (a new directory); returns what to record about the build."""
    from factorlm.compress.distill import DistillConfig, DistillTrainer
    from factorlm.train.finetune import finetune_trainer
    from factorlm.train.loop import Trainer

    teacher = str(ctx.teacher)
    kind = spec["kind"]
    start = time.perf_counter()
    if kind == "svd":
        compress(["svd", teacher, "--rank", rank_label(spec["rank"]), "--out", str(out)])
    elif kind == "blocks":
        compress(["blocks", teacher, "--groups", str(spec["groups"]), "--out", str(out)])
    elif kind == "prune":
        compress(["prune", teacher, "--sparsity", str(spec["sparsity"]), "--out", str(out)])
    elif kind == "units":
        compress(["prune", teacher, "--sparsity", str(spec["fraction"]), "--units", "--out", str(out)])
    elif kind == "finetune":
        changes = {"max_time": ctx.finetune_seconds, "lr": ctx.finetune_lr, "lr_decay": 1.0}
        results = finetune_trainer(built[spec["needs"]]["dir"], ctx.corpus, out, changes=changes,
                                   show_progress=False).fit()
        return {"seconds": time.perf_counter() - start, "train_seconds": results["train_seconds"],
                "steps": results["steps"], "lr": ctx.finetune_lr}
    elif kind == "distill":
        model_config, train_config = student_configs(ctx.payload, ctx.checkpoint, spec["cell"], spec["cell_args"],
                                                     ctx.distill_seconds)
        results = DistillTrainer(model_config, train_config, ctx.corpus, out,
                                 distill=DistillConfig(teacher=str(ctx.checkpoint)), teacher_checkpoint=ctx.payload,
                                 show_progress=False).fit()
        return {"seconds": time.perf_counter() - start, "train_seconds": results["train_seconds"],
                "steps": results["steps"]}
    elif kind == "scratch":
        teacher_seconds = (teacher_train_seconds(ctx) or 0.0) if ctx.scratch_with_teacher else None
        budget, text = scratch_budget(spec["converted"], built[spec["converted"]], built[spec["needs"]],
                                      teacher_seconds)
        model_config, train_config = student_configs(ctx.payload, ctx.checkpoint, spec["cell"], spec["cell_args"],
                                                     budget)
        results = Trainer(model_config, train_config, ctx.corpus, out, show_progress=False).fit()
        return {"seconds": time.perf_counter() - start, "train_seconds": results["train_seconds"],
                "steps": results["steps"], "budget_seconds": budget, "budget": text}
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    return {"seconds": time.perf_counter() - start}


def row_settings(spec: dict, ctx) -> dict:
    """What a row's build depends on besides its name: the teacher and, for trained rows, the budget
    (and learning rate) this command gives it; saved in row.json and compared when a row is kept."""
    settings = {"teacher": str(Path(ctx.teacher).resolve())}
    if spec["kind"] == "finetune":
        settings.update(finetune_seconds=ctx.finetune_seconds, finetune_lr=ctx.finetune_lr)
    elif spec["kind"] == "distill":
        settings.update(distill_seconds=ctx.distill_seconds)
    elif spec["kind"] == "scratch":  # its budget follows from the rows before it, which are checked
        settings.update(finetune_seconds=ctx.finetune_seconds, finetune_lr=ctx.finetune_lr,
                        scratch_with_teacher=ctx.scratch_with_teacher)
    return settings


def check_kept(info: dict, settings: dict, run_dir: Path) -> None:
    """Refuse a row built earlier with other settings (a table mixing two budgets would mislead)."""
    saved = info.get("settings") or {}
    differ = [f"{key} {saved.get(key)!r} (now {value!r})" for key, value in settings.items() if saved.get(key) != value]
    if differ:
        raise RuntimeError(f"{run_dir} was built with {', '.join(differ)}: delete it, or give another --work")


class NeedsFailedRow(RuntimeError):
    """A row not built because the row it starts from failed."""


def run_rows(specs: list[dict], ctx, on_row=None) -> list[dict]:
    """Build and measure every row in turn; a failure is recorded in its row and the rest go on.
    ``on_row(rows)`` after each (to rewrite the report)."""
    built: dict[str, dict] = {}
    rows: list[dict] = []
    for index, spec in enumerate(specs, 1):
        name = spec["name"]
        row = {"method": name, "kind": spec["kind"]}
        print(f"[{index}/{len(specs)}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            with _timing.maybe_locked(ctx.lock):  # a row at a time (build, then timings)
                if spec["kind"] == "dense":
                    run_dir, info = ctx.teacher, {"seconds": 0.0, "train_seconds": teacher_train_seconds(ctx)}
                else:
                    needs = [spec.get("needs"), spec.get("converted")]
                    missing = [n for n in needs if n is not None and n not in built]
                    if missing:
                        raise NeedsFailedRow(f"needs row {missing[0]!r}, which failed")
                    run_dir = ctx.work / directory_name(name)
                    record = run_dir / "row.json"
                    if record.exists():
                        info = json.loads(record.read_text())
                        check_kept(info, row_settings(spec, ctx), run_dir)
                        print(f"    kept from an earlier run: {run_dir}", flush=True)
                    elif run_dir.exists() and any(run_dir.iterdir()):
                        raise RuntimeError(f"{run_dir} holds an unfinished build from an earlier run (no row.json): "
                                           f"delete it to build this row again")
                    else:
                        info = {**build(spec, run_dir, built, ctx), "settings": row_settings(spec, ctx)}
                        run_dir.mkdir(parents=True, exist_ok=True)
                        record.write_text(json.dumps(info, indent=2) + "\n")
                built[name] = {"dir": run_dir, **info}
                row.update({"run": str(run_dir), "build": info})
                row.update(measure(Path(run_dir), ctx.corpus, ctx.stream, ctx))
                print(f"    {describe(row)} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 -- one row's failure is recorded, the table goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if not isinstance(exc, NeedsFailedRow):
                traceback.print_exc()
            print(f"    FAILED: {row['error']}", flush=True)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def describe(row: dict) -> str:
    return (f"ppl {row['perplexity']:.2f}, rnn params {row['rnn_params']:,}, {row['weights_bytes']:,} bytes, "
            f"{row['tokens_per_s_b1']:,.0f} tok/s at batch 1, {row['tokens_per_s_b32']:,.0f} at batch 32")


# ------------------------------------------------------------------------------------------- report
COLUMNS = [("method", "method", "s"), ("recurrent params", "rnn_params", ","), ("nonzero", "rnn_nonzero", ","),
           ("params", "params", ","), ("weights bytes", "weights_bytes", ","),
           ("tok/s b=1", "tokens_per_s_b1", ",.0f"), ("tok/s b=32", "tokens_per_s_b32", ",.0f"),
           ("test ppl", "perplexity", ".2f"), ("train s", "train_seconds", ",.1f"), ("note", "note", "s")]


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per row, a failed row with its error in the note column."""
    flat = []
    for row in rows:
        line = dict(row)
        line["train_seconds"] = (row.get("build") or {}).get("train_seconds")
        if "error" in row:
            line["note"] = f"failed: {row['error']}"
        elif row.get("kind") == "scratch":
            line["note"] = f"budget: {row['build'].get('budget')}"
        flat.append(line)
    return _timing.markdown_table(flat, COLUMNS)


# --------------------------------------------------------------------------------------------- main
@dataclass
class Context:
    """What every row needs: the teacher, the corpus, the budgets and the timing settings."""

    teacher: Path  # the teacher's run directory (only read)
    work: Path  # where the rows' run directories go
    corpus: object = None  # factorlm.data.Corpus of the teacher's vocabulary
    stream: torch.Tensor | None = None  # the test split's token ids (the timings' input)
    checkpoint: Path | None = None  # the teacher's checkpoint file
    payload: dict | None = None  # its contents
    finetune_seconds: float = 300.0
    finetune_lr: float = 0.0
    distill_seconds: float = 600.0
    num_steps: int = 20  # T of the batch-32 timing and of the evaluation windows
    repeats: int = 10
    generate_tokens: int = 200
    lock: str | None = None  # flock held during each row
    scratch_with_teacher: bool = False  # the scratch model's budget also counts the teacher's training seconds


def quick_teacher(work: Path, corpus) -> Path:
    """A tiny dense teacher on ``corpus`` (the debug preset, as ``factorlm train --max-steps``)."""
    from factorlm.configs import resolve
    from factorlm.train.loop import Trainer

    out = work / "teacher"
    if not (out / "results.json").exists():
        model_config, train_config = resolve("debug", overrides={"train": {"max_steps": QUICK["teacher_steps"]}})
        Trainer(model_config, train_config, corpus, out, show_progress=False).fit()
    return out


def svd_ranks(model, args) -> list:
    """The three SVD ranks: ``--ranks``, else per layer the smallest keeping each of ENERGIES."""
    from factorlm.compress.svd import svd_to_flstm

    if args.ranks:  # smallest first: the middle one is the middle size
        return sorted(args.ranks, key=lambda r: sum(r) if isinstance(r, tuple) else r)
    ranks = []
    for energy in ENERGIES:
        converted, _ = svd_to_flstm(model, energy=energy)
        rank = converted.config.cell_args["rank"]
        rank = tuple(rank) if isinstance(rank, (tuple, list)) else rank
        if rank not in ranks:  # two energies may pick the same rank on a small or flat spectrum: one row
            ranks.append(rank)
    return ranks


def parse_ranks(text: str) -> list:
    """'16/32/64' (one rank each) or '16,24/32,48/64,96' (one per layer each) -> ranks."""
    out = []
    for part in text.split("/"):
        values = tuple(int(v) for v in part.split(","))
        out.append(values[0] if len(values) == 1 else values)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="the trained dense run directory (only read); --quick trains a tiny one")
    parser.add_argument("--data", help="its corpus directory (default: the one its checkpoint names; --quick: a "
                        "small built-in corpus)")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/compress_table.json); "
                        "the Markdown table goes next to it as .md")
    parser.add_argument("--work", default=None, help="where the rows' run directories go (default "
                        "runs/compress-table/<teacher's name>)")
    parser.add_argument("--finetune-seconds", type=float, default=300.0, help="training seconds of each fine-tuning")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="constant learning rate of the fine-tunings (default: the rate of the teacher's last "
                        "completed epoch under its recipe's schedule)")
    parser.add_argument("--distill-seconds", type=float, default=600.0, help="training seconds of each student")
    parser.add_argument("--scratch-with-teacher", action="store_true",
                        help="train the scratch F-LSTM for the teacher's training seconds plus the SVD conversion's "
                        "and fine-tuning's (default: the conversion's and fine-tuning's only)")
    parser.add_argument("--ranks", type=parse_ranks, default=None,
                        help="the three SVD ranks, '/'-separated, each one int or one per layer (16/32/64 or "
                        "16,24/32,48/64,96); default: the energies 0.5, 0.8, 0.95")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per speed (the median is kept)")
    parser.add_argument("--generate-tokens", type=int, default=200, help="tokens stepped per batch-1 timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--lock", default=None, help="hold an exclusive flock on this file during each row (its "
                        "training budget and timings), e.g. /tmp/factorlm-cpu.lock")
    parser.add_argument("--quick", action="store_true", help="a dry run of the whole plumbing (tiny teacher, "
                        "small built-in corpus, 1-second budgets; about 30 s on one core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from factorlm.data import SyntheticConfig, builtin_corpus, open_corpus, split_stream
    from factorlm.errors import FactorlmError
    from factorlm.runs import load_model
    from factorlm.train.checkpoint import saved_train_config
    from factorlm.train.finetune import checkpoint_file
    from factorlm.train.optim import lr_for_epoch

    if args.quick:
        for key in ("finetune_seconds", "distill_seconds", "repeats", "generate_tokens"):
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, QUICK[key])
    elif not args.teacher:
        parser.error("--teacher RUN is required (or --quick for a dry run)")
    work = Path(args.work or Path("runs") / "compress-table" / (Path(args.teacher).name if args.teacher else "quick"))
    if args.data:
        try:
            corpus = open_corpus(args.data)
        except (FactorlmError, OSError) as exc:
            parser.error(str(exc))
    elif args.quick:
        corpus = builtin_corpus(SyntheticConfig(**{k: QUICK[k] for k in ("train_tokens", "valid_tokens",
                                                                          "test_tokens")}))
    else:
        corpus = None  # the teacher's, once its checkpoint is read
    teacher = Path(args.teacher) if args.teacher else quick_teacher(work, corpus)
    checkpoint = checkpoint_file(teacher)
    try:
        model, vocab, payload = load_model(checkpoint, device="cpu")
        if corpus is None:
            corpus = open_corpus(payload.get("data_path"))
        vocab.check_same(corpus.vocab, name=f"checkpoint {checkpoint}", other_name=f"the corpus {corpus.name!r}")
    except (FactorlmError, OSError) as exc:
        parser.error(str(exc))
    if model.config.cell != "lstm":
        parser.error(f"--teacher {teacher} holds a {model.config.cell!r} model; the table starts from a dense "
                     f"('lstm') run")
    recipe = saved_train_config(payload, checkpoint)
    if args.finetune_lr is None:
        args.finetune_lr = lr_for_epoch(recipe, max(0, int(payload.get("epoch") or 0) - 1))

    ctx = Context(teacher=teacher, work=work, corpus=corpus, stream=split_stream(corpus, "test"),
                  checkpoint=checkpoint, payload=payload, finetune_seconds=args.finetune_seconds,
                  finetune_lr=args.finetune_lr, distill_seconds=args.distill_seconds, num_steps=recipe.num_steps,
                  repeats=args.repeats, generate_tokens=args.generate_tokens, lock=args.lock,
                  scratch_with_teacher=args.scratch_with_teacher)
    if ctx.stream.numel() <= ctx.num_steps * BATCH:
        raise SystemExit(f"the test split has {ctx.stream.numel()} tokens; the batch-32 timing needs "
                         f"{ctx.num_steps * BATCH + 1}")

    work.mkdir(parents=True, exist_ok=True)
    ranks = svd_ranks(model, args)
    groups = [k for k in GROUPS if blocks_fit(model.config, k)]
    specs = plan_rows(ranks, groups)
    print(f"teacher {teacher} ({model.config.cell}, n={model.config.hidden_size}, p={model.config.proj_size}), "
          f"SVD ranks {', '.join(map(rank_label, ranks))}, blocks k={groups}, fine-tuning {args.finetune_seconds:g} s "
          f"at lr {args.finetune_lr:g}, students {args.distill_seconds:g} s; {len(specs)} rows in {work}", flush=True)

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "compress_table.json"
    payload_out = {
        "benchmark": "compress_table",
        "machine": _timing.machine_info(torch.device("cpu")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "teacher": str(teacher), "data": str(args.data) if args.data else corpus.name, "work": str(work),
        "quick": args.quick, "svd_ranks": [list(r) if isinstance(r, tuple) else r for r in ranks],
        "svd_energies": None if args.ranks else list(ENERGIES), "groups": groups,
        "finetune_seconds": args.finetune_seconds, "finetune_lr": args.finetune_lr,
        "distill_seconds": args.distill_seconds, "scratch_with_teacher": args.scratch_with_teacher,
        "repeats": args.repeats, "generate_tokens": args.generate_tokens,
        "batch": BATCH, "num_steps": ctx.num_steps, "teacher_train_seconds": payload.get("elapsed"),
        "weights_bytes": "len(torch.save(model.state_dict())): the model's weights alone (pruned zeros stored dense)",
        "rows": [],
    }

    def save(rows):
        payload_out["rows"] = rows
        _timing.write_json(out, payload_out)
        out.with_suffix(".md").write_text(table(rows) + "\n")

    rows = run_rows(specs, ctx, on_row=save)
    payload_out["rows"] = rows
    out.with_suffix(".md").write_text(table(rows) + "\n")
    _timing.report(payload_out, table(rows), out, "compress_table.json")
    return payload_out


if __name__ == "__main__":
    main()
