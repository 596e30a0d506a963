"""Checkpoint files that are not what they claim: unsafe content, missing pieces, sizes that do not
match the stored tensors, and a save onto a full disk. Each is one line naming the file."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from factorlm.cli import main
from factorlm.data import Vocabulary
from factorlm.errors import CheckpointError, OutputError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.runs import load_model
from factorlm.train.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from factorlm.train.config import TrainConfig
from factorlm.train.loop import Trainer
from helpers import cli_error

VOCAB = Vocabulary(["<S>", "<UNK>", "a", "b", "c"], boundary="<S>", unk="<UNK>")
CONFIG = ModelConfig(vocab_size=len(VOCAB), embedding_size=4, hidden_size=6, num_layers=1)


def _payload(**changes) -> dict:
    model = LanguageModel(CONFIG)
    payload = {"model_config": CONFIG.to_dict(), "train_config": TrainConfig().to_dict(), "vocab": VOCAB.to_dict(),
               "model": model.state_dict()}
    payload.update(changes)
    return payload


class _RunsCode:
    """Unpickling this would call os.system: what a malicious checkpoint holds."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_content_is_refused_in_our_words(tmp_path, capsys):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"format": "factorlm-checkpoint", "version": 1, "model": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a factorlm checkpoint: it holds objects a safe load refuses (")
    assert "so it was not loaded" in message
    # torch's own text suggests reloading with weights_only=False, which would run the attacker's code
    assert "weights_only" not in message and "arbitrary code" not in message and len(message.splitlines()) == 1
    err = cli_error(capsys, ["evaluate", "--checkpoint", str(path)])
    assert "not a factorlm checkpoint" in err and "weights_only" not in err
    assert not marker.exists()


def test_a_marker_without_the_rest_is_one_line(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model_config": CONFIG.to_dict(), "vocab": VOCAB.to_dict()}, path)
    err = cli_error(capsys, ["evaluate", "--checkpoint", str(path)])
    assert f"checkpoint {path} lacks ['model']" in err
    save_checkpoint(_payload(model_config=[1, 2]), path)
    assert "'model_config' must be a mapping, got list" in cli_error(capsys, ["generate", "--checkpoint", str(path)])
    save_checkpoint(_payload(model_config={"hidden_size": -3}), path)
    (tmp_path / "sentences.txt").write_text("a b\n")
    assert "its model_config is invalid (hidden_size must be an integer >= 1, got -3)" in cli_error(
        capsys, ["score", "--checkpoint", str(path), str(tmp_path / "sentences.txt")])
    save_checkpoint(_payload(vocab={}), path)
    assert "the vocabulary stored in the checkpoint lacks" in cli_error(
        capsys, ["evaluate", "--checkpoint", str(path)])
    # a model-only file loads for evaluation but is not a run to resume
    save_checkpoint(_payload(), path)
    load_model(path)
    with pytest.raises(CheckpointError, match=r"lacks \['optimizer', 'data_state', 'rng', 'step', 'epoch', 'elapsed', "
                                              r"'tokens'\] to resume a run"):
        Trainer.resume(tmp_path, None)


def test_sizes_are_checked_against_the_stored_tensors_before_allocating(tmp_path, capsys):
    """A config claiming 10^11 words (25.6 TB of weights) is refused by comparison with the small
    tensors stored, without trying to allocate."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_payload(model_config=CONFIG.replace(vocab_size=100_000_000_000).to_dict()), path)
    err = cli_error(capsys, ["evaluate", "--checkpoint", str(path)])
    assert "its vocabulary has 5 words but its model config says vocab_size=100,000,000,000" in err
    huge = CONFIG.replace(embedding_size=1_000_000_000)
    save_checkpoint(_payload(model_config=huge.to_dict()), path)
    err = cli_error(capsys, ["generate", "--checkpoint", str(path)])
    assert "its model weights do not fit its model config: embedding.weight is stored as 5 x 4 but the config needs " \
           "5 x 1,000,000,000 (and " in err and "damaged or was edited" in err
    weights = _payload()["model"]
    weights["rnn.weight_ih_l0"] = torch.zeros(3, 3)
    save_checkpoint(_payload(model=weights), path)
    with pytest.raises(CheckpointError, match=r"rnn.weight_ih_l0 is stored as 3 x 3 but the config needs 24 x 4"):
        load_model(path)
    save_checkpoint(_payload(ema={"extra.weight": torch.zeros(2)}), path)
    with pytest.raises(CheckpointError, match=r"its ema weights do not fit its model config: extra.weight is not part"):
        load_model(path)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(_payload(step=1), path)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OutputError, match=f"cannot write checkpoint {path}: No space left on device; "
                                          f"the previous checkpoint is unchanged"):
        save_checkpoint(_payload(step=2), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".checkpoint.pt.x.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.abc.tmp"
    other.write_bytes(b"not ours")
    assert remove_stale_temp_files(path) == sorted(stale)
    assert not any(tmp.exists() for tmp in stale) and other.exists()
    assert remove_stale_temp_files(tmp_path / "missing" / "checkpoint.pt") == []
