"""The block-circulant LSTM's two product methods side by side: dense W materialised vs FFT.

For each shape (n, p, b, B, T), input size = proj_size = p, one CirculantLSTM layer is timed with
``method="dense"`` (W gathered once per forward, then the dense time loop ``impl`` picks) and
``method="fft"`` (spectra once per forward, products in the frequency domain), training (forward
+ backward, ``output.backward(grad)``) and inference (forward under torch.no_grad), and the dense
torch.nn.LSTM of the same sizes for scale. The median of ``--repeats`` timed runs after
``--warmup`` untimed ones (benchmarks/_timing.py), with the method each takes per token in
multiply-adds (CirculantLSTM.macs_per_token) and fft/dense, the FFT method's time over the dense
one's (< 1: FFT faster). The rule CirculantLSTM's method "auto" follows
(factorlm.nn.circulant.auto_method) comes from these numbers.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/circulant_speed.py --quick
    python benchmarks/circulant_speed.py --lock /tmp/factorlm-cpu.lock --out results.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.machine import cpu_capability  # noqa: E402
from factorlm.nn import CirculantLSTM  # noqa: E402
from factorlm.ops import _extension  # noqa: E402

#: (n, p, b, B, T): small to whole-width blocks at a small and a mid-size layer, batch 1, 32 and 128
GRID = [
    (256, 64, 4, 32, 20), (256, 64, 16, 32, 20), (256, 64, 64, 32, 20),
    (1024, 256, 8, 32, 20), (1024, 256, 32, 32, 20), (1024, 256, 128, 32, 20), (1024, 256, 256, 32, 20),
    (1024, 256, 32, 1, 20), (1024, 256, 256, 1, 20), (1024, 256, 256, 128, 20),
]
QUICK_GRID = [(256, 64, 16, 32, 20), (1024, 256, 32, 32, 20), (1024, 256, 256, 32, 20)]
METHODS = ("dense", "fft")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is n,p,b,B,T (five positive ints), got {text!r}")
    return shape


def measure(n: int, p: int, b: int, batch: int, steps: int, device, dtype, warmup: int, repeats: int) -> list[dict]:
    """Rows for one shape: torch.nn.LSTM, then each method, training and inference."""
    new = dict(device=device, dtype=dtype)
    x = torch.randn(steps, batch, p, **new, requires_grad=True)
    grad = torch.randn(steps, batch, p, **new)
    layers = {"torch.nn.LSTM": torch.nn.LSTM(p, n, proj_size=p).to(**new)}
    for method in METHODS:
        layer = CirculantLSTM(p, n, proj_size=p, block=b).to(**new)
        layer.method = method
        layers[method] = layer

    def train(layer):
        out, _ = layer(x)
        out.backward(grad)

    def infer(layer):
        with torch.no_grad():
            layer(x)

    rows = []
    for mode, fn in (("train", train), ("infer", infer)):
        times = {}
        for label, layer in layers.items():
            seconds, all_times = _timing.median_seconds(lambda: fn(layer), device, warmup=warmup, repeats=repeats)
            times[label] = seconds
            row = dict(n=n, p=p, b=b, B=batch, T=steps, mode=mode, layer=label, ms=seconds * 1e3,
                       times_ms=[t * 1e3 for t in all_times])
            if label in METHODS:
                row["macs_per_token"] = layers[label].macs_per_token()
            rows.append(row)
        for row in rows[-len(layers):]:
            row["fft_over_dense"] = times["fft"] / times["dense"]
            row["vs_nn_lstm"] = times["torch.nn.LSTM"] / times[row["layer"]]
    return rows


def table(rows: list[dict]) -> str:
    columns = [("n", "n", "d"), ("p", "p", "d"), ("b", "b", "d"), ("B", "B", "d"), ("T", "T", "d"),
               ("mode", "mode", "s"), ("layer", "layer", "s"), ("MACs/token", "macs_per_token", ","),
               ("ms", "ms", ".2f"), ("speedup vs nn.LSTM", "vs_nn_lstm", ".2f"), ("fft/dense", "fft_over_dense", ".2f")]
    return _timing.markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the shapes {QUICK_GRID} only")
    parser.add_argument("--shape", type=parse_shape, action="append", help="n,p,b,B,T (repeatable; replaces the grid)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(_timing.DTYPES), default="fp32")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per layer and mode")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per layer and mode (the median is reported)")
    parser.add_argument("--lock", default=None, help="hold an flock on this path around each shape")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/"
                                                   "circulant_speed_<device>_<dtype>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = _timing.DTYPES[args.dtype]
    shapes = args.shape or (QUICK_GRID if args.quick else GRID)
    torch.manual_seed(0)
    extension = _extension.is_available() if device.type == "cpu" else False  # built outside the timings
    rows = []
    for shape in shapes:
        with _timing.maybe_locked(args.lock):
            shape_rows = measure(*shape, device, dtype, args.warmup, args.repeats)
        rows += shape_rows
        print(table(shape_rows), "\n", flush=True)
    payload = {
        "benchmark": "circulant_speed",
        "machine": _timing.machine_info(device),
        "cpu_capability": cpu_capability(),
        "device": str(device),
        "dtype": args.dtype,
        "c++ extension": extension,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }
    _timing.report(payload, table(rows), args.out, f"circulant_speed_{device.type}_{args.dtype}.json")
    return payload


if __name__ == "__main__":
    main()
