"""Distillation (factorlm.compress.distill): the loss, the teacher's carried state, resume, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from factorlm.cli import main
from factorlm.compress.distill import DistillConfig, DistillTrainer, full_kl, teacher_top_k, top_k_kl
from factorlm.data import split_stream
from factorlm.data.synthetic import SyntheticConfig, builtin_corpus
from factorlm.models import ModelConfig
from factorlm.train.checkpoint import load_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer
from helpers import cli_error

SMALL = SyntheticConfig(train_tokens=3_000, valid_tokens=300, test_tokens=200)
TEACHER = ModelConfig(embedding_size=16, hidden_size=32, num_layers=1)
STUDENT = ModelConfig(embedding_size=8, hidden_size=16, proj_size=8, num_layers=1, cell="flstm", rank=4)
FAST = TrainConfig(optimizer="adam", lr=0.01, batch_size=4, num_steps=10, max_steps=15, log_every=5,
                   eval_batch_size=16, checkpoint_minutes=float("inf"))


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus(SMALL)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(TEACHER, FAST, corpus, out, show_progress=False).fit()
    return out


@torch.no_grad()
def heldout_kl(student, teacher, corpus) -> float:
    """Mean KL(teacher ‖ student) per token of the valid split, read as one sequence."""
    tokens = split_stream(corpus, "valid")[:-1].view(-1, 1)  # (T, 1)
    student.eval()
    hidden, _ = student(tokens)
    teacher_hidden, _ = teacher(tokens)
    return full_kl(student.softmax.logits(hidden), teacher.softmax.logits(teacher_hidden), 1.0).mean().item()


def test_distillation_lowers_the_students_kl_to_the_teacher(tmp_path, corpus, teacher):
    trainer = DistillTrainer(STUDENT, FAST, corpus, tmp_path / "student", show_progress=False,
                             distill=DistillConfig(teacher=str(teacher), alpha=1.0, temperature=1.0))
    assert trainer.top_k is None  # a full-softmax student: every logit
    before = heldout_kl(trainer.model, trainer.teacher, corpus)
    trainer.fit()
    after = heldout_kl(trainer.model, trainer.teacher, corpus)
    assert after < 0.8 * before, (before, after)
    student_state, teacher_state = load_checkpoint(tmp_path / "student")["rnn_state"]  # carried side by side
    assert student_state[1].shape == (1, 4, 16) and teacher_state[1].shape == (1, 4, 32)


def test_with_alpha_zero_the_loss_is_the_data_loss(tmp_path, corpus, teacher):
    config = FAST.replace(max_steps=1)
    Trainer(STUDENT, config, corpus, tmp_path / "plain", show_progress=False).fit()
    DistillTrainer(STUDENT, config, corpus, tmp_path / "distilled", show_progress=False,
                   distill=DistillConfig(teacher=str(teacher), alpha=0.0)).fit()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "train"] for name in ("plain", "distilled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_top_k_kl_and_the_tiled_top_k():
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(6, 5, generator=generator), torch.randn(50, 5, generator=generator),
                            torch.randn(50, generator=generator))
    logits = hidden @ weight.t() + bias
    values, ids = teacher_top_k(hidden, weight, bias, 7, max_logits=6 * 8)  # tiles of 8 words
    expected_values, expected_ids = logits.topk(7, dim=1)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(ids, expected_ids)
    student_hidden = torch.randn(6, 5, generator=generator)
    student_logits = student_hidden @ weight.t() + bias
    # over every word the renormalised top-k KL is the full KL, and over k words it is the KL of the renormalised k
    all_values, all_ids = teacher_top_k(hidden, weight, bias, 50)
    torch.testing.assert_close(top_k_kl(student_hidden, weight, bias, all_values, all_ids, 2.0),
                               full_kl(student_logits, logits, 2.0))
    torch.testing.assert_close(top_k_kl(student_hidden, weight, bias, values, ids, 2.0),
                               full_kl(student_logits.gather(1, ids), values, 2.0))


def test_sampled_softmax_student_uses_the_teachers_top_k(tmp_path, corpus, teacher):
    student = STUDENT.replace(num_sampled=16)
    trainer = DistillTrainer(student, FAST.replace(max_steps=2), corpus, tmp_path / "s", show_progress=False,
                             distill=DistillConfig(teacher=str(teacher)))
    assert trainer.top_k == 64
    results = trainer.fit()
    assert results["steps"] == 2 and results["valid"]["perplexity"] > 1


def test_distill_cli_resume_and_errors(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("the cat sat on the mat\na dog ran\n" * 20)
    teacher, out = tmp_path / "teacher", tmp_path / "student"
    common = ["--batch-size", "2", "--num-steps", "5", "--quiet"]
    assert main(["train", "--data", str(data), "--out", str(teacher), "--max-steps", "2", *common]) == 0
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--cell", "glstm", "--groups", "2",
                 "--hidden", "16", "--max-steps", "2", "--temperature", "3", *common]) == 0
    saved = load_checkpoint(out)
    assert saved["model_config"]["cell"] == "glstm" and saved["model_config"]["hidden_size"] == 16
    assert saved["distill"]["teacher"] == str((teacher / "checkpoint.pt").resolve())
    assert saved["distill"]["temperature"] == 3.0 and saved["trainer"] == "distill"
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(data), "--split", "valid"]) == 0
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert load_checkpoint(out)["step"] == 3
    capsys.readouterr()

    assert "continue it with factorlm distill --resume" in cli_error(capsys, ["train", "--out", str(out), "--resume"])
    assert "distill needs the teacher" in cli_error(capsys, ["distill", "--out", str(tmp_path / "x"), "--max-steps", "1"])
    # the teacher's own budget (its --max-steps 2) is not the student's: a student needs one of its own
    assert "distillation needs a budget of its own" in cli_error(
        capsys, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "z"), "--data", str(data)])
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "w"), "--data", str(data),
                 "--max-time", "600", "--epochs", "1", *common]) == 0
    assert load_checkpoint(tmp_path / "w")["train_config"]["max_steps"] is None
    assert "temperature=1.0 (saved: 3.0)" in cli_error(capsys, ["distill", "--out", str(out), "--resume", "--temperature", "1"])
    assert "hidden_size=32 (saved: 16)" in cli_error(capsys, ["distill", "--out", str(out), "--resume", "--hidden", "32"])
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("a b c\n" * 5)
    assert "a teacher can only be distilled on the vocabulary it was trained with" in cli_error(
        capsys, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "y"), "--data", str(other), "--max-steps", "1"])
    moved = tmp_path / "moved"
    shutil.move(teacher, moved)
    assert "does not exist" in cli_error(capsys, ["distill", "--out", str(out), "--resume", "--max-steps", "4"])
    assert main(["distill", "--out", str(out), "--resume", "--teacher", str(moved), "--max-steps", "4",
                 "--quiet"]) == 0
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "another"), "--max-steps", "1", *common]) == 0
    assert "is not the teacher" in cli_error(capsys, ["distill", "--out", str(out), "--resume", "--teacher",
                                          str(tmp_path / "another"), "--max-steps", "5"])


def test_distill_init_from_starts_the_student_from_a_run(tmp_path, capsys, monkeypatch):
    """--init-from: the student is that run's model, its weights before step 1 are the run's, its pruning
    masks hold; student-architecture options beside it are refused in one line."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"embedding_size": 8, "hidden_size": 16, "proj_size": 8},
                                  "train": {"batch_size": 4, "num_steps": 5}}))
    teacher, svd, init = tmp_path / "teacher", tmp_path / "svd", tmp_path / "init"
    assert main(["train", "--config", str(config), "--out", str(teacher), "--max-steps", "2", "--quiet"]) == 0
    assert main(["compress", "svd", str(teacher), "--rank", "4", "--out", str(svd)]) == 0
    assert main(["compress", "prune", str(svd), "--sparsity", "0.5", "--out", str(init)]) == 0
    source = load_checkpoint(init)
    started = {}
    fit = DistillTrainer.fit

    def recording_fit(self):
        started.update({name: t.detach().clone() for name, t in self.model.state_dict().items()})
        return fit(self)

    monkeypatch.setattr(DistillTrainer, "fit", recording_fit)
    student = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--init-from", str(init), "--out", str(student),
                 "--max-steps", "2", "--quiet"]) == 0
    assert started.keys() == source["model"].keys()
    assert all(torch.equal(started[name], weight) for name, weight in source["model"].items())
    saved = load_checkpoint(student)
    assert saved["model_config"] == {**source["model_config"], "vocab_size": saved["model_config"]["vocab_size"]}
    assert saved["model_config"]["cell"] == "flstm" and saved["step"] == 2 and saved["trainer"] == "distill"
    assert saved["origin"]["checkpoint"] == str((init / "checkpoint.pt").resolve())
    masks = saved["prune_masks"]
    assert masks.keys() == source["prune_masks"].keys()
    assert all(torch.all(saved["model"][name][~mask] == 0) for name, mask in masks.items())
    assert any(not torch.equal(saved["model"][name], source["model"][name]) for name in masks)  # it trained
    capsys.readouterr()

    common = ["distill", "--teacher", str(teacher), "--init-from", str(init), "--max-steps", "1"]
    assert cli_error(capsys, [*common, "--out", str(tmp_path / "x"), "--cell", "glstm", "--groups", "2", "--hidden", "8"]).endswith(
        f"--init-from {init} gives the student's architecture (its model and weights), so --cell, --groups, --hidden "
        "cannot be given with it; drop them, or drop --init-from for a fresh student")
    assert "--preset cannot be given with it; drop it" in cli_error(capsys, [*common, "--out", str(tmp_path / "x"),
                                                                 "--preset", "debug"])
    assert "starts a new distillation, --resume continues" in cli_error(capsys, [*common, "--out", str(student), "--resume"])
    assert "is the directory of the checkpoint" in cli_error(capsys, [*common, "--out", str(init)])
