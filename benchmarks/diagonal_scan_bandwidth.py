"""How close the diagonal LSTM's element-wise scan runs to memory bandwidth.

The diagonal LSTM (factorlm.nn.DiagonalLSTM) has no product inside its time loop: after one input
GEMM, the recurrence is an element-wise scan (factorlm.ops._scan_diagonal; csrc/diagonal_scan.cpp).
Such a scan is bound by the bytes it moves, so this script times the forward and the backward scan
alone, on their own buffers, and reports the bytes each must move at least over its time, next to
the machine's copy bandwidth (``dst.copy_(src)`` of a buffer far larger than the caches: 2 bytes
moved per byte copied) measured in the same run.

Bytes per row (one row = one step of one sequence, n cells, e bytes per element):
    forward   reads z (4n), writes the activated gates (4n), the cell state (n) and m (n): 10n·e
    backward  reads dL/dm (n), the gates (4n), c_t (n) and c_{t-1} (n), writes dL/dpre (4n): 11n·e
(c_{t-1} and s_{t-1} are the previous step's rows; the forward re-reads them, usually from cache,
and they are not counted.) "share" is the scan's GB/s over the copy's.

    python benchmarks/diagonal_scan_bandwidth.py --quick --out /tmp/scan.json
    python benchmarks/diagonal_scan_bandwidth.py --dtype fp64 --lock /tmp/factorlm-cpu.lock
    python benchmarks/diagonal_scan_bandwidth.py --device cuda          # the PyTorch loop on the GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.ops import _extension, diagonal  # noqa: E402

#: (n, B, T): cells, batch, steps
GRID = [(256, 32, 20), (1024, 64, 20), (2048, 128, 20), (8192, 32, 20), (2048, 16, 200)]
QUICK_GRID = [(1024, 64, 20), (2048, 128, 20)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
FORWARD_ELEMENTS, BACKWARD_ELEMENTS = 10, 11  # per row, in units of n (module doc)


def copy_bandwidth(device, dtype, mbytes: int = 512) -> float:
    """GB/s moved by dst.copy_(src) of ``mbytes`` MB: read + write, the best a streaming kernel gets."""
    numel = mbytes * (1 << 20) // torch.empty((), dtype=dtype).element_size()
    src = torch.rand(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    seconds, _ = _timing.median_seconds(lambda: dst.copy_(src), device, warmup=2, repeats=7)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def measure(n: int, batch: int, steps: int, scans, device, dtype, proj: bool) -> list[dict]:
    rows = batch * steps
    sizes = [batch] * steps
    new = dict(device=device, dtype=dtype)
    z = torch.randn(rows, 4 * n, **new)
    u = torch.rand(4, n, **new) * 2 - 1
    s0, c0 = torch.randn(batch, n, **new), torch.randn(batch, n, **new)
    # the forward overwrites z with the gates; running it again on them gives the same work
    gates, cells, m = scans.forward(z, u, 1.0, s0, c0, sizes, proj)
    dm, dc = torch.randn(rows, n, **new), torch.randn(batch, n, **new)
    element = z.element_size()
    results = []
    for label, fn, elements in (
        ("forward", lambda: scans.forward(z, u, 1.0, s0, c0, sizes, proj), FORWARD_ELEMENTS),
        ("backward", lambda: scans.backward(dm, dc, gates, cells, u, sizes, proj), BACKWARD_ELEMENTS),
    ):
        seconds, _ = _timing.median_seconds(fn, device)
        moved = elements * n * rows * element
        results.append(dict(n=n, batch=batch, steps=steps, scan=scans.name, direction=label, proj=proj,
                            ms=seconds * 1e3, gbytes_per_s=moved / seconds / 1e9, mbytes=moved / 1e6))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_GRID}")
    parser.add_argument("--shape", help="one shape n,B,T")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--proj", action="store_true", help="the scan of a layer with a projection "
                                                            "(recurrent input tanh(c) instead of m)")
    parser.add_argument("--lock", help="hold this flock while timing each shape")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/diagonal_scan_bandwidth_<device>.json)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    grid = [tuple(int(v) for v in args.shape.split(","))] if args.shape else QUICK_GRID if args.quick else GRID
    candidates = [diagonal.TORCH_SCANS]
    if device.type == "cpu" and _extension.is_available():  # builds it before any timing
        module = _extension.load()
        candidates.insert(0, diagonal.DiagonalScans("extension", module.diagonal_forward_scan,
                                                    module.diagonal_backward_scan))
    with _timing.maybe_locked(args.lock):
        bandwidth = copy_bandwidth(device, dtype)
    rows = []
    for n, batch, steps in grid:
        with _timing.maybe_locked(args.lock):
            for scans in candidates:
                rows.extend(measure(n, batch, steps, scans, device, dtype, args.proj))
    for row in rows:
        row["share"] = row["gbytes_per_s"] / bandwidth
    columns = [("n", "n", "d"), ("B", "batch", "d"), ("T", "steps", "d"), ("scan", "scan", "s"),
               ("direction", "direction", "s"), ("ms", "ms", ".3f"), ("MB moved", "mbytes", ".1f"),
               ("GB/s", "gbytes_per_s", ".2f"), ("share of copy", "share", ".2f")]
    table = _timing.markdown_table(rows, columns) + f"\n\ncopy bandwidth: {bandwidth:.2f} GB/s ({args.dtype}, " \
                                                    f"{torch.get_num_threads()} threads)"
    payload = dict(machine=_timing.machine_info(device), dtype=args.dtype, copy_gbytes_per_s=bandwidth, rows=rows)
    _timing.report(payload, table, args.out, f"diagonal_scan_bandwidth_{device.type}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
