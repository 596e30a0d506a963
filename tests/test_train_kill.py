"""Real training processes stopped by signals: SIGTERM and SIGINT save and exit with 143 and 130,
SIGKILL at random moments (some during a checkpoint save) loses nothing. After every stop the run
is started again with --resume (or afresh, when no checkpoint was written yet); at the end
metrics.jsonl holds each step once, in order, with the losses of an uninterrupted run, and no
temporary file is left.

The debug preset on the built-in corpus, a checkpoint after every step. Each child wraps
torch.save with a short pause after the write (before the fsync and rename), so that a kill
during a save is likely rather than lucky; nothing else about the process changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factorlm.configs import resolve
from factorlm.data import open_corpus
from factorlm.train.checkpoint import load_checkpoint
from factorlm.train.loop import Trainer

STEPS = 30
OPTIONS = {"max_steps": STEPS, "batch_size": 4, "log_every": 1, "checkpoint_minutes": 0.0}
ARGS = ["--max-steps", str(STEPS), "--batch-size", "4", "--log-every", "1", "--checkpoint-minutes", "0", "--quiet"]
BOOTSTRAP = """
import sys, time
import torch
_save = torch.save
def paused_save(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(0.05)  # the temp file is written, not yet renamed: a kill now lands mid-save
torch.save = paused_save
from factorlm.cli import main
sys.exit(main(sys.argv[1:]))
"""
#: how each run before the last one is stopped: a clean signal, or SIGKILL at a random moment
#: ("random") or as soon as a checkpoint save is under way ("save")
STOPS = [("SIGTERM", None), ("SIGKILL", "save"), ("SIGKILL", "random"), ("SIGINT", None), ("SIGKILL", "save")]
#: one thread per process: the children and the reference compute alike, and on a busy machine
#: threads waiting for each other would only burn time
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(out: Path) -> subprocess.Popen:
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    return subprocess.Popen([sys.executable, "-c", BOOTSTRAP, "train", "--out", str(out), *ARGS, *resume],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **THREADS})


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def _wait(condition, proc: subprocess.Popen, seconds: float = 90.0) -> bool:
    """Poll ``condition`` until it holds (True) or the process ends (False)."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the training process made no progress")
        time.sleep(0.001)
    return False


def _reference_losses(tmp_path: Path, monkeypatch) -> dict[int, float]:
    """The same run, uninterrupted, in this process (its final evaluation skipped)."""
    monkeypatch.setattr(Trainer, "finish", lambda self: {})
    model, train = resolve("debug", overrides={"train": OPTIONS})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(model, train, open_corpus(None), tmp_path / "straight", show_progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    return _train_losses(tmp_path / "straight")


def _train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), f"steps not strictly increasing: {steps}"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_signals_and_kills_at_random_moments_lose_nothing(tmp_path, monkeypatch):
    rng = random.Random(14)
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    killed_during_save = 0
    for name, moment in STOPS:
        proc = _start(out)
        lines = _lines(metrics)
        progressed = _wait(lambda: _lines(metrics) >= lines + rng.randint(1, 3), proc)
        assert progressed, f"the run ended before it could be stopped: {proc.stderr.read()}"
        if moment == "save":
            _wait(lambda: bool(_temp_files(out)), proc)
        elif moment == "random":
            time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(getattr(signal, name))
        _, err = proc.communicate(timeout=120)
        if name == "SIGKILL":
            assert proc.returncode == -signal.SIGKILL
            killed_during_save += bool(_temp_files(out))
        else:  # a clean stop: the step finishes, a checkpoint is saved, 128 + the signal number
            assert proc.returncode == 128 + getattr(signal, name), err
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"factorlm train: interrupted: stopped by {name} at step ") and "--resume" in last
            assert load_checkpoint(out)["step"] == int(last.split(" at step ")[1].split(";")[0])
    assert killed_during_save >= 1  # the kills hit a save in progress at least once

    # the last run: to the end of training; its final checkpoint is written once the checkpoint
    # is newer than the last record, and it is killed during the evaluation that follows
    proc = _start(out)
    done = _wait(lambda: _lines(metrics) >= STEPS and not _temp_files(out) and (out / "checkpoint.pt").exists()
                 and (out / "checkpoint.pt").stat().st_mtime_ns > metrics.stat().st_mtime_ns
                 and len(_train_losses(out)) == STEPS, proc)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert done or proc.returncode == 0, err
    assert load_checkpoint(out)["step"] == STEPS

    resumed, straight = _train_losses(out), _reference_losses(tmp_path, monkeypatch)
    assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step
    assert _temp_files(out) == [] and not list(out.glob(".checkpoint.pt.*"))
