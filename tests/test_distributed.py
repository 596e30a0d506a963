"""Several processes (gloo on 127.0.0.1, as torchrun runs them): one step of 2 ranks × B rows equals
one process's step on 2B rows, exact evaluation shared by 2 ranks equals one process's, an elastic
torchrun run survives a worker killed by SIGKILL, and bad set-ups give one clear line."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_workers as workers
from factorlm.cli import main
from factorlm.data import ContiguousBatcher, open_corpus, split_stream
from factorlm.distributed import ProcessInfo, agree_generation, init_processes
from factorlm.errors import SetupError
from factorlm.evaluate import evaluate_stream
from factorlm.models import LanguageModel
from factorlm.train.loop import Trainer

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(WORLD, _free_port(), *args), nprocs=WORLD, join=True)


# ------------------------------------------------------------------ one step
@pytest.mark.parametrize("optimizer,sparse", [("sgd", False), ("sgd", True), ("adagrad", True), ("adagrad", False)])
def test_two_ranks_take_the_step_of_one_process_with_twice_the_batch(tmp_path, optimizer, sparse):
    out = tmp_path / "params.pt"
    _spawn(workers.step_worker, optimizer, sparse, str(out))
    distributed = torch.load(out)

    model, opt = workers.build(optimizer, sparse)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs, targets = workers.step_data(WORLD)
    workers.one_step(model, opt, inputs, targets, ProcessInfo())
    moved = 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=0, atol=1e-10, msg=name)
        moved += int(not torch.equal(value, before[name]))
    assert moved >= len(before) - 1  # the step changed (almost) every tensor: the comparison is not vacuous


# ---------------------------------------------------------------- evaluation
@pytest.mark.parametrize("max_passes", [3, 1])  # 1: not converged after one pass, the in-order rows on rank 0
def test_exact_evaluation_shared_by_two_ranks_equals_one_process(tmp_path, max_passes):
    generator = torch.Generator().manual_seed(3)
    stream = torch.randint(0, workers.MODEL.vocab_size, (203,), generator=generator)
    out = tmp_path / "result.pt"
    _spawn(workers.evaluate_worker, stream, 5, max_passes, str(out))  # 5 rows: 6 when shared by 2 ranks
    shared = torch.load(out)
    torch.manual_seed(0)
    model = LanguageModel(workers.MODEL).double()
    one_process = evaluate_stream(model, stream, batch_size=6, num_steps=4, max_passes=max_passes)
    definition = evaluate_stream(model, stream, batch_size=1, num_steps=4)  # one row, in order
    assert shared["tokens"] == one_process.tokens == definition.tokens == 202
    assert shared["loss"] == pytest.approx(one_process.loss, abs=1e-12)
    # converged states: within tol's effect (tol = 1e-5 on the states moves this tiny model's loss by
    # up to ~1e-7: which checkpoint a row stops at can turn on rounding, e.g. the weights' layout)
    assert shared["loss"] == pytest.approx(definition.loss, abs=1e-7)
    # each rank stops its own rows early, at the same checkpoints as one process: the same work
    assert (shared["passes"], shared["rescored_tokens"]) == (one_process.passes, one_process.rescored_tokens)
    if max_passes == 1:
        assert shared["sequential_rows"] == 5


# ------------------------------------------------------------------ torchrun
def _torchrun(out: Path, *extra: str, max_steps: int = 150, restarts: int = 3) -> subprocess.Popen:
    """torchrun with 2 CPU workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--max-restarts={restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "factorlm", "train",
           "--preset", "debug", "--out", str(out), "--max-steps", str(max_steps), "--log-every", "5",
           "--checkpoint-minutes", "0.01", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill_all(proc: subprocess.Popen) -> None:
    """Kill torchrun and its workers if still running: torchrun starts each worker in a session of its
    own, so killing torchrun's process group alone would leave them behind after a failed test."""
    if proc.poll() is None:
        workers_left = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers_left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r["kind"] == "train"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_torchrun_restarts_after_a_worker_is_killed_and_finishes(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                (out / "checkpoint.pt").exists() and len(_train_steps(out / "metrics.jsonl")) >= 6):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        workers_now = _children(proc.pid)
        assert len(workers_now) == WORLD, f"expected {WORLD} workers under torchrun, found {workers_now}"
        os.kill(workers_now[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=180)
    finally:
        _kill_all(proc)
    assert proc.returncode == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 150 and "test" in results
    steps = _train_steps(out / "metrics.jsonl")
    assert steps == sorted(set(steps)) and steps[-1] == 150  # strictly increasing: no record twice
    assert max(b - a for a, b in zip(steps, steps[1:])) <= 5  # no gap beyond one log interval
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["world_size"] == WORLD for r in records if r["kind"] == "train")
    assert not list(out.glob("*.tmp"))


def test_each_launch_agrees_on_a_new_generation_despite_an_earlier_launchs_keys():
    """torchrun keeps one store across restarts: a killed launch's keys (a token never answered, the
    last generation) must not make a restarted launch's ranks disagree (pytorch/pytorch#135712)."""
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=30))
    world = 3
    store.set("factorlm/token/2", "from-a-killed-launch")  # sent, never answered: its rank 0 died
    for launch in (1, 2, 3):
        agreed = [None] * world

        def join(rank):
            agreed[rank] = agree_generation(store, ProcessInfo(rank=rank, world_size=world))

        threads = [threading.Thread(target=join, args=(rank,)) for rank in reversed(range(world))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert agreed == [launch] * world


def test_resuming_with_another_process_count_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "2", "--quiet"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SetupError, match=r"written by 1 process\(es\) and this run has 2: resume with the same count"):
        Trainer.resume(out, open_corpus(None), show_progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it(capsys):
    with pytest.raises(SetupError, match="no CUDA GPU .* use --device cpu"):
        init_processes(torch.device("cuda"))
    assert main(["train", "--out", "/nonexistent-never-created", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_too_many_processes_for_the_data_rows():
    corpus = open_corpus(None)
    stream = split_stream(corpus, "valid")[:100]
    batcher = ContiguousBatcher(lambda: stream, 20, 5, rank=1, world_size=8)
    with pytest.raises(ValueError, match=r"too few for batch_size 20 x world_size 8 = 160 rows"):
        next(batcher.epoch_batches(0))


def test_bad_rank_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(SetupError, match=r"RANK=5 is not in \[0, WORLD_SIZE=2\)"):
        ProcessInfo.from_env()
