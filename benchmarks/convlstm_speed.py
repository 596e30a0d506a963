"""ConvLSTM gate maps side by side: dense vs depthwise-separable vs grouped vs bottleneck, in frames/s.

Each gate map is timed inside the model ``factorlm video`` trains (factorlm.video.model.VideoPredictor:
patches → encoder conv → ConvLSTM stack → decoder conv, frames_in given, frames_out predicted from its
own predictions), at the same sizes apart from the gate map:

- **train**: one training step as ``factorlm video`` runs it (forward, MSE, backward, Adam step) on a
  batch of random frames; frames/s counts every frame of the sequences (frames_in + frames_out);
- **inference**: the forward alone under ``torch.inference_mode()``;

the median of ``--repeats`` timed runs after ``--warmup`` untimed ones (benchmarks/_timing.py), with the
model's exact parameters and multiply-adds per frame (factorlm.video.model.count_video_model), the
speedup over the dense gate map measured in the same run, and the theoretical speedup (the dense
model's multiply-adds over the model's). Depthwise and grouped convolutions are often memory-bound:
the gap between the two speedups is what this script is for.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/convlstm_speed.py --quick
    python benchmarks/convlstm_speed.py --lock /tmp/factorlm-cpu.lock
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _timing  # noqa: E402

from factorlm.machine import cpu_capability  # noqa: E402
from factorlm.nn.cell_args import parse_int_list  # noqa: E402
from factorlm.video.config import VideoConfig  # noqa: E402
from factorlm.video.model import VideoPredictor, count_video_model  # noqa: E402


def gate_variants(groups: int, rank: int) -> list[tuple[str, dict]]:
    return [("dense", {"gates": "dense"}), ("separable", {"gates": "separable"}), (f"grouped G={groups}", {"gates": "grouped", "groups": groups}),
            (f"bottleneck r={rank}", {"gates": "bottleneck", "rank": rank})]


def measure(config: VideoConfig, label: str, device, dtype, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = VideoPredictor(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    frames = torch.rand(config.batch_size, config.frames_in + config.frames_out, 1, config.canvas, config.canvas,
                        device=device, dtype=dtype)
    inputs, targets = frames[:, :config.frames_in], frames[:, config.frames_in:]

    def train_step():
        loss = F.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        with torch.inference_mode():
            model(inputs)

    per_step = config.batch_size * (config.frames_in + config.frames_out)
    train_s, train_all = _timing.median_seconds(train_step, device, warmup=warmup, repeats=repeats)
    infer_s, infer_all = _timing.median_seconds(infer, device, warmup=warmup, repeats=repeats)
    counts = count_video_model(config)
    return {"gates": label, "params": counts["total_params"], "convlstm_params": counts["convlstm_params"],
            "macs_per_frame": counts["total_macs_per_frame"], "train_ms": 1e3 * train_s,
            "train_frames_per_s": per_step / train_s, "infer_ms": 1e3 * infer_s,
            "infer_frames_per_s": per_step / infer_s, "train_times_s": train_all, "infer_times_s": infer_all}


def table(rows: list[dict]) -> str:
    return _timing.markdown_table(rows, [
        ("gate map", "gates", "s"), ("parameters", "params", ","), ("ConvLSTM parameters", "convlstm_params", ","),
        ("MACs/frame", "macs_per_frame", ","), ("theory", "theory", ".2f"),
        ("train ms/step", "train_ms", ".1f"), ("train frames/s", "train_frames_per_s", ",.0f"),
        ("train speedup", "train_speedup", ".2f"), ("inference ms", "infer_ms", ".1f"),
        ("inference frames/s", "infer_frames_per_s", ",.0f"), ("inference speedup", "infer_speedup", ".2f")])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a dry run: batch 2, 3 + 2 frames, one warm-up and two timed runs (checks the script, "
                        "not the speed)")
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-channels", type=parse_int_list, default=(32, 32), help="one per layer, e.g. 32,32")
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--groups", type=int, default=4, help="for the grouped gate map")
    parser.add_argument("--rank", type=int, default=16, help="for the bottleneck gate map")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(_timing.DTYPES), default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model and mode (the median is reported)")
    parser.add_argument("--lock", default=None, help="hold an flock on this path around each model")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/"
                                                   "convlstm_speed_<device>_<dtype>.json)")
    args = parser.parse_args(argv)
    hidden = args.hidden_channels if isinstance(args.hidden_channels, tuple) else (args.hidden_channels,)
    base = dict(canvas=args.canvas, batch_size=args.batch_size, hidden_channels=hidden, kernel_size=args.kernel_size,
                source="shapes")
    if args.quick:
        base.update(batch_size=2, frames_in=3, frames_out=2)
        args.warmup, args.repeats = 1, 2
    device, dtype = torch.device(args.device), _timing.DTYPES[args.dtype]
    rows = []
    for label, kw in gate_variants(args.groups, args.rank):
        config = VideoConfig(**base, **kw)
        with _timing.maybe_locked(args.lock):
            rows.append(measure(config, label, device, dtype, args.warmup, args.repeats))
        print(f"{label}: train {rows[-1]['train_frames_per_s']:,.0f} frames/s, inference "
              f"{rows[-1]['infer_frames_per_s']:,.0f} frames/s", file=sys.stderr, flush=True)
    dense = rows[0]
    for row in rows:
        row["theory"] = dense["macs_per_frame"] / row["macs_per_frame"]
        row["train_speedup"] = dense["train_ms"] / row["train_ms"]
        row["infer_speedup"] = dense["infer_ms"] / row["infer_ms"]
    payload = {"benchmark": "convlstm_speed", "quick": args.quick, "machine": _timing.machine_info(device),
               "cpu_capability": cpu_capability(), "device": str(device), "dtype": args.dtype,
               "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
               "config": {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}, "rows": rows}
    _timing.report(payload, table(rows), args.out, f"convlstm_speed_{device.type}_{args.dtype}.json")
    return payload


if __name__ == "__main__":
    main()
