"""Run logging: a progress bar on a terminal, JSON lines, TensorBoard scalars and a loss-curve PNG.

Only the main process (rank 0) logs; other ranks get a logger that does nothing.

The logs of a run directory describe one run, with no step twice: a checkpoint stores how many
metrics.jsonl records it covers (``RunLogger.records``), and a resumed run first drops the records
written after it (``trim_metrics``; TensorBoard hides them through its ``purge_step``). A new run
in a directory whose earlier run left logs but no checkpoint starts them afresh (``clear_logs``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
#: what a finished run writes besides its logs (they describe that run, not a new one)
RESULTS = ("results.json", "loss_curve.png")


class RunLogger:
    def __init__(self, out_dir: Path, *, total: int | None = None, enabled: bool = True, show_progress: bool = True,
                 desc: str = "train", records: int = 0, purge_step: int | None = None) -> None:
        """enabled: write the run's logs (False on ranks other than 0); show_progress: print to the terminal.

        records: metrics.jsonl records already in the file (a resumed run's, after trim_metrics);
        purge_step: TensorBoard hides the events this directory holds from this step on.
        """
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.show_progress = show_progress
        self.records = records  # records in metrics.jsonl: what a checkpoint written now covers
        self.bar = None
        self.writer = None
        self._last_print = 0.0
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(self.out_dir / METRICS, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD), purge_step=purge_step)
        except Exception as exc:  # tensorboard missing or broken: the JSON log still has everything
            warnings.warn(f"TensorBoard logging disabled ({exc}); metrics.jsonl is still written")
        if show_progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def record(self, kind: str, step: int, **values) -> None:
        """Append one record to metrics.jsonl and TensorBoard (as kind/name scalars)."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.records += 1
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def progress(self, step: int, text: str, *, eta: float | None = None) -> None:
        """Move the progress bar (terminal) or print a line at most every 10 s (logs, CI)."""
        if not (self.enabled and self.show_progress):
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self._last_print >= 10.0:
            self._last_print = time.monotonic()
            eta_text = f" eta {_duration(eta)}" if eta is not None else ""
            print(f"step {step}: {text}{eta_text}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not (self.enabled and self.show_progress):
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def clear_logs(out_dir: Path) -> list[str]:
    """Remove the logs and results an earlier run left in ``out_dir`` (for a new run there);
    returns the names removed. Only factorlm's own files: TensorBoard's event files, not the folder."""
    out_dir = Path(out_dir)
    removed = []
    for name in (METRICS, *RESULTS):
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    events = sorted((out_dir / TENSORBOARD).glob("events.out.tfevents.*")) if (out_dir / TENSORBOARD).is_dir() else []
    for event_file in events:
        event_file.unlink()
    if events:
        removed.append(f"{TENSORBOARD}/ ({len(events)} event file{'s' if len(events) > 1 else ''})")
    return removed


def trim_metrics(out_dir: Path, *, records: int | None, step: int) -> tuple[int, int]:
    """Cut metrics.jsonl back to what a checkpoint covers: its first ``records`` records, or (a
    checkpoint from before the count was stored: None) the records up to ``step``. A line cut
    short by a kill is dropped too. Returns (records kept, records dropped); rewrites atomically."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return 0, 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, partial = lines[:-1], lines[-1]  # the text after the last newline never finished
    if records is not None:
        kept = complete[:records]
    else:
        steps = [_record_step(line) for line in complete]
        kept = [line for line, s in zip(complete, steps) if s is not None and s <= step]
    dropped = len(complete) - len(kept) + (1 if partial.strip() else 0)
    if dropped:
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    return len(kept), dropped


def _record_step(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plot_loss_curve(metrics_path: Path, png_path: Path, *, optimal_loss: float | None = None) -> Path | None:
    """Training loss against steps and against training time (unit fitted to the run), with validation points, as a PNG."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(r["elapsed"] for r in train + valid)
    unit, scale = ("hours", 3600.0) if longest >= 7200 else ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((by_step, "step", "optimizer step"), (by_time, "time", f"training {unit}")):
        xs = [r["step"] if key == "step" else r["elapsed"] / scale for r in train]
        ax.plot(xs, [r["loss"] for r in train], label="train loss", lw=1)
        if valid:
            vx = [r["step"] if key == "step" else r["elapsed"] / scale for r in valid]
            ax.plot(vx, [r["loss"] for r in valid], "o-", label="valid loss (exact)")
        if optimal_loss is not None:
            ax.axhline(optimal_loss, color="k", ls="--", lw=1, label="best possible (built-in corpus)")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle(Path(metrics_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
