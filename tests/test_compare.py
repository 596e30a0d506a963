"""factorlm compare: the scaled paper family, a test-sized comparison on the built-in corpus (table,
CSV, figures), skipping finished models, continuing an interrupted one, bad set-ups, real corpora."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from factorlm.cli import main
from factorlm.compare import Budget, build_entries, parse_scale, scale_paper_model
from factorlm.compare.family import fit_to_vocabulary
from factorlm.configs import model_preset, resolve
from factorlm.count import count_model
from factorlm.data import open_corpus
from factorlm.data.corpus import LM1B_HELDOUT_DIR, LM1B_TRAIN_DIR, LM1B_TEST, LM1B_VALID
from factorlm.errors import ConfigError
from factorlm.train.loop import Trainer
from factorlm.train.optim import EMA
from helpers import SHARED_DATA

TINY = ["--scale", "1/64"]  # p = 16, n = 128, F rank 8: seconds per model
PNGS = ("loss_vs_time.png", "loss_vs_steps.png", "ppl_vs_params.png")


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(path)  # raises on a file that is not a valid PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ------------------------------------------------------------------ family
def test_scale_keeps_the_papers_ratios():
    for name, cell_args in (("biglstm", {}), ("biglstm-f512", {"rank": 64}), ("biglstm-g4", {"groups": 4})):
        config = scale_paper_model(model_preset(name), parse_scale("1/8"))
        assert (config.embedding_size, config.proj_size, config.hidden_size) == (128, 128, 1024)
        assert dict(config.cell_args) == cell_args
        assert config.num_sampled == 1024 and config.dropout == 0.1 and config.forget_bias == 1.0
    assert scale_paper_model(model_preset("biglstm-g8"), 1.0) == model_preset("biglstm-g8")
    # the ratios of the paper's RNN parameter counts hold at any scale (F512 and G4 at a third, G8 at a ninth...)
    counts = {name: count_model(scale_paper_model(model_preset(name), 0.125))["rnn_params"]
              for name in ("biglstm", "biglstm-f512", "biglstm-g2", "biglstm-g4", "biglstm-g8")}
    assert counts["biglstm"] / counts["biglstm-g2"] == pytest.approx(151.0 / 83.9, rel=0.02)
    assert counts["biglstm"] / counts["biglstm-f512"] == pytest.approx(151.0 / 52.5, rel=0.02)


def test_scale_rounds_to_a_size_every_group_count_divides():
    config = scale_paper_model(model_preset("biglstm-g8"), 0.1)  # 102.4 -> 104
    assert config.proj_size == 104 and config.hidden_size == 832 and config.proj_size % 8 == 0


@pytest.mark.parametrize("text", ["0", "2", "-1/8", "abc", "1/0", ""])
def test_bad_scale_is_refused_with_its_value(text):
    with pytest.raises(ValueError, match=r"--scale"):
        parse_scale(text)


def test_small_vocabulary_gets_the_full_softmax():
    config = scale_paper_model(model_preset("biglstm"), 0.5)  # 4096 candidates
    fitted, note = fit_to_vocabulary(config, 1000)
    assert fitted.num_sampled == 0 and fitted.vocab_size == 1000 and "full softmax" in note
    fitted, note = fit_to_vocabulary(config, 50_000)
    assert fitted.num_sampled == 4096 and note is None


def test_entries_need_unique_names_and_known_presets(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'bigltsm'"):
        build_entries(["bigltsm"], [], 1 / 8)
    config = tmp_path / "debug.json"
    config.write_text(json.dumps({"preset": "debug"}))
    with pytest.raises(ConfigError, match="repeated: debug"):
        build_entries(["debug"], [str(config)], 1 / 8)
    with pytest.raises(ConfigError, match="nothing to compare"):
        build_entries([], [], 1 / 8)


def test_cells_cross_each_preset_with_each_cell_type():
    entries = build_entries(["debug"], [], 1 / 8, ["lstm", "flstm", "glstm"], {"rank": 16, "groups": 4})
    assert [e.name for e in entries] == ["debug-lstm", "debug-flstm", "debug-glstm"]
    assert [(e.model.cell, dict(e.model.cell_args)) for e in entries] == [
        ("lstm", {}), ("flstm", {"rank": 16}), ("glstm", {"groups": 4})]
    base, _ = resolve("debug")
    assert all(e.model.replace(cell=base.cell, cell_args=base.cell_args) == base for e in entries)
    with pytest.raises(ConfigError, match=r"--cells flstm needs --rank"):
        build_entries(["debug"], [], 1 / 8, ["flstm"], {"groups": 4})
    with pytest.raises(ConfigError, match=r"unknown cell 'flstmm' in --cells; known cells: lstm, flstm"):
        build_entries(["debug"], [], 1 / 8, ["flstmm"], {})


def test_a_family_at_one_recurrent_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "debug", "--cells", "lstm,flstm,glstm", "--rank", "8", "--groups", "2",
                 "--match", "rnn-params", "--max-steps", "2", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["debug-lstm", "debug-flstm", "debug-glstm"]
    budget = int(rows[0]["rnn_params"])
    assert all(0.85 * budget < int(r["rnn_params"]) <= budget for r in rows)  # n moves in steps of 8
    assert "debug-glstm: hidden_size=" in capsys.readouterr().err


def test_budget_is_one_of_time_or_steps():
    with pytest.raises(ValueError, match="exactly one budget"):
        Budget()
    with pytest.raises(ValueError, match="exactly one budget"):
        Budget(max_time=10, max_steps=3)
    with pytest.raises(ValueError, match="max_steps must be a positive integer, got 0"):
        Budget(max_steps=0)
    with pytest.raises(ValueError, match="max_time must be positive seconds, got -1"):
        Budget(max_time=-1)


# ------------------------------------------------------------- end to end
def test_compare_the_paper_family_on_the_builtin_corpus(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--max-steps", "4", *TINY, "--batch-size", "8", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["biglstm", "biglstm-f512", "biglstm-g2", "biglstm-g4", "biglstm-g8"]
    for row in rows:
        assert int(row["steps"]) == 4 and float(row["words_per_sec"]) > 0 and row["split"] == "test"
        assert 1 < float(row["perplexity"]) < 1502  # better than uniform over the built-in vocabulary
    rnn = {r["model"]: int(r["rnn_params"]) for r in rows}
    assert rnn["biglstm"] > rnn["biglstm-g2"] > rnn["biglstm-g4"] > rnn["biglstm-g8"] and rnn["biglstm-f512"] < rnn["biglstm"]
    for png in PNGS:
        _assert_png(out / png)
    table = (out / "results.md").read_text()
    assert table.count("\n| biglstm") == 5 and "budget per model: 4 steps" in table and "torch " in table
    assert "AVX" in table or "gpu" in table.lower() or "NEON" in table or "DEFAULT" in table
    plan = json.loads((out / "compare.json").read_text())
    assert plan["models"][1]["model"]["cell_args"] == {"rank": 8}
    err = capsys.readouterr().err
    assert "[5/5] biglstm-g8" in err

    # a re-run skips every finished model and trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.pt")}
    assert main(["compare", "--max-steps", "4", *TINY, "--batch-size", "8", "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("done before, skipped") == 5
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoint.pt")} == before


def _one_model_args(out: Path, steps: int) -> list[str]:
    return ["compare", "--presets", "debug", "--max-steps", str(steps), "--out", str(out), "--quiet"]


def test_an_interrupted_model_continues_from_its_checkpoint(tmp_path):
    out = tmp_path / "cmp"
    corpus = open_corpus(None)
    # what an interrupted comparison leaves: the model's run stopped after 3 of its steps
    model, train = resolve("debug", overrides={"train": {"max_steps": 3}})
    Trainer(model, train.replace(epochs=None), corpus, out / "runs" / "debug", show_progress=False).fit()
    (out / "runs" / "debug" / "results.json").unlink()
    assert main(_one_model_args(out, 7)) == 0
    [row] = _rows(out)
    assert int(row["steps"]) == 7
    steps = [json.loads(line)["step"] for line in (out / "runs" / "debug" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 7

    # a longer budget later continues every model from where it is
    assert main(_one_model_args(out, 9)) == 0
    assert int(_rows(out)[0]["steps"]) == 9


def test_a_run_folder_with_another_recipe_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    model, train = resolve("debug", overrides={"train": {"max_steps": 2, "lr": 0.01}})
    Trainer(model, train, open_corpus(None), out / "runs" / "debug", show_progress=False).fit()
    assert main(_one_model_args(out, 4)) == 2
    err = capsys.readouterr().err
    assert "another training config (lr=0.01, now 0.003)" in err and "use another --out" in err


def test_presets_and_config_files_mix(tmp_path):
    config = tmp_path / "tiny-flstm.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"cell": "flstm", "rank": 16}}))
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "debug", "--config", str(config), "--max-steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["debug", "tiny-flstm"]
    assert rows[1]["description"].startswith("flstm r=16")


def test_coupled_gates_apply_to_every_compared_model(tmp_path):
    config = tmp_path / "tiny-flstm.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"cell": "flstm", "rank": 16}}))
    out = tmp_path / "cmp"
    assert main(["compare", "--presets", "debug", "--config", str(config), "--coupled-gates", "--max-steps", "1",
                 "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["debug-cifg", "tiny-flstm-cifg"]
    assert rows[1]["description"].startswith("flstm r=16 cifg")
    plan = json.loads((out / "compare.json").read_text())
    assert [m["model"]["coupled_gates"] for m in plan["models"]] == [True, True]


def test_compare_needs_a_budget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--out", "x"])
    assert exit_info.value.code == 2
    assert "one of the arguments --max-time --max-steps is required" in capsys.readouterr().err


# ------------------------------------------------------------ real corpora
@pytest.mark.skipif(not (SHARED_DATA / "ptb" / "ptb.train.txt").exists(),
                    reason=f"the real PTB files are not in {SHARED_DATA / 'ptb'}")
def test_compare_on_ptb(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(SHARED_DATA / "ptb"), "--presets", "biglstm-g4", "--scale", "1/64",
                 "--max-steps", "2", "--batch-size", "16", "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert [r["model"] for r in rows] == ["biglstm-g4"]
    assert float(rows[0]["perplexity"]) < 10_000  # better than uniform over PTB's 10,000 words
    assert "vocabulary 10,000" in (out / "results.md").read_text()


@pytest.mark.skipif(not (SHARED_DATA / "lm1b" / "1b_benchmark.dev.tokens").exists(),
                    reason=f"the 1B Word sample is not in {SHARED_DATA / 'lm1b'}")
def test_compare_on_the_1b_word_layout(tmp_path):
    """The held-out sample laid out as the benchmark's directories: one training shard, two held-out."""
    data = tmp_path / "lm1b"
    (data / LM1B_TRAIN_DIR).mkdir(parents=True)
    (data / LM1B_HELDOUT_DIR).mkdir()
    os.symlink(SHARED_DATA / "lm1b" / "1b_benchmark.dev.tokens", data / LM1B_TRAIN_DIR / "news.en-00001-of-00100")
    test_file = SHARED_DATA / "lm1b" / "1b_benchmark.test.tokens"
    lines = test_file.read_text(encoding="utf-8").splitlines(keepends=True)
    (data / LM1B_HELDOUT_DIR / LM1B_VALID).write_text("".join(lines[:300]), encoding="utf-8")
    (data / LM1B_HELDOUT_DIR / LM1B_TEST).write_text("".join(lines[300:600]), encoding="utf-8")
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(data), "--presets", "biglstm-f512", "--scale", "1/64", "--max-steps", "2",
                 "--batch-size", "16", "--max-vocab", "5000", "--out", str(out), "--quiet"]) == 0
    [row] = _rows(out)
    assert row["model"] == "biglstm-f512" and row["split"] == "test" and float(row["perplexity"]) < 5002
    assert int(row["steps"]) == 2


# -------------------------------------------------------------------- EMA
def test_ema_warms_up_so_short_runs_do_not_average_in_the_initial_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(100):
        ema.update(model, step=step)
    # weight left on the initial value: prod over t of d_t with d_t = (1 + t) / (10 + t)
    left = 1.0
    for t in range(100):
        left *= (1 + t) / (10 + t)
    assert ema.shadow["weight"].item() == pytest.approx(1.0 - left, abs=1e-6)
    assert left < 1e-8 and 0.999**100 > 0.9  # without the warm-up 90% would still be the initial weights
    assert ema.decay_at(10_000) == 0.999 and ema.decay_at(None) == 0.999
