"""benchmarks/gpu_check.py without a GPU: the driver's plumbing (a part that fails or runs past its
limit is recorded and the next one runs; the summaries are written), the timed parts at toy sizes
on the CPU, and the CUDA tests' own checking logic run on the CPU. Nothing here is timed."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
import test_cuda  # noqa: E402

#: what the fake parts do, in their own processes: record and succeed, record and raise, record and
#: hang (plain Python writing the part's JSON as gpu_check.Recorder does: no torch to import, so a
#: part starts in milliseconds and a 2 s limit is far from its start-up)
FAKE_PARTS = {
    "fine": "record({'rows': [1, 2]})",
    "broken": "record({'rows': [1]})\ntry:\n    raise ValueError('planted failure 1234')\n"
              "except ValueError:\n    record({'rows': [1], 'error': traceback.format_exc()})\n    raise",
    "stuck": "record({'rows': [1]})\ntime.sleep(60)",
}


def fake_command(part, result_path, dry):
    script = (f"import json, pathlib, time, traceback\n"
              f"def record(data):\n    pathlib.Path({str(result_path)!r}).write_text(json.dumps(data))\n"
              f"{FAKE_PARTS[part.name]}\n")
    return [sys.executable, "-c", script]


def test_failed_and_stuck_parts_are_recorded_and_the_next_part_runs(tmp_path, monkeypatch):
    limits = {"broken": 60, "stuck": 2, "fine": 60}
    parts = {name: gpu_check.Part(name, f"the {name} part", limit, limit, gpu_check.part_cuda_tests)
             for name, limit in limits.items()}
    monkeypatch.setattr(gpu_check, "PARTS_BY_NAME", parts)
    monkeypatch.setattr(gpu_check, "part_command", fake_command)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"python": "3", "torch": torch.__version__})
    code = gpu_check.main(["--out", str(tmp_path), "--dry-run", "--parts", "broken,stuck,fine"])
    assert code == 1  # not every part passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    broken, stuck, fine = (summary["parts"][name] for name in ("broken", "stuck", "fine"))
    assert broken["status"] == "failed (exit 1)" and "planted failure 1234" in broken["results"]["error"]
    assert stuck["status"] == "timed out after 2 s" and stuck["results"]["rows"] == [1]  # kept what it recorded
    assert fine["status"] == "ok" and fine["results"]["rows"] == [1, 2]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| broken | failed (exit 1) |" in report and "| stuck | timed out after 2 s |" in report
    assert "ValueError: planted failure 1234" in report
    assert "planted failure 1234" in (tmp_path / "gpu_check.log").read_text()


def test_unknown_parts_are_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--parts", "doctor,warp_drive"])
    assert "unknown part(s) warp_drive; the parts are cuda_tests, doctor" in capsys.readouterr().err


def test_an_exception_in_a_part_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def explode(rec, sizes, dry):
        rec["rows"] = ["first"]
        raise RuntimeError("out of planted memory")

    monkeypatch.setitem(gpu_check.PARTS_BY_NAME, "doctor", dataclasses.replace(gpu_check.PARTS_BY_NAME["doctor"],
                                                                                  run=explode))
    result = tmp_path / "doctor.json"
    assert gpu_check.part_main("doctor", result, dry=True) == 1
    recorded = json.loads(result.read_text())
    assert recorded["rows"] == ["first"] and "RuntimeError: out of planted memory" in recorded["error"]


def test_the_timed_parts_run_at_toy_sizes_on_the_cpu(tmp_path, monkeypatch, fresh_extension_state):
    monkeypatch.setattr(gpu_check, "device", lambda: torch.device("cpu"))
    monkeypatch.setenv("FACTORLM_NO_EXTENSION", "1")
    sizes = dataclasses.replace(gpu_check.DRY, layer_shapes=((8, 32, 2),), lm_models=("biglstm", "biglstm-g4"),
                                launch_shapes=((8, 32, 2),))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        results = {}
        for name in ("layer_speed", "lm_step", "launch_overhead"):
            rec = gpu_check.Recorder(tmp_path / f"{name}.json")
            gpu_check.PARTS_BY_NAME[name].run(rec, sizes, True)
            results[name] = json.loads((tmp_path / f"{name}.json").read_text())
            assert "errors" not in results[name], results[name]["errors"]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    layer_rows = results["layer_speed"]["rows"]
    assert {row["precision"] for row in layer_rows} == set(gpu_check.PRECISIONS)
    assert {row["layer"] for row in layer_rows} >= {"torch.nn.LSTM", "GLSTM k=4"}
    assert all(row["us_per_step"] > 0 and row["share_of_fp32_peak"] > 0 for row in layer_rows)
    assert "no CUDA device" in results["layer_speed"]["triton"]
    lm_rows = results["lm_step"]["rows"]
    assert [(row["model"], row["precision"]) for row in lm_rows] == [
        (model, precision) for precision in gpu_check.PRECISIONS for model in ("biglstm", "biglstm-g4")]
    # one profile table per precision: the slowest model's
    assert sum("profile" in row for row in lm_rows) == len(gpu_check.PRECISIONS)
    launch = results["launch_overhead"]
    assert "no CUDA device" in launch["skipped"] and len(launch["rows"]) == 3
    assert all(row["eager_us_per_step"] > 0 and "graph_us_per_step" not in row for row in launch["rows"])
    summary = {"dry_run": True, "started": "now", "command": "test", "environment": {},
               "parts": {name: {"title": name, "status": "ok", "seconds": 1.0, "limit_s": 60, "results": results[name]}
                         for name in results}}
    report = gpu_check.markdown(summary)
    assert "| bf16-autocast | 8 | 32 | 2 | GLSTM k=4 |" in report and "Profile of the slowest" in report


@pytest.mark.parametrize("cell", test_cuda.CELLS)
@pytest.mark.parametrize("precision,mode", [("fp64", "packed-bidirectional"), ("bf16-autocast", "carried-state")])
def test_the_cuda_checks_themselves_pass_on_the_cpu(cell, precision, mode):
    """tests/test_cuda.py's check, run on the CPU with the PyTorch loop: its own reference, state
    carrying, packing and tolerances are right before a GPU runs them."""
    test_cuda.check(cell, "torch", precision, mode, device="cpu")


@pytest.mark.parametrize("cell", test_cuda.CELLS)
def test_the_shared_gates_cuda_check_passes_on_the_cpu(cell):
    """The same for its shared-gates cases (shared_gates with proj_rank, under bf16 autocast)."""
    test_cuda.check(cell, "torch", "bf16-autocast", "packed-bidirectional", device="cpu", shared=True)


def test_the_cuda_checks_catch_a_wrong_layer(monkeypatch):
    """The check fails when the layer under test computes something else (here: its copy gets a
    forget bias the reference does not have), so a pass on the GPU means agreement."""
    original_deepcopy = test_cuda.copy.deepcopy

    def wrong_copy(layer):
        copied = original_deepcopy(layer)
        copied.forget_bias += 0.5
        return copied

    monkeypatch.setattr(test_cuda.copy, "deepcopy", wrong_copy)
    with pytest.raises(AssertionError, match="off by"):
        test_cuda.check("flstm", "torch", "fp32", "given-state", device="cpu")
