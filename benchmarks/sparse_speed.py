"""Does unstructured sparsity buy CPU speed? torch's CSR sparse matmul against the dense one at the
recurrent matrix shapes, and the sparsity where the sparse kernel breaks even.

What ``factorlm compress prune --sparsity S`` leaves is a dense matrix with zeros: the layers still
run dense kernels, at dense speed. This script measures what a sparse kernel would give instead:
for each matrix W (rows x cols) pruned by magnitude to sparsity S, the product a layer computes
per step, X (B, cols) -> X·Wᵀ (B, rows), as the dense ``F.linear(X, W)`` and as the CSR product
``torch.sparse.mm(W_csr, Xᵀ)`` (Xᵀ prepared outside the timing, which favours the sparse side;
the CSR conversion too: a pruned model would be converted once). Reported per shape, batch and
sparsity: µs per product (median of ``--repeats`` after warm-up), the speedup of sparse over dense
and, per shape and batch, the break-even sparsity (the first measured S at which CSR is at least as
fast; "never" if none up to 0.99). The results are checked against the dense product.

Shapes (rows = 4n gate rows, cols = the input they read): the recurrent W_hh of PTB small / medium /
large (4n x n: 800 x 200, 2600 x 650, 6000 x 1500), and BIGLSTM at 1/8 of the paper's sizes
(n = 1024, p = 128: W_hh 4096 x 128 and W_hr 128 x 1024). Batches 1 (generation) and 32.

    python benchmarks/sparse_speed.py                 # the full grid (minutes)
    python benchmarks/sparse_speed.py --quick         # one small shape, two sparsities (seconds)
    python benchmarks/sparse_speed.py --shape 2048,512 --batch 1,64 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.compress.prune import magnitude_masks  # noqa: E402

#: (label, rows, cols)
SHAPES = [
    ("ptb-small W_hh", 800, 200),
    ("ptb-medium W_hh", 2600, 650),
    ("ptb-large W_hh", 6000, 1500),
    ("biglstm/8 W_hh", 4096, 128),
    ("biglstm/8 W_hr", 128, 1024),
]
BATCHES = (1, 32)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
# torch notes on every CSR conversion that its sparse support is in beta: known, and not a result
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

QUICK = dict(shapes=[("quick", 256, 64)], batches=(1,), sparsities=(0.5, 0.9))


def measure(label: str, rows: int, cols: int, batch: int, sparsities, repeats: int, dtype) -> list[dict]:
    """Dense and CSR µs per product of one shape and batch at each sparsity."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g, dtype=dtype)
    x = torch.randn(batch, cols, generator=g, dtype=dtype)
    xt = x.T.contiguous()
    cpu = torch.device("cpu")
    out = []
    for sparsity in sparsities:
        pruned = weight * magnitude_masks({"w": weight}, sparsity)["w"]
        csr = pruned.to_sparse_csr()
        dense_result, sparse_result = F.linear(x, pruned), torch.sparse.mm(csr, xt).T
        if not torch.allclose(dense_result, sparse_result, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{label}: the CSR product disagrees with the dense one at sparsity {sparsity}")
        dense, _ = _timing.median_seconds(lambda: F.linear(x, pruned), cpu, repeats=repeats)
        sparse, _ = _timing.median_seconds(lambda: torch.sparse.mm(csr, xt), cpu, repeats=repeats)
        out.append({"shape": label, "rows": rows, "cols": cols, "batch": batch, "sparsity": sparsity,
                    "nnz": int(csr.values().numel()), "dense_us": dense * 1e6, "csr_us": sparse * 1e6,
                    "speedup": dense / sparse})
    return out


def break_even(rows: list[dict]) -> list[dict]:
    """Per (shape, batch): the first measured sparsity at which CSR is at least as fast as dense."""
    found: dict[tuple, dict] = {}
    for r in rows:
        key = (r["shape"], r["batch"])
        entry = found.setdefault(key, {"shape": r["shape"], "batch": r["batch"], "break_even": None,
                                       "best_speedup": 0.0})
        entry["best_speedup"] = max(entry["best_speedup"], r["speedup"])
        if entry["break_even"] is None and r["speedup"] >= 1.0:
            entry["break_even"] = r["sparsity"]
    return list(found.values())


def tables(rows: list[dict], even: list[dict]) -> str:
    main = _timing.markdown_table(rows, [
        ("matrix", "shape", "s"), ("rows x cols", "dims", "s"), ("B", "batch", "d"), ("sparsity", "sparsity", ".2f"),
        ("dense µs", "dense_us", ",.1f"), ("CSR µs", "csr_us", ",.1f"), ("CSR speedup", "speedup", ".2f")])
    for r in even:
        r["break_even_text"] = "never (up to the largest measured)" if r["break_even"] is None else f"{r['break_even']:.2f}"
    summary = _timing.markdown_table(even, [("matrix", "shape", "s"), ("B", "batch", "d"),
                                            ("CSR at least as fast from sparsity", "break_even_text", "s"),
                                            ("best CSR speedup", "best_speedup", ".2f")])
    return main + "\n\n" + summary


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape at batch 1, sparsities 0.5 and 0.9")
    parser.add_argument("--shape", type=_int_list, metavar="ROWS,COLS", help="one matrix shape instead of the grid")
    parser.add_argument("--batch", type=_int_list, metavar="B1,B2", help=f"batches (default {BATCHES})")
    parser.add_argument("--sparsities", metavar="S1,S2", help=f"comma-separated, each in (0, 1) (default {SPARSITIES})")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per product, median reported (>= 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp64"))
    parser.add_argument("--lock", help="hold this file's flock for each shape (see benchmarks/README.md)")
    parser.add_argument("--out", help="JSON output path (default benchmarks/results/sparse_speed_cpu.json)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10 for an honest median, got {args.repeats}")
    shapes, batches, sparsities = SHAPES, BATCHES, SPARSITIES
    if args.quick:
        shapes, batches, sparsities = QUICK["shapes"], QUICK["batches"], QUICK["sparsities"]
    if args.shape:
        if len(args.shape) != 2:
            parser.error(f"--shape takes ROWS,COLS, got {args.shape}")
        shapes = [(f"{args.shape[0]} x {args.shape[1]}", *args.shape)]
    if args.batch:
        batches = args.batch
    if args.sparsities:
        sparsities = tuple(float(s) for s in args.sparsities.split(","))
        if not all(0 < s < 1 for s in sparsities):
            parser.error(f"--sparsities must each be strictly between 0 and 1, got {args.sparsities}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _timing.DTYPES[args.dtype]
    rows = []
    for label, r, c in shapes:
        for batch in batches:
            print(f"measuring {label} ({r} x {c}) at batch {batch} ...", file=sys.stderr, flush=True)
            with _timing.maybe_locked(args.lock):
                rows += measure(label, r, c, batch, sparsities, args.repeats, dtype)
    for row in rows:
        row["dims"] = f"{row['rows']} x {row['cols']}"
    even = break_even(rows)
    payload = {"benchmark": "sparse_speed", "machine": _timing.machine_info(torch.device("cpu")),
               "dtype": args.dtype, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "rows": rows, "break_even": even}
    _timing.report(payload, tables(rows, even), args.out, "sparse_speed_cpu.json")
    return payload


if __name__ == "__main__":
    main()
