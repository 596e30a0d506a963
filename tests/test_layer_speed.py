"""benchmarks/layer_speed.py's timing modes: the interleaved order and the rows both modes give
(timings themselves are for benchmarks, not tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import layer_speed  # noqa: E402


def test_interleaved_runs_every_layer_in_turn_after_the_neighbour_and_drops_the_warmup():
    calls = []
    steps = [lambda name=name: calls.append(name) for name in ("a", "b", "c")]
    results = layer_speed.interleaved_seconds(steps, lambda: calls.append("dense"), torch.device("cpu"),
                                              warmup=1, repeats=2)
    assert calls == ["dense", "a", "dense", "b", "dense", "c"] * 3
    assert len(results) == 3 and all(len(times) == 2 for _, times in results)


def test_both_modes_give_a_speedup_and_fault_count_each_and_the_plain_keys_are_the_first_modes():
    rows = layer_speed.measure_shape(8, 16, 2, torch.device("cpu"), torch.float32, warmup=0, repeats=1,
                                     modes=("isolated", "interleaved"))
    assert [row["layer"] for row in rows][:3] == ["torch.nn.LSTM", "factorlm LSTM", "FLSTM r=2"]
    for row in rows:
        for mode in ("isolated", "interleaved"):
            assert row[f"{mode}_ms"] > 0 and row[f"{mode}_faults"] >= 0
            assert row[f"{mode}_ratio"] == row[f"{mode}_speedup"] / row["theoretical_speedup"]
        assert row["mode"] == "isolated" and row["speedup"] == row["isolated_speedup"]
    assert rows[0]["isolated_speedup"] == rows[0]["interleaved_speedup"] == 1.0
    table = layer_speed.table(rows)
    assert "| interleaved ms | interleaved speedup | interleaved ratio | faults | interleaved faults |" in table
