"""Issue #23's measured table: each trained run deployed five ways, with its size, speed and perplexity.

    python benchmarks/deploy_table.py --data ../shared/data/ptb --runs runs/ptb-small-lstm --qat-steps 300
    python benchmarks/deploy_table.py --data ../shared/data/ptb --runs runs/family-ptb-300/runs/biglstm-{lstm,flstm,glstm} \\
        --qat-steps 100 --out benchmarks/results/deploy_table_family.json
    python benchmarks/deploy_table.py --quick          # a dry run of the plumbing on the built-in corpus

Rows per run (RUN is only read; what is built goes under ``--work``/<run's name>/):

- ``float32``: the run's model in PyTorch (the weights ``factorlm evaluate`` scores, the EMA where kept);
- ``int8``: post-training int8, ``factorlm.quant.quantize_model(model, "torchao")`` (what
  ``factorlm compress quantize`` writes);
- ``float32 +ft``: the control for QAT: the float model fine-tuned ``--qat-steps`` steps with QAT off
  (fresh optimizer, the run's recipe at ``--lr``, constant), so that what QAT gains is not credited
  for the extra training;
- ``int8 QAT``: the same fine-tuning with quantization-aware training on (``factorlm finetune --qat``),
  then converted to int8 as above;
- ``ORT float32``: ``factorlm export onnx`` of the float model, run in onnxruntime;
- ``ORT int8``: that graph through onnxruntime's dynamic int8 quantizer
  (``factorlm export onnx --int8``; factorlm.export.runtime says how its rounding differs).

Columns: the weights' MiB (PyTorch: the state dict's tensor bytes, ``factorlm.quant.state_bytes``;
onnxruntime: the .onnx file), CPU tokens/s at batch 1 (token by token, each step the whole model
and its full log-softmax, state carried: generation) and at batch 32 (one (T, 32) window with the
exact per-token loss: evaluation), each the median of ``--repeats`` timed runs after one warm-up,
torch and onnxruntime with the same thread count; and the exact test perplexity
(factorlm.evaluate.evaluate_stream, the graph behind the same calls for onnxruntime:
factorlm.export.OnnxLanguageModel).

``--no-speed`` skips the timings (perplexity and sizes only: for a busy machine); a later run with
the same ``--work`` reuses what was built (the fine-tuned runs, the graphs) and measures again, and
with ``--perplexity-from JSON`` takes each row's perplexity from that earlier run's output instead of
evaluating again (the same run, deployment and weights give the same number; only the timings need
an idle machine). The JSON and Markdown are rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.nn.base import count_parameters  # noqa: E402

BATCH = 32
KINDS = ("float32", "int8", "float32 +ft", "int8 QAT", "ORT float32", "ORT int8")


# ------------------------------------------------------------------------------------ measurements
def speeds(model, stream: torch.Tensor, num_steps: int, repeats: int, tokens: int) -> dict:
    """tokens/s at batch 1 (token by token with the full log-softmax) and at batch 32 (one
    (num_steps, 32) window and its exact per-token loss); ``model`` a LanguageModel, an int8 one or
    an OnnxLanguageModel (the same calls)."""
    one_by_one = [torch.tensor([[token]]) for token in stream[:tokens].tolist()]
    inputs = stream[:num_steps * BATCH].reshape(BATCH, num_steps).t().contiguous()  # (T, B)
    targets = stream[1:num_steps * BATCH + 1].reshape(BATCH, num_steps).t().contiguous()

    def step_by_step():
        state = model.init_state(1)
        for token in one_by_one:
            hidden, state = model(token, state)
            model.log_probs(hidden)

    def batched():
        hidden, _ = model(inputs, model.init_state(BATCH))
        model.loss(hidden, targets, sampled=False)

    device = torch.device("cpu")
    with torch.inference_mode():
        one, _ = _timing.median_seconds(step_by_step, device, warmup=1, repeats=repeats)
        many, _ = _timing.median_seconds(batched, device, warmup=1, repeats=repeats)
    return {"tokens_per_s_b1": tokens / one, "tokens_per_s_b32": inputs.numel() / many}


def perplexity(model, stream: torch.Tensor, num_steps: int) -> dict:
    from factorlm.evaluate import evaluate_stream

    start = time.perf_counter()
    result = evaluate_stream(model, stream, batch_size=64, num_steps=num_steps, device="cpu").to_dict()
    return {**result, "eval_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------ builds
def finetuned(run: Path, out: Path, corpus, steps: int, lr: float, qat: bool) -> Path:
    """``out``: ``run`` fine-tuned ``steps`` steps at the constant ``lr`` (QAT on or off); kept if there."""
    from factorlm.train.finetune import finetune_trainer

    if not (out / "results.json").exists():
        changes = {"max_steps": steps, "lr": lr, "lr_decay": 1.0, "qat": qat}
        finetune_trainer(run, corpus, out, changes=changes, show_progress=False).fit()
    return out


def graphs(model, directory: Path) -> tuple[Path, Path]:
    """The float graph and its int8 twin in ``directory`` (kept if there)."""
    from factorlm.export import quantize_onnx, to_onnx

    float_path, int8_path = directory / "model.onnx", directory / "model-int8.onnx"
    if not float_path.exists():
        to_onnx(model, float_path)
    if not int8_path.exists():
        quantize_onnx(float_path, int8_path)
    return float_path, int8_path


def deployments(run: Path, model, payload: dict, work: Path, corpus, args):
    """(kind, model, MiB, note) for each row of ``run`` (its float ``model`` and checkpoint
    ``payload``, as load_model gave them), built on demand in ``work``."""
    from factorlm.export import OnnxLanguageModel
    from factorlm.quant.model import quantize_model, state_bytes
    from factorlm.runs import load_model
    from factorlm.train.checkpoint import saved_train_config
    from factorlm.train.optim import lr_for_epoch

    yield "float32", model, state_bytes(model) / 2**20, ""
    int8 = quantize_model(model, "torchao")
    yield "int8", int8, state_bytes(int8) / 2**20, "post-training"
    if args.qat_steps:
        recipe = saved_train_config(payload, run)
        lr = args.lr if args.lr is not None else lr_for_epoch(recipe, max(0, int(payload.get("epoch") or 0) - 1))
        note = f"{args.qat_steps} steps at lr {lr:g}"
        tuned, _, _ = load_model(finetuned(run, work / "ft", corpus, args.qat_steps, lr, qat=False), device="cpu")
        yield "float32 +ft", tuned.eval(), state_bytes(tuned) / 2**20, note
        qat, _, _ = load_model(finetuned(run, work / "qat", corpus, args.qat_steps, lr, qat=True), device="cpu")
        qat_int8 = quantize_model(qat, "torchao")
        yield "int8 QAT", qat_int8, state_bytes(qat_int8) / 2**20, note
    float_graph, int8_graph = graphs(model, work)
    threads = torch.get_num_threads()
    yield "ORT float32", OnnxLanguageModel(float_graph, threads=threads), float_graph.stat().st_size / 2**20, ""
    yield "ORT int8", OnnxLanguageModel(int8_graph, threads=threads), int8_graph.stat().st_size / 2**20, \
        "onnxruntime quantize_dynamic"


def measure_run(run: Path, work: Path, corpus, stream, args, on_row) -> list[dict]:
    from factorlm.runs import load_model

    model, _, payload = load_model(run, device="cpu")
    base = {"run": str(run), "cell": model.config.cell, "cell_args": dict(model.config.cell_args),
            "hidden_size": model.config.hidden_size, "proj_size": model.config.proj_size,
            "rnn_params": count_parameters(model.rnn), "params": count_parameters(model)}
    rows = []
    for kind, deployed, mib, note in deployments(run, model.eval(), payload, work, corpus, args):
        print(f"  {run.name}: {kind} ...", file=sys.stderr, flush=True)
        known = args.known_perplexity.get((str(run), kind))
        row = {**base, "kind": kind, "weights_mib": mib, "note": note,
               **(known if known is not None else perplexity(deployed, stream, args.num_steps))}
        if not args.no_speed:
            row.update(speeds(deployed, stream, args.num_steps, args.repeats, args.tokens))
        rows.append(row)
        on_row(row)
    return rows


def table(rows: list[dict]) -> str:
    columns = [("run", "run_name", "s"), ("cell", "cell", "s"), ("RNN params", "rnn_params", ","),
               ("deployed as", "kind", "s"), ("weights MiB", "weights_mib", ".2f"),
               ("tok/s b=1", "tokens_per_s_b1", ",.0f"), ("tok/s b=32", "tokens_per_s_b32", ",.0f"),
               ("test ppl", "perplexity", ".2f"), ("note", "note", "s")]
    shown = [{**row, "run_name": Path(row["run"]).name} for row in rows]
    for row in shown:
        for key in ("tokens_per_s_b1", "tokens_per_s_b32"):
            row.setdefault(key, float("nan"))
    return _timing.markdown_table(shown, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, metavar="RUN", help="trained float runs (only read)")
    parser.add_argument("--data", default=None, help="their corpus (default: the built-in one)")
    parser.add_argument("--work", type=Path, default=Path("runs/deploy-table"),
                        help="where the fine-tuned runs and graphs go, one directory per run (default runs/deploy-table)")
    parser.add_argument("--qat-steps", type=int, default=300, help="fine-tuning steps of QAT and its float control "
                        "(0: no QAT rows; default 300)")
    parser.add_argument("--lr", type=float, default=None,
                        help="their constant learning rate (default: the run's rate in its last epoch)")
    parser.add_argument("--num-steps", type=int, default=20, help="T of the batch-32 timing and the evaluation windows")
    parser.add_argument("--tokens", type=int, default=200, help="tokens of the batch-1 timing (default 200)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-speed", action="store_true", help="sizes and perplexities only (no timings)")
    parser.add_argument("--perplexity-from", metavar="JSON", default=None,
                        help="take the perplexities from this earlier output (the same runs and --work) instead of "
                        "evaluating again")
    parser.add_argument("--quick", action="store_true", help="dry run: a tiny run trained here, 2 QAT steps, 2 repeats")
    parser.add_argument("--out", default=None, help="JSON output (default benchmarks/results/deploy_table.json)")
    args = parser.parse_args(argv)
    from factorlm.data import open_corpus, split_stream

    corpus = open_corpus(args.data)
    if args.quick:
        args.work, args.qat_steps, args.repeats, args.tokens = Path("/tmp/factorlm-deploy-quick"), 2, 2, 20
        args.runs = [quick_run(args.work, corpus)]
    if not args.runs:
        parser.error("--runs is required (or --quick)")
    if args.repeats < 10 and not args.quick:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    args.known_perplexity = {}
    if args.perplexity_from:
        for row in json.loads(Path(args.perplexity_from).read_text())["rows"]:
            args.known_perplexity[(row["run"], row["kind"])] = {
                key: row[key] for key in ("perplexity", "loss", "tokens", "passes", "sequential_rows",
                                          "rescored_tokens", "eval_s") if key in row}
    stream = split_stream(corpus, "test")
    rows: list[dict] = []
    payload = {"benchmark": "deploy_table", "machine": _timing.machine_info(torch.device("cpu")),
               "threads": torch.get_num_threads(), "data": args.data, "qat_steps": args.qat_steps,
               "repeats": args.repeats, "tokens_b1": args.tokens, "num_steps": args.num_steps, "quick": args.quick,
               "speed": not args.no_speed, "perplexity_from": args.perplexity_from, "rows": rows}

    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "deploy_table.json"

    def save(row: dict) -> None:  # after every row: a crash keeps what was measured
        rows.append(row)
        _timing.write_json(out, payload)

    for run in args.runs:
        print(f"deploying {run} ...", file=sys.stderr, flush=True)
        measure_run(run, args.work / run.name, corpus, stream, args, save)
    _timing.report(payload, table(rows), out, "deploy_table.json")
    return payload


def quick_run(work: Path, corpus) -> Path:
    """A tiny float run on ``corpus`` (the debug preset, a few steps)."""
    from factorlm.configs import resolve
    from factorlm.train.loop import Trainer

    out = work / "source"
    if not (out / "results.json").exists():
        model_config, train_config = resolve("debug", overrides={"train": {"max_steps": 5}})
        Trainer(model_config, train_config, corpus, out, show_progress=False).fit()
    return out


if __name__ == "__main__":
    main()
