"""int8 inference speed of one recurrent layer: float32 vs factorlm's int8 (native, torchao) vs
PyTorch's legacy dynamic quantization of a projection-free torch.nn.LSTM.

Per shape (p, n) and batch B in (1, 32): ``layer(x, state)`` on a (T = 20, B, p) input under
``torch.inference_mode()``, median ms over ``--repeats`` runs after ``--warmup``, tokens/s = T·B /
time. Rows:

- ``nn.LSTM float32`` and ``nn.LSTM quantize_dynamic int8``: torch.nn.LSTM(p, n) without projection
  (n-wide output), and its ``torch.ao.quantization.quantize_dynamic`` twin (PyTorch's only int8
  LSTM; it refuses ``proj_size``, pytorch issues 60008 and 74953);
- for every cell in factorlm.nn.CELLS with projection p: the float32 layer (its fastest ``impl``),
  the int8 layer with every product through ``torch._int_mm`` (``native``), and with the input side
  over all T through torchao's int8 Linear (``torchao``, when installed).

Cell arguments at these sizes: F-LSTM rank p/2, G-LSTM 4 groups, G∘F-LSTM 4 groups of rank p/8,
C-LSTM block 8.

With ``--runs RUN ...`` (float runs and their int8 runs, e.g. from ``factorlm quantize``), each
whole language model instead: checkpoint size on disk (a float run's holds its optimizer state
too), the weights' size, and tokens/s of ``model(inputs, state)``
plus the full softmax's log-probabilities on (T = 20, B) random word ids, B in (1, 32).

    python benchmarks/quant_speed.py --quick        # a dry run: one small shape, 2 repeats
    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/quant_speed.py
    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/quant_speed.py --runs runs/ptb runs/ptb-int8 runs/ptb-qat-int8
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.nn.registry import CELLS  # noqa: E402
from factorlm.quant import _torchao  # noqa: E402
from factorlm.quant.layers import QuantizedLSTM  # noqa: E402

GRID = [(256, 1024), (512, 2048), (1024, 4096)]
QUICK_GRID = [(64, 256)]
BATCHES = (1, 32)
STEPS = 20


def cell_args(cell: str, p: int) -> dict:
    return {"flstm": {"rank": p // 2}, "glstm": {"groups": 4}, "gflstm": {"groups": 4, "rank": max(1, p // 8)},
            "circulant": {"block": 8}}.get(cell, {})


def layers(p: int, n: int):
    """(label, kind, module) for every row of a shape (module doc), in table order."""
    lstm = nn.LSTM(p, n).eval()
    yield "nn.LSTM", "float32", lstm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        yield "nn.LSTM", "quantize_dynamic int8", torch.ao.quantization.quantize_dynamic(lstm, {nn.LSTM}, torch.qint8)
    for cell, cls in CELLS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = cls(p, n, proj_size=p, **cell_args(cell, p)).eval()
        yield cell, "float32", layer
        yield cell, "int8 native", QuantizedLSTM(layer, "native")
        if _torchao.available():
            yield cell, "int8 torchao", QuantizedLSTM(layer, "torchao")


def measure(p: int, n: int, warmup: int, repeats: int) -> list[dict]:
    device = torch.device("cpu")
    rows = []
    for label, kind, layer in layers(p, n):
        for batch in BATCHES:
            x = torch.randn(STEPS, batch, p)
            out_size = n if label == "nn.LSTM" else p
            state = (torch.zeros(1, batch, out_size), torch.zeros(1, batch, n))
            with torch.inference_mode():
                seconds, all_seconds = _timing.median_seconds(lambda: layer(x, state), device, warmup=warmup,
                                                              repeats=repeats)
            rows.append({"p": p, "n": n, "B": batch, "T": STEPS, "layer": label, "kind": kind,
                         "ms": seconds * 1e3, "ms_all": [t * 1e3 for t in all_seconds],
                         "tokens_per_s": STEPS * batch / seconds})
    return rows


def measure_runs(paths: list[str], warmup: int, repeats: int) -> list[dict]:
    """Size on disk and LM tokens/s (forward and log-probabilities) of each run (module doc)."""
    from factorlm.quant.model import state_bytes
    from factorlm.runs import load_model

    device = torch.device("cpu")
    rows = []
    for path in paths:
        model, _, payload = load_model(path)
        file = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
        kind = f"int8 {payload['quantization']['backend']}" if payload.get("quantization") else "float32"
        for batch in BATCHES:
            inputs = torch.randint(0, model.config.vocab_size, (STEPS, batch))
            state = model.init_state(batch)

            def step():
                hidden, _ = model(inputs, state)
                return model.log_probs(hidden)

            with torch.inference_mode():
                seconds, all_seconds = _timing.median_seconds(step, device, warmup=warmup, repeats=repeats)
            rows.append({"run": str(path), "kind": kind, "B": batch, "T": STEPS, "cell": model.config.cell,
                         "size_mib": file.stat().st_size / 2**20, "weights_mib": state_bytes(model) / 2**20,
                         "ms": seconds * 1e3,
                         "ms_all": [t * 1e3 for t in all_seconds], "tokens_per_s": STEPS * batch / seconds})
    return rows


def runs_table(rows: list[dict]) -> str:
    columns = [("run", "run", "s"), ("cell", "cell", "s"), ("kind", "kind", "s"), ("MiB on disk", "size_mib", ".2f"),
               ("weights MiB", "weights_mib", ".2f"),
               ("B", "B", "d"), ("ms", "ms", ".2f"), ("tokens/s", "tokens_per_s", ",.0f")]
    return _timing.markdown_table(rows, columns)


def table(rows: list[dict]) -> str:
    columns = [("p", "p", "d"), ("n", "n", "d"), ("B", "B", "d"), ("layer", "layer", "s"), ("kind", "kind", "s"),
               ("ms", "ms", ".2f"), ("tokens/s", "tokens_per_s", ",.0f")]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, 2 repeats (a dry run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="time these runs' whole models instead (module doc)")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/quant_speed_cpu.json, "
                        "with --runs quant_speed_runs_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    torch.manual_seed(0)
    if args.runs:
        rows = measure_runs(args.runs, args.warmup, args.repeats)
        payload = {"benchmark": "quant_speed_runs", "machine": _timing.machine_info(torch.device("cpu")),
                   "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
        _timing.report(payload, runs_table(rows), args.out, "quant_speed_runs_cpu.json")
        return payload
    rows = []
    for p, n in QUICK_GRID if args.quick else GRID:
        print(f"measuring p={p} n={n} ...", file=sys.stderr, flush=True)
        rows += measure(p, n, args.warmup, args.repeats)
    payload = {"benchmark": "quant_speed", "machine": _timing.machine_info(torch.device("cpu")),
               "threads": torch.get_num_threads(), "torchao": _torchao.available(), "warmup": args.warmup,
               "repeats": args.repeats, "quick": args.quick, "rows": rows}
    _timing.report(payload, table(rows), args.out, "quant_speed_cpu.json")
    return payload


if __name__ == "__main__":
    main()
