"""A ``factorlm video`` run: train a ConvLSTM predictor on moving digits, checkpoint, resume, evaluate.

    for step s = 0, 1, …:   frames = train sequences s·B … s·B + B − 1   (a pure function of the seed)
        loss = MSE(model(frames[:, :frames_in]), frames[:, frames_in:]);  backward; clip; Adam step
    every checkpoint_minutes and at the end: atomic checkpoint (factorlm.train.checkpoint.save_checkpoint)
    at the end: per-frame MSE, MAE, SSIM on valid and test; results.json; strip.png

The conventions of ``factorlm train``: budgets (max_steps, max_time: whichever ends first), a run
directory refused when it holds a checkpoint unless resumed, ``--resume`` continuing exactly (the
data of step s depends only on s, so weights, optimizer state and the step are the whole position;
a resumed run equals an uninterrupted one), only budgets and reporting changeable on resume, logs
(metrics.jsonl, TensorBoard) trimmed to what the checkpoint covers, SIGINT / SIGTERM finishing the
step and saving, and one-line errors.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from factorlm.data.moving_digits import MovingDigits
from factorlm.errors import CheckpointError, ConfigError, FactorlmError, Interrupted, RunStoppedError, TrainingError
from factorlm.outputs import ensure_directory
from factorlm.progress import Progress
from factorlm.train.checkpoint import read_checkpoint, remove_stale_temp_files, save_checkpoint
from factorlm.train.logging import RunLogger, clear_logs, trim_metrics
from factorlm.train.loop import pick_device
from factorlm.video.config import VideoConfig
from factorlm.video.metrics import FrameMetrics
from factorlm.video.model import VideoPredictor, count_video_model

__all__ = ["VIDEO_FORMAT", "ADJUSTABLE", "VideoRun", "load_video_checkpoint"]

VIDEO_FORMAT = "factorlm-video-checkpoint"
#: what a resumed run may change (nothing that changes what is computed)
ADJUSTABLE = ("max_steps", "max_time", "checkpoint_minutes", "log_every")
STRIP = "strip.png"
RESULTS = "results.json"


def load_video_checkpoint(path, map_location="cpu") -> tuple[dict, Path]:
    """(payload, file) of a factorlm video checkpoint; one-line CheckpointErrors otherwise."""
    payload, path = read_checkpoint(path, map_location, format=VIDEO_FORMAT, writer="factorlm video")
    missing = [k for k in ("config", "model", "optimizer", "step", "elapsed") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return payload, path


def resumed_config(saved: VideoConfig, asked: dict, path) -> VideoConfig:
    """``saved`` with the adjustable settings of ``asked`` applied; one ConfigError naming every other
    setting asked for that differs from the saved run."""
    saved_dict = saved.to_dict()
    differ = [f"{k}={v!r} (saved: {saved_dict[k]!r})" for k, v in asked.items()
              if k not in ADJUSTABLE and _normal(v) != _normal(saved_dict[k])]
    if differ:
        raise ConfigError(f"a resumed run continues the saved one unchanged, but the command line asks for "
                          f"{'; '.join(differ)}; start a new run (another --out) to change them (a resume may "
                          f"change only {', '.join(ADJUSTABLE)})")
    return saved.replace(**{k: v for k, v in asked.items() if k in ADJUSTABLE})


def _normal(value):
    return tuple(value) if isinstance(value, list) else value


class VideoRun:
    """One run in ``out_dir``: checkpoint.pt, metrics.jsonl, tensorboard/, results.json, strip.png.

    ``VideoRun(config, out_dir)`` starts one; ``VideoRun.resume(out_dir, asked)`` continues it.
    """

    def __init__(self, config: VideoConfig, out_dir, *, device: str | None = None, show_progress: bool = True,
                 _payload: dict | None = None) -> None:
        if config.max_steps is None and config.max_time is None:
            raise ConfigError("no training budget: give --max-steps N or --max-time SECONDS")
        self.config, self.device, self.show_progress = config, pick_device(device), show_progress
        data = dict(canvas=config.canvas, digit_size=config.digit_size, frames_in=config.frames_in,
                    frames_out=config.frames_out, num_digits=config.num_digits, source=config.source,
                    seed=config.seed)
        self.train_data = MovingDigits("train", **data)  # its checks before anything is written
        self.data_args = {**data, "source": self.train_data.source}  # "auto" decided once, for every split
        self.out_dir = ensure_directory(out_dir, "run directory")
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        if _payload is None and self.checkpoint_path.exists():
            raise FileExistsError(f"{self.checkpoint_path} exists: pass --resume to continue that run, "
                                  f"or choose another --out")
        torch.manual_seed(config.seed)
        self.model = VideoPredictor(config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step, self.elapsed, self.stop_requested = 0, 0.0, None
        notes = [f"removed {len(stale)} temporary file(s) of an interrupted checkpoint save"
                 for stale in [remove_stale_temp_files(self.checkpoint_path)] if stale]
        if _payload is None:
            removed = clear_logs(self.out_dir) + [n for n in (RESULTS, STRIP) if _unlink(self.out_dir / n)]
            if removed:
                notes.append(f"removed {', '.join(removed)} of an earlier run in {self.out_dir} that left no checkpoint")
            records = 0
        else:
            self._restore(_payload)
            records, dropped = trim_metrics(self.out_dir, records=_payload.get("log_records"), step=self.step)
            if dropped:
                notes.append(f"dropped {dropped} metrics record(s) written after the checkpoint of step {self.step}")
        self.logger = RunLogger(self.out_dir, total=config.max_steps, show_progress=show_progress, desc="video",
                                records=records, purge_step=self.step + 1 if _payload is not None else None)
        for note in notes:
            self.logger.message(note)

    @classmethod
    def resume(cls, out_dir, asked: dict | None = None, *, device: str | None = None,
               show_progress: bool = True) -> "VideoRun":
        """Continue the run saved in ``out_dir``; ``asked``: settings given again (only ADJUSTABLE may differ)."""
        payload, path = load_video_checkpoint(Path(out_dir) / "checkpoint.pt")
        try:
            saved = VideoConfig.from_dict(payload["config"])
        except (ConfigError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path}: its config is invalid ({exc})") from None
        config = resumed_config(saved, dict(asked or {}), path)
        run = cls(config, out_dir, device=device, show_progress=show_progress, _payload=payload)
        changed = [f"{k} {getattr(config, k)!r} (was {getattr(saved, k)!r})" for k in ADJUSTABLE
                   if getattr(config, k) != getattr(saved, k)]
        if changed:
            run.logger.message(f"resuming at step {run.step} with {', '.join(changed)}")
        return run

    # ------------------------------------------------------------ checkpoints
    def _restore(self, payload: dict) -> None:
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.step, self.elapsed = int(payload["step"]), float(payload["elapsed"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"checkpoint {self.checkpoint_path} cannot be resumed: {text}") from None

    def save(self) -> None:
        save_checkpoint({"format": VIDEO_FORMAT, "config": self.config.to_dict(), "model": self.model.state_dict(),
                         "optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed,
                         "log_records": self.logger.records}, self.checkpoint_path)
        self._saved_step = self.step

    # ------------------------------------------------------------------ loop
    def _stop_reason(self) -> str | None:
        c = self.config
        if self.stop_requested:
            return self.stop_requested
        if c.max_steps is not None and self.step >= c.max_steps:
            return "max_steps"
        if c.max_time is not None and self.elapsed >= c.max_time:
            return "max_time"
        return None

    def train_step(self) -> float:
        """One optimizer step on the batch of step ``self.step``; its mean squared error."""
        c = self.config
        frames = self.train_data.batch(range(self.step * c.batch_size, (self.step + 1) * c.batch_size))
        frames = frames.to(self.device)
        prediction = self.model(frames[:, :c.frames_in])
        loss = F.mse_loss(prediction, frames[:, c.frames_in:])
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"non-finite training loss ({value}) at step {self.step + 1}; the last good "
                                f"checkpoint is kept: {self.checkpoint_path if self._saved_step is not None else 'none'}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_norm)
        self._updating = True
        self.optimizer.step()
        self._updating = False
        return value

    def fit(self) -> dict:
        """Train until a budget ends, save, evaluate valid and test, write results.json and strip.png."""
        c = self.config
        counts = count_video_model(c)
        self.logger.message(f"video: ConvLSTM gates {c.gates} on moving {self.train_data.source} "
                            f"({c.canvas}×{c.canvas}, {c.frames_in} frames in, {c.frames_out} out): "
                            f"{counts['total_params']:,} parameters, {counts['total_macs_per_frame']:,} "
                            f"multiply-adds per frame, device {self.device}")
        self._saved_step = self.step if self.checkpoint_path.exists() else None
        self._updating, first = False, self.step
        handlers = self._install_stop_handlers()
        last_save, window = time.monotonic(), _Window()
        try:
            while self._stop_reason() is None:
                t0 = time.monotonic()
                loss = self.train_step()
                self.elapsed += time.monotonic() - t0
                self.step += 1
                window.add(loss, time.monotonic() - t0, c.batch_size * (c.frames_in + c.frames_out))
                if self.step % c.log_every == 0:
                    self._record(window)
                if time.monotonic() - last_save >= c.checkpoint_minutes * 60:
                    self.save()
                    last_save = time.monotonic()
            if window.steps:
                self._record(window)
            if self._saved_step != self.step:
                self.save()
        except (TrainingError, KeyboardInterrupt):
            raise
        except Exception as exc:
            if self.step == first:
                raise
            if self._updating:
                outcome = "the error came inside the weight update, so the last checkpoint is kept"
            else:
                try:
                    self.save()
                    outcome = f"checkpoint of step {self.step} saved, continue with --resume"
                except Exception as again:
                    outcome = f"saving a checkpoint also failed ({again})"
            if isinstance(exc, (FactorlmError, OSError, ValueError, MemoryError)):
                raise RunStoppedError(f"{exc}; {outcome}") from exc
            raise
        finally:
            self.logger.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.stop_requested:
            raise Interrupted(f"stopped by {self.stop_requested} at step {self.step}; checkpoint saved to "
                              f"{self.checkpoint_path}, continue with --resume", signal.Signals[self.stop_requested])
        return self.finish(counts)

    def _record(self, window: "_Window") -> None:
        loss, fps = window.loss / window.steps, window.frames / max(window.seconds, 1e-9)
        self.logger.record("train", self.step, loss=loss, frames_per_sec=fps, elapsed=self.elapsed)
        left = [t for t in (self.config.max_time and self.config.max_time - self.elapsed,
                            self.config.max_steps and (self.config.max_steps - self.step) * self.elapsed / self.step)
                if t is not None]
        self.logger.progress(self.step, f"mse {loss:.5f} {fps:,.1f} frames/s", eta=max(0.0, min(left)) if left else None)
        window.reset()

    def _install_stop_handlers(self) -> dict:
        """Ctrl-C / SIGTERM: finish the step, save, stop; a second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self.stop_requested:
                raise Interrupted(f"stopped at once by a second signal ({signal.Signals(signum).name})", signum)
            self.stop_requested = signal.Signals(signum).name
            self.logger.message(f"{self.stop_requested}: finishing this step and saving a checkpoint")

        return {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, count: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Per-frame metrics over ``count`` fixed sequences of ``split``; and the first sequence's
        frames and prediction (for the strip)."""
        c = self.config
        data = MovingDigits(split, **self.data_args)
        metrics, first = FrameMetrics(), None
        self.model.eval()
        with Progress(count, split, unit="sequences", enabled=self.show_progress) as progress:
            for start in range(0, count, c.batch_size):
                frames = data.batch(range(start, min(count, start + c.batch_size))).to(self.device)
                prediction = self.model(frames[:, :c.frames_in])
                metrics.add(prediction, frames[:, c.frames_in:])
                if first is None:
                    first = (frames[0].cpu(), prediction[0].cpu())
                progress.update(frames.shape[0])
        self.model.train()
        return metrics.result(), *first

    def finish(self, counts: dict) -> dict:
        c = self.config
        results = {"steps": self.step, "train_seconds": self.elapsed,
                   "frames_per_sec": self.step * c.batch_size * (c.frames_in + c.frames_out) / self.elapsed
                   if self.elapsed else None,
                   "source": self.train_data.source, "checkpoint": str(self.checkpoint_path), "counts": counts}
        for split, count in (("valid", c.valid_sequences), ("test", c.test_sequences)):
            results[split], frames, prediction = self.evaluate(split, count)
        results["strip"] = str(write_strip(frames, prediction, c.frames_in, self.out_dir / STRIP,
                                           title=f"{c.gates} ConvLSTM, step {self.step}, test sequence 0"))
        (self.out_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
        return results


def write_strip(frames: torch.Tensor, prediction: torch.Tensor, frames_in: int, path: Path, *, title: str = "") -> Path:
    """A PNG of three rows: the input frames, the true next frames and the predicted ones.
    frames (frames_in + frames_out, 1, H, W), prediction (frames_out, 1, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("input", frames[:frames_in]), ("truth", frames[frames_in:]), ("predicted", prediction)]
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(3, cols, figsize=(1.1 * cols, 3.6), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for t in range(cols):
            ax = axes[r][t]
            ax.set_xticks([])
            ax.set_yticks([])
            if t < len(images):
                ax.imshow(images[t, 0].float().numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def _unlink(path: Path) -> bool:
    if path.is_file():
        path.unlink()
        return True
    return False


class _Window:
    """Mean loss and frames/s since the last record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.seconds, self.frames = 0.0, 0, 0.0, 0

    def add(self, loss: float, seconds: float, frames: int) -> None:
        self.loss += loss
        self.steps += 1
        self.seconds += seconds
        self.frames += frames
