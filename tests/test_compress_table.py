"""benchmarks/compress_table.py's plumbing: the rows it plans, their directories, what a failed row
does to the rows after it, the sizes it reports and its Markdown (the builds and timings are the
benchmark's; ``--quick`` dry-runs them, too slow for a test)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compress_table  # noqa: E402

from factorlm.models import LanguageModel, ModelConfig  # noqa: E402


def test_plan_has_every_row_of_the_issue_in_order_each_after_the_row_it_starts_from():
    rows = compress_table.plan_rows([8, (12, 16), 24], [2])
    names = [row["name"] for row in rows]
    assert names == [
        "dense", "svd r=8", "svd r=8 +ft", "svd r=12,16", "svd r=12,16 +ft", "svd r=24", "svd r=24 +ft",
        "blocks k=2", "blocks k=2 +ft", "prune s=0.5", "prune s=0.5 +ft", "prune s=0.75", "prune s=0.75 +ft",
        "prune s=0.9", "prune s=0.9 +ft", "units f=0.25", "units f=0.25 +ft", "units f=0.5", "units f=0.5 +ft",
        "distill flstm r=12,16", "distill glstm k=2", "scratch flstm r=12,16"]
    for index, row in enumerate(rows):
        for needed in (row.get("needs"), row.get("converted")):
            assert needed is None or needed in names[:index]
    by_name = {row["name"]: row for row in rows}
    # the students and the scratch model take the middle SVD rank's shape; the scratch budget is its time
    assert by_name["distill flstm r=12,16"]["cell_args"] == {"rank": (12, 16)}
    assert by_name["scratch flstm r=12,16"]["cell_args"] == {"rank": (12, 16)}
    assert by_name["scratch flstm r=12,16"]["needs"] == "svd r=12,16 +ft"
    assert by_name["scratch flstm r=12,16"]["converted"] == "svd r=12,16"
    directories = {compress_table.directory_name(name) for name in names}
    assert len(directories) == len(names) and "svd-r12_16-ft" in directories
    assert all("=" not in d and " " not in d and "," not in d for d in directories)


def test_block_counts_must_divide_the_embedding_hidden_and_projection_sizes():
    config = ModelConfig(vocab_size=20, embedding_size=8, hidden_size=12, num_layers=1)
    assert compress_table.blocks_fit(config, 2) and compress_table.blocks_fit(config, 4)
    assert not compress_table.blocks_fit(config.replace(hidden_size=10), 4)
    assert not compress_table.blocks_fit(config.replace(proj_size=6), 4)


def test_ranks_option_one_rank_or_one_per_layer_each():
    assert compress_table.parse_ranks("16/32/64") == [16, 32, 64]
    assert compress_table.parse_ranks("16,24/8") == [(16, 24), 8]


def test_sizes_count_zeros_apart_and_the_bytes_are_those_of_the_saved_state_dict():
    model = LanguageModel(ModelConfig(vocab_size=20, embedding_size=8, hidden_size=8, num_layers=1))
    with torch.no_grad():
        model.rnn.weight_hh_l0.zero_()
    sizes = compress_table.sizes(model)
    assert sizes["rnn_params"] == sum(p.numel() for p in model.rnn.parameters())
    assert sizes["rnn_nonzero"] == sizes["rnn_params"] - model.rnn.weight_hh_l0.numel()
    assert sizes["params"] == sum(p.numel() for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert sizes["weights_bytes"] == len(buffer.getvalue())


def _measured(*args) -> dict:
    """What measure() returns, for a row that is not measured here."""
    return {"rnn_params": 10, "rnn_nonzero": 10, "params": 20, "weights_bytes": 80, "tokens_per_s_b1": 1.0,
            "tokens_per_s_b32": 2.0, "perplexity": 3.0}


def test_a_failed_row_is_recorded_the_rows_built_on_it_say_so_and_the_rest_go_on(monkeypatch, tmp_path, capsys):
    specs = compress_table.plan_rows([4, 8, 12], [])
    calls = []

    def build(spec, out, built, ctx):
        calls.append(spec["name"])
        if spec["name"] == "svd r=8":
            raise ValueError("rank 8 is not allowed here")
        out.mkdir(parents=True)
        return {"seconds": 1.0, "train_seconds": 2.0}

    monkeypatch.setattr(compress_table, "build", build)
    monkeypatch.setattr(compress_table, "measure", _measured)
    ctx = compress_table.Context(teacher=tmp_path / "teacher", work=tmp_path / "work")
    written = []
    rows = compress_table.run_rows(specs, ctx, on_row=lambda rows: written.append(len(rows)))
    assert written == list(range(1, len(specs) + 1))
    errors = {row["method"]: row.get("error") for row in rows}
    assert errors["svd r=8"] == "ValueError: rank 8 is not allowed here"
    assert errors["svd r=8 +ft"] == "NeedsFailedRow: needs row 'svd r=8', which failed"
    assert errors["scratch flstm r=8"] == "NeedsFailedRow: needs row 'svd r=8 +ft', which failed"
    assert "svd r=8 +ft" not in calls and "scratch flstm r=8" not in calls
    assert errors["distill flstm r=8"] is None and errors["units f=0.5 +ft"] is None
    assert sum(error is not None for error in errors.values()) == 3
    # a built row leaves row.json: the same command again measures it but does not build it
    calls.clear()
    again = compress_table.run_rows(specs, ctx)
    assert calls == ["svd r=8"]
    assert [row.get("error") for row in again] == [row.get("error") for row in rows]
    table = compress_table.table(rows).splitlines()
    assert table[0].startswith("| method | recurrent params | nonzero | params | weights bytes | tok/s b=1 |")
    assert table[5].startswith("| svd r=8 | – | – |")
    assert table[5].endswith("| failed: ValueError: rank 8 is not allowed here |")
    assert table[4].startswith("| svd r=4 +ft | 10 | 10 | 20 | 80 | 1 | 2 | 3.00 | 2.0 |")


def test_a_directory_left_by_a_stopped_build_is_not_built_over(monkeypatch, tmp_path):
    monkeypatch.setattr(compress_table, "build", lambda *a: {"seconds": 0.0})
    monkeypatch.setattr(compress_table, "measure", _measured)
    ctx = compress_table.Context(teacher=tmp_path / "teacher", work=tmp_path)
    (tmp_path / "prune-s0.5").mkdir()
    (tmp_path / "prune-s0.5" / "checkpoint.pt").write_bytes(b"")
    rows = compress_table.run_rows([{"name": "prune s=0.5", "kind": "prune", "needs": None, "sparsity": 0.5}], ctx)
    assert "holds an unfinished build from an earlier run (no row.json): delete it" in rows[0]["error"]


def test_a_row_kept_from_an_earlier_run_must_have_been_built_with_the_same_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(compress_table, "build", lambda *a: {"seconds": 0.5, "train_seconds": 1.0})
    monkeypatch.setattr(compress_table, "measure", _measured)
    ctx = compress_table.Context(teacher=tmp_path / "teacher", work=tmp_path, finetune_seconds=60.0, finetune_lr=0.1)
    specs = compress_table.plan_rows([4], [], sparsities=(), fractions=())[:3]  # dense, svd r=4, svd r=4 +ft
    assert [row.get("error") for row in compress_table.run_rows(specs, ctx)] == [None] * 3
    ctx.finetune_seconds = 300.0
    rows = compress_table.run_rows(specs, ctx)
    assert rows[1].get("error") is None  # the conversion has no budget: kept
    assert rows[2]["error"] == (f"RuntimeError: {tmp_path / 'svd-r4-ft'} was built with finetune_seconds 60.0 "
                                f"(now 300.0): delete it, or give another --work")


def test_the_scratch_budget_is_the_conversion_plus_the_fine_tuning_and_optionally_the_teacher():
    budget = compress_table.scratch_budget("svd r=8", {"seconds": 1.25}, {"train_seconds": 300.5})
    assert budget == (301.75, "svd r=8 conversion 1.2 s + fine-tuning 300.5 s")
    seconds, text = compress_table.scratch_budget("svd r=8", {"seconds": 1.25}, {"train_seconds": 300.5}, 7200.0)
    assert seconds == 7501.75 and text.startswith("teacher 7200.0 s + svd r=8 conversion")
