"""Fine-tuning from a checkpoint, masks that survive training and resume, and gradual magnitude
pruning on Zhu & Gupta's cubic schedule (factorlm.train.finetune, factorlm.compress.masks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factorlm.cli import main
from factorlm.compress.masks import MaskHook, PruneSchedule, cubic_sparsity, magnitude_mask, prunable_parameters
from factorlm.data.synthetic import SyntheticConfig, builtin_corpus
from factorlm.errors import CheckpointError, ConfigError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.train.checkpoint import load_checkpoint, save_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.finetune import finetune_trainer
from factorlm.train.loop import Trainer
from helpers import cli_error

SMALL = SyntheticConfig(train_tokens=2_000, valid_tokens=200, test_tokens=200)
TINY = ModelConfig(embedding_size=16, hidden_size=16, proj_size=8, num_layers=2, cell="flstm", rank=4)
# Adam: its moments would move a pruned weight again if they were not masked too
FAST = TrainConfig(optimizer="adam", lr=0.01, batch_size=4, num_steps=5, max_steps=2, log_every=1,
                   eval_batch_size=16, ema_decay=0.9, checkpoint_minutes=float("inf"))


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus(SMALL)


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus):
    """A trained run whose checkpoint also holds one-shot masks, as `factorlm compress prune` writes
    them (here the masked weights are left nonzero: fine-tuning must zero them itself)."""
    out = tmp_path_factory.mktemp("source") / "run"
    Trainer(TINY, FAST, corpus, out, show_progress=False).fit()
    payload = load_checkpoint(out)
    generator = torch.Generator().manual_seed(0)
    payload["prune_masks"] = {name: torch.rand(payload["model"][name].shape, generator=generator) > 0.3
                              for name in ("rnn.weight_w1_l0", "rnn.weight_hr_l1")}
    save_checkpoint(payload, out / "checkpoint.pt")
    return out


def _check_masked_zero(payload: dict, masks: dict) -> None:
    for name, mask in masks.items():
        for part in ("model", "ema"):
            assert (payload[part][name][~mask] == 0).all(), (part, name)
        assert (payload["model"][name][mask] != 0).any(), name


# -------------------------------------------------------------------- schedule
def test_cubic_schedule_values_at_given_steps():
    schedule = PruneSchedule(final=0.8, initial=0.1, start=10, steps=40, every=10)
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3
    expected = {0: 0.1, 10: 0.1, 20: 0.8 - 0.7 * 0.75 ** 3, 30: 0.8 - 0.7 * 0.5 ** 3, 40: 0.8 - 0.7 * 0.25 ** 3,
                50: 0.8, 70: 0.8}
    for step, value in expected.items():
        assert schedule.sparsity(step) == pytest.approx(value, abs=1e-12), step
    assert [t for t in range(80) if schedule.is_event(t)] == [10, 20, 30, 40, 50]
    uneven = PruneSchedule(final=0.5, start=0, steps=40, every=15)  # the last event is t0 + nΔt anyway
    assert [t for t in range(60) if uneven.is_event(t)] == [0, 15, 30, 40]
    assert cubic_sparsity(5, final=0.9, steps=10) == pytest.approx(0.9 - 0.9 * 0.125)


def test_magnitude_mask_keeps_the_largest_and_never_regrows():
    weight = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    weight[0, 0] = 10.0  # a pruned weight that grew is not brought back
    again = magnitude_mask(weight, 2 / 3, mask)
    assert again.tolist() == [[False, True, False], [True, False, False]]
    assert torch.equal(magnitude_mask(weight, 0.1, again), again)  # a lower target keeps the mask


def test_what_is_pruned():
    model = LanguageModel(TINY.replace(vocab_size=30))
    assert sorted(prunable_parameters(model)) == sorted(
        f"rnn.weight_{w}_l{k}" for w in ("w1", "w2", "hr") for k in (0, 1))
    assert {"embedding.weight", "softmax.weight"} <= set(prunable_parameters(model, "all"))
    assert not any("bias" in name for name in prunable_parameters(model, "all"))


# ------------------------------------------------------------- fine-tuning
def test_pruned_weights_stay_zero_through_finetuning_and_resume(tmp_path, corpus, source):
    loaded = load_checkpoint(source)["prune_masks"]
    changes = dict(max_steps=3, prune_to=0.6, prune_start=1, prune_steps=2, prune_every=1)
    out = tmp_path / "tuned"
    trainer = finetune_trainer(source, corpus, out, changes=changes, show_progress=False)
    trainer.fit()
    first = load_checkpoint(out)
    masks = first["prune_masks"]
    assert first["step"] == 3 and first["origin"]["checkpoint"] == str((source / "checkpoint.pt").resolve())
    assert sorted(masks) == sorted(prunable_parameters(trainer.model))
    for name, mask in masks.items():
        assert 1 - mask.float().mean().item() == pytest.approx(0.6, abs=0.5 / mask.numel()), name
        if name in loaded:
            assert not (mask & ~loaded[name]).any(), name  # what the source pruned stays pruned
    _check_masked_zero(first, masks)
    params = dict(trainer.model.named_parameters())
    for name, mask in masks.items():  # Adam's moments of pruned weights are zero, so no step moves them
        state = trainer.optimizer.state[params[name]]
        assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] == 0).all()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], round(r["sparsity"], 2)) for r in records if r["kind"] == "prune"][-1] == (3, 0.6)

    resumed = Trainer.resume(out, corpus, budgets={"max_steps": 5}, show_progress=False)
    resumed.fit()
    last = load_checkpoint(out)
    assert last["step"] == 5
    assert all(torch.equal(last["prune_masks"][name], mask) for name, mask in masks.items())
    _check_masked_zero(last, masks)
    assert not torch.equal(last["model"]["rnn.weight_w1_l0"], first["model"]["rnn.weight_w1_l0"])  # it trained
    again = finetune_trainer(out, corpus, tmp_path / "again", changes={"max_steps": 1}, show_progress=False)
    assert again.config.prune_to is None and again.config.optimizer == "adam"  # the masks, not the schedule
    assert sorted(again.hooks[0].masks) == sorted(masks)


def test_masks_alone_are_kept_without_a_schedule(tmp_path, corpus, source):
    loaded = load_checkpoint(source)["prune_masks"]
    trainer = finetune_trainer(source, corpus, tmp_path / "tuned", changes={"max_steps": 2}, use_ema=False,
                               show_progress=False)
    assert trainer.origin["weights"] == "raw"
    trainer.fit()
    payload = load_checkpoint(tmp_path / "tuned")
    assert sorted(payload["prune_masks"]) == sorted(loaded)
    _check_masked_zero(payload, loaded)


def test_finetune_cli_writes_a_run_that_evaluates_and_resumes(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("the cat sat on the mat\na dog ran\n" * 20)
    src, out = tmp_path / "src", tmp_path / "tuned"
    common = ["--batch-size", "2", "--num-steps", "5", "--quiet"]
    assert main(["train", "--data", str(data), "--out", str(src), "--max-steps", "2", "--cell", "flstm",
                 "--rank", "8", *common]) == 0
    before = (src / "checkpoint.pt").read_bytes()
    assert main(["finetune", str(src), "--out", str(out), "--max-steps", "2", "--lr", "0.001", "--prune-to", "0.5",
                 "--prune-steps", "1", *common]) == 0
    assert (src / "checkpoint.pt").read_bytes() == before  # the source is only read
    saved = load_checkpoint(out)
    assert saved["model_config"]["cell"] == "flstm" and saved["train_config"]["lr"] == 0.001
    assert saved["train_config"]["epochs"] is None and saved["step"] == 2
    report = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(data), "--split", "valid",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["perplexity"] == pytest.approx(
        json.loads((out / "results.json").read_text())["valid"]["perplexity"], rel=1e-4)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert load_checkpoint(out)["step"] == 3
    capsys.readouterr()

    assert "needs a budget of its own" in cli_error(capsys, ["finetune", str(src), "--out", str(tmp_path / "x")])
    assert "never overwritten" in cli_error(capsys, ["finetune", str(src), "--out", str(src), "--max-steps", "1"])
    assert "prune_to must be a number in [0, 1)" in cli_error(
        capsys, ["finetune", str(src), "--out", str(tmp_path / "y"), "--max-steps", "1", "--prune-to", "1.5"])
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("a b c\n" * 5)
    assert "another vocabulary" in cli_error(capsys, ["finetune", str(src), "--out", str(tmp_path / "z"), "--max-steps", "1",
                                          "--data", str(other)])
    assert "prune_to=0.25 (saved: 0.5)" in cli_error(capsys, ["train", "--out", str(out), "--resume", "--prune-to", "0.25"])


def test_bad_masks_in_a_checkpoint_are_one_clear_error(tmp_path, corpus, source):
    payload = load_checkpoint(source)
    for masks, expected in (({"rnn.nothing": torch.ones(2, dtype=torch.bool)}, "'rnn.nothing', which is not"),
                            ({"rnn.weight_w1_l0": torch.ones(2, 2, dtype=torch.bool)}, "must be a bool tensor"),
                            ({"rnn.weight_w1_l0": torch.ones_like(payload["model"]["rnn.weight_w1_l0"])},
                             "must be a bool tensor")):
        path = tmp_path / "bad" / "checkpoint.pt"
        save_checkpoint({**payload, "prune_masks": masks}, path)
        with pytest.raises(CheckpointError, match=expected):
            finetune_trainer(path, corpus, tmp_path / "out", changes={"max_steps": 1}, show_progress=False)
    with pytest.raises(ConfigError, match="needs a budget"):
        finetune_trainer(source, corpus, tmp_path / "out2", show_progress=False)
    with pytest.raises(ValueError, match="prune_from must be in"):
        TrainConfig(prune_to=0.5, prune_from=0.5)


def test_a_tied_softmax_mask_may_use_either_name():
    model = LanguageModel(ModelConfig(vocab_size=20, embedding_size=8, hidden_size=8, num_layers=1,
                                      tie_embeddings=True))
    mask = torch.zeros(20, 8, dtype=torch.bool)
    hook = MaskHook.create(model, TrainConfig(), {"prune_masks": {"softmax.weight": mask}}, "test")
    hook.apply_()
    assert list(hook.masks) == ["embedding.weight"] and (model.embedding.weight == 0).all()
