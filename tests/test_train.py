"""The training system end to end on the built-in corpus: budgets, exact resume, checkpoints, errors."""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path

import pytest
import torch

from factorlm.cli import main
from factorlm.configs import preset
from factorlm.data import open_corpus
from factorlm.data.synthetic import SyntheticConfig, builtin_corpus
from factorlm.models import ModelConfig
from factorlm.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.errors import RunStoppedError
from factorlm.train.loop import Trainer, TrainingError

TINY = ModelConfig(embedding_size=16, hidden_size=32, proj_size=16, num_layers=2, cell="glstm", groups=2,
                   forget_bias=1.0, dropout=0.1, num_sampled=64)
FAST = TrainConfig(optimizer="adagrad", lr=0.2, batch_size=4, num_steps=10, max_steps=6, log_every=1,
                   eval_batch_size=16, ema_decay=0.9)


@pytest.fixture(scope="module")
def corpus():
    return open_corpus(None)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize("batching", ["streams", "contiguous"])
def test_resume_continues_with_the_same_losses(tmp_path, corpus, batching):
    config = FAST.replace(batching=batching)
    straight = Trainer(TINY, config, corpus, tmp_path / "straight")
    straight.fit()
    interrupted = Trainer(TINY, config.replace(max_steps=3), corpus, tmp_path / "resumed")
    interrupted.fit()
    resumed = Trainer.resume(tmp_path / "resumed", corpus, budgets={"max_steps": 6})
    results = resumed.fit()
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert results["steps"] == 6 and "valid" in results and "test" in results
    assert math.isfinite(results["valid"]["perplexity"])


def test_run_directory_contents_and_results(tmp_path, corpus):
    out = tmp_path / "run"
    results = Trainer(TINY, FAST, corpus, out).fit()
    for name in ("checkpoint.pt", "metrics.jsonl", "results.json", "loss_curve.png"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    saved = json.loads((out / "results.json").read_text())
    assert saved["valid"]["tokens"] == corpus.num_tokens("valid")
    assert saved["valid"]["optimal_perplexity"] < saved["valid"]["perplexity"]
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["step"] == 6 and payload["vocab"]["fingerprint"] == corpus.vocab.fingerprint()
    assert ModelConfig.from_dict(payload["model_config"]).vocab_size == len(corpus.vocab)
    assert results["steps"] == 6


def test_existing_run_is_not_overwritten(tmp_path, corpus):
    out = tmp_path / "run"
    Trainer(TINY, FAST.replace(max_steps=1), corpus, out, show_progress=False).fit()
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(TINY, FAST, corpus, out)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    Trainer(TINY, FAST.replace(max_steps=2), corpus, out, show_progress=False).fit()
    good = (out / "checkpoint.pt").read_bytes()
    trainer = Trainer.resume(out, corpus, budgets={"max_steps": 5}, show_progress=False)
    with torch.no_grad():
        trainer.model.embedding.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 3; the last good checkpoint"):
        trainer.fit()
    assert (out / "checkpoint.pt").read_bytes() == good


def test_stop_request_saves_a_resumable_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    trainer = Trainer(TINY, FAST, corpus, out, show_progress=False)
    original = trainer.train_step

    def step_then_stop(batch):
        loss = original(batch)
        if trainer.progress.step == 1:  # the step about to be counted is the 2nd
            trainer.stop_requested = "SIGTERM"
        return loss

    trainer.train_step = step_then_stop
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM at step 2") as info:
        trainer.fit()
    assert info.value.exit_status == 143  # 128 + SIGTERM, the shell's convention (was 130)
    assert load_checkpoint(out)["step"] == 2


def test_checkpoint_errors(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    save_checkpoint({"model_config": {}, "vocab": {}, "model": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is truncated or corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a factorlm checkpoint"):
        load_checkpoint(foreign)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_vocabulary_mismatch_on_resume(tmp_path, corpus):
    out = tmp_path / "run"
    Trainer(TINY, FAST.replace(max_steps=1), corpus, out, show_progress=False).fit()
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("a b c\nd e f\n" * 20)
    with pytest.raises(CheckpointError, match="another vocabulary"):
        Trainer.resume(out, open_corpus(other))


def test_presets_build():
    for name in ("debug", "ptb-small", "ptb-medium", "biglstm", "biglstm-g4"):
        model, train = preset(name)
        assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)
    small = preset("ptb-small")[1]
    assert (small.optimizer, small.lr, small.batch_size, small.num_steps, small.epochs) == ("sgd", 1.0, 20, 20, 13)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")


def test_lr_schedule_follows_zaremba():
    from factorlm.train.optim import lr_for_epoch

    small = preset("ptb-small")[1]
    assert [lr_for_epoch(small, e) for e in range(7)] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125]


# ----------------------------------------------------------------------- CLI
def test_cli_train_evaluate_score_generate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "5", "--quiet", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "valid: perplexity" in printed and "best possible" in printed
    for name in ("metrics.jsonl", "loss_curve.png", "results.json"):  # --quiet only silences the terminal
        assert (out / name).exists(), name
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(out), "--split", "valid", "--batch-size", "7",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    results = json.loads((out / "results.json").read_text())
    assert data["tokens"] == results["valid"]["tokens"]
    # 7 rows of ~4,300 steps: pass 2 re-scores the start of rows 1-6 only, and says so
    assert 0 < data["rescored_tokens"] < data["tokens"] / 10
    assert f"{data['rescored_tokens']:,} token positions re-scored after the first" in capsys.readouterr().out
    assert data["perplexity"] == pytest.approx(results["valid"]["perplexity"], rel=1e-4)
    corpus = open_corpus(None)
    words = corpus.vocab.decode(list(corpus.sentences("valid"))[0])
    sentences = tmp_path / "sentences.txt"
    sentences.write_text(" ".join(words[:-1]) + "\nunknownword " + words[0] + "\n")
    capsys.readouterr()
    assert main(["score", "--checkpoint", str(out / "checkpoint.pt"), str(sentences)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("logprob") and len(rows) == 3
    assert float(rows[1].split("\t")[0]) < 0
    assert main(["generate", "--checkpoint", str(out), "--prompt", words[0], "--seed", "1",
                 "--num-samples", "2", "--top-k", "5"]) == 0
    samples = capsys.readouterr().out.strip().splitlines()
    assert len(samples) == 2 and all(s.split()[0] == words[0] for s in samples)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "missing.pt does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nodata")]) == 2
    assert "nodata" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "y"), "--cell", "glstm", "--groups", "3", "--max-steps", "1"]) == 2
    assert "groups=3" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["train", "--out", str(tmp_path / "z"), "--config", str(bad)]) == 2
    assert "bad.json is not valid JSON" in capsys.readouterr().err


def test_cli_resume_reuses_the_runs_corpus(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("the cat sat on the mat\na dog ran\n" * 40)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--quiet"]) == 0
    assert load_checkpoint(out)["data_path"] == str(data.resolve())
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet"]) == 0
    assert load_checkpoint(out)["step"] == 4
    assert "trained 4 steps" in capsys.readouterr().out


def test_cli_config_file(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"preset": "debug", "model": {"hidden_size": 24, "cell": "flstm", "rank": 8},
                                  "train": {"max_steps": 2, "batch_size": 4, "epochs": None}}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"]) == 0
    saved = load_checkpoint(tmp_path / "run")
    assert saved["model_config"]["cell"] == "flstm" and saved["model_config"]["cell_args"] == {"rank": 8}
    assert saved["step"] == 2


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
@pytest.mark.parametrize("num_sampled,tie", [(40, False), (0, False), (40, True)])
def test_sparse_gradients_give_exactly_the_dense_updates(optimizer, num_sampled, tie):
    import copy

    from factorlm.models import LanguageModel
    from factorlm.train.optim import build_optimizer

    config = ModelConfig(vocab_size=300, embedding_size=8, hidden_size=16, proj_size=8, num_layers=1,
                         num_sampled=num_sampled, tie_embeddings=tie)
    train = TrainConfig(optimizer=optimizer, lr=0.3)
    dense = LanguageModel(config).double().train()
    sparse = copy.deepcopy(dense).use_sparse_gradients()
    optimizers = [build_optimizer(m, train) for m in (dense, sparse)]
    for step in range(4):
        inputs, targets = torch.randint(0, 300, (5, 3)), torch.randint(0, 300, (5, 3))
        for model, opt in zip((dense, sparse), optimizers):
            hidden, _ = model(inputs)
            loss = model.loss(hidden, targets, generator=torch.Generator().manual_seed(step)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert sparse.embedding.weight.grad.is_sparse or tie and num_sampled == 0
    assert not dense.embedding.weight.grad.is_sparse
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def test_sparse_gradients_only_where_exact():
    from factorlm.train.optim import sparse_ok

    assert sparse_ok(preset("biglstm")[1])  # Adagrad, clip on the LSTM only: the paper's setup
    assert not sparse_ok(preset("ptb-small")[1])  # clips every gradient
    assert not sparse_ok(TrainConfig(optimizer="adam"))
    assert not sparse_ok(TrainConfig(weight_decay=1e-5))
    assert not sparse_ok(TrainConfig(sparse_gradients=False))


def test_compute_loss_is_the_step_a_subclass_replaces(tmp_path, corpus):
    class Doubled(Trainer):
        def compute_loss(self, inputs, targets, mask):
            return 2 * super().compute_loss(inputs, targets, mask)

    config = FAST.replace(max_steps=2, ema_decay=0.0)
    Trainer(TINY, config, corpus, tmp_path / "plain", show_progress=False).fit()  # seeds the RNG as it starts
    Doubled(TINY, config, corpus, tmp_path / "doubled", show_progress=False).fit()
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "doubled")
    assert b[1] == pytest.approx(2 * a[1], rel=1e-6)  # the same first batch, the overridden loss


def test_an_epoch_ends_on_every_rank_when_one_rank_runs_out_of_data(tmp_path, corpus):
    """The agreed answer, not this rank's own data, ends the epoch (here: another rank's share
    is shorter and ends after 3 steps)."""

    class OtherRankRanOut(Trainer):
        def _data_ran_out(self, batch):
            return super()._data_ran_out(batch) or (self.progress.epoch == 0 and self.progress.step == 3)

    small = builtin_corpus(SyntheticConfig(train_tokens=2_000, valid_tokens=200, test_tokens=200))
    trainer = OtherRankRanOut(TINY, FAST.replace(max_steps=None, epochs=2, ema_decay=0.0), small,
                              tmp_path / "run", show_progress=False)
    results = trainer.fit()
    assert results["epochs"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    valid_steps = [r["step"] for r in records if r["kind"] == "valid"]
    assert valid_steps[0] == 3  # epoch 0 ended here too, after 3 steps
    assert valid_steps[1] > 6  # epoch 1 ran on its own data to the end


# ------------------------------------------------------- failures and the run directory
SMALL = SyntheticConfig(train_tokens=2_000, valid_tokens=200, test_tokens=200)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _bad_valid_corpus(root: Path) -> Path:
    """train/valid/test text splits whose valid.txt has a Latin-1 byte on line 51."""
    root.mkdir()
    (root / "train.txt").write_text("the cat sat on the mat\na dog ran\n" * 40)
    valid = [b"the cat ran"] * 60
    valid[50] = b"the caf\xe9 ran"
    (root / "valid.txt").write_bytes(b"\n".join(valid) + b"\n")
    (root / "test.txt").write_text("a dog sat\n" * 20)
    return root


def test_every_split_is_read_before_the_first_step(tmp_path, capsys):
    """A bad valid file stops the run before it trains, not at the first evaluation after hours."""
    data = _bad_valid_corpus(tmp_path / "data")
    corpus = open_corpus(data)
    with pytest.raises(ValueError, match=r"valid.txt, line 51: undecodable bytes b'\\xe9'"):
        Trainer(TINY, FAST, corpus, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--max-time", "20", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "valid.txt, line 51" in err
    assert not (tmp_path / "cli" / "metrics.jsonl").exists()


def _failing_after(make_sentences, limit: int, exc: Exception):
    """make_sentences whose iterators raise ``exc`` once ``limit`` sentences were taken in all:
    a data error in the middle of filling a batch (some rows already advanced)."""
    taken = [0]

    def make(epoch):
        for sentence in make_sentences(epoch):
            if taken[0] == limit:
                raise exc
            taken[0] += 1
            yield sentence

    return make


def test_an_error_after_training_started_saves_the_last_step_first(tmp_path):
    """A read error in the middle of a batch: a checkpoint of the last completed step is saved
    before the one-line error, and resuming from it gives the losses of an uninterrupted run."""
    small = builtin_corpus(SMALL)
    config = FAST.replace(ema_decay=0.0)
    Trainer(TINY, config, small, tmp_path / "straight", show_progress=False).fit()
    trainer = Trainer(TINY, config, small, tmp_path / "run", show_progress=False)
    trainer.batcher.make_sentences = _failing_after(trainer.batcher.make_sentences, 9,
                                                    OSError(5, "Input/output error"))
    with pytest.raises(RunStoppedError, match=r"Input/output error; training stopped at step (\d): checkpoint saved to "
                                              r".*checkpoint.pt, continue with --resume") as info:
        trainer.fit()
    stopped = int(re.search(r"stopped at step (\d)", str(info.value)).group(1))
    assert 1 <= load_checkpoint(tmp_path / "run")["step"] == stopped < 6
    Trainer.resume(tmp_path / "run", small, show_progress=False).fit()
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "run")
    assert sorted(b) == sorted(a) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_a_bug_after_training_started_keeps_its_traceback_and_saves(tmp_path):
    small = builtin_corpus(SMALL)
    trainer = Trainer(TINY, FAST, small, tmp_path / "run", show_progress=False)
    original = trainer.compute_loss

    def broken(inputs, targets, mask):
        if trainer.progress.step == 2:
            raise TypeError("a bug in a subclass")
        return original(inputs, targets, mask)

    trainer.compute_loss = broken
    with pytest.raises(TypeError, match="a bug in a subclass") as info:
        trainer.fit()
    notes = getattr(info.value, "__notes__", ["training stopped at step 2: checkpoint saved"])  # 3.11+
    assert any("training stopped at step 2: checkpoint saved" in note for note in notes)
    assert load_checkpoint(tmp_path / "run")["step"] == 2


def test_resume_drops_what_the_checkpoint_does_not_cover(tmp_path):
    """After a kill, metrics.jsonl (and TensorBoard) may hold records past the checkpoint, a line
    cut short, and a save's temp file: a resume keeps none of them."""
    small = builtin_corpus(SMALL)
    out = tmp_path / "run"
    Trainer(TINY, FAST.replace(max_steps=3), small, out, show_progress=False).fit()
    assert load_checkpoint(out)["log_records"] == 3
    with open(out / "metrics.jsonl", "a") as f:  # what a killed process wrote after its last save
        for step in (4, 5):
            f.write(json.dumps({"kind": "train", "step": step, "loss": 99.0, "elapsed": 1.0}) + "\n")
        f.write('{"kind": "train", "st')
    stale = out / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    Trainer.resume(out, small, budgets={"max_steps": 6}, show_progress=False).fit()
    steps = [r["step"] for r in _records(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6] and 99.0 not in _losses(out).values()
    assert not stale.exists()


def test_a_new_run_starts_clean_logs(tmp_path):
    """A crashed run that left logs but no checkpoint: a new run there does not append to them."""
    small = builtin_corpus(SMALL)
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 450, "loss": 3.0, "elapsed": 9.0}) + "\n")
    old_events = out / "tensorboard" / "events.out.tfevents.1.old"
    old_events.write_bytes(b"old")
    Trainer(TINY, FAST.replace(max_steps=2), small, out, show_progress=False).fit()
    assert [r["step"] for r in _records(out) if r["kind"] == "train"] == [1, 2]
    assert not old_events.exists() and any((out / "tensorboard").iterdir())


def test_a_full_disk_while_training_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--quiet"]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (f"cannot write checkpoint {out / 'checkpoint.pt'}: No space left on device; the previous checkpoint is "
            f"unchanged; training stopped at step 4, and the checkpoint of step 2 is kept") in err
    assert (out / "checkpoint.pt").read_bytes() == good and not list(out.glob(".*.tmp"))


def test_resume_refuses_options_that_would_change_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--log-every", "1",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "50", "--batch-size", "7", "--cell", "glstm",
                 "--groups", "2", "--optimizer", "sgd", "--max-steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    for difference in ("cell='glstm' (saved: 'lstm')", "groups=2 (saved: None)", "lr=50.0 (saved: 0.003)",
                       "optimizer='sgd' (saved: 'adam')", "batch_size=7 (saved: 4)"):
        assert difference in err, difference
    assert load_checkpoint(out)["step"] == 1  # nothing ran
    assert main(["train", "--out", str(out), "--resume", "--rank", "8", "--quiet"]) == 2
    assert "rank=8 (saved: None)" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--preset", "ptb-small", "--quiet"]) == 2
    assert "lr=1.0 (saved: 0.003)" in capsys.readouterr().err
    # the run's own options repeated are fine; budgets and log_every change, and say so
    assert main(["train", "--out", str(out), "--resume", "--preset", "debug", "--batch-size", "4", "--lr", "0.003",
                 "--max-steps", "2", "--log-every", "2"]) == 0
    assert "resuming at step 1 with max_steps 2 (was 1), log_every 2 (was 1)" in capsys.readouterr().err
    assert load_checkpoint(out)["train_config"]["log_every"] == 2
