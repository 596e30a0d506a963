"""The command line's answer to bad input and a hostile machine: one line on stderr, exit status 2,
never a traceback; checked before any work where it can be. (Training's own failures, resume and
the run directory: tests/test_train.py; checkpoints: tests/test_train_checkpoint.py; signals and
kills: tests/test_train_kill.py.)"""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch

import factorlm.nn as fnn
from factorlm.cli import main
from factorlm.errors import ConfigWarning
from helpers import cli_error

MISSING = "/nonexistent/checkpoint.pt"  # options are checked before the checkpoint is even read


def test_bad_numbers_are_refused_before_the_model_is_loaded(tmp_path, capsys):
    text = tmp_path / "s.txt"
    text.write_text("a b\n")
    cases = [
        (["score", "--checkpoint", MISSING, str(text), "--batch-size", "-1"], "--batch-size must be an integer >= 1, got -1"),
        (["score", "--checkpoint", MISSING, str(text), "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["evaluate", "--checkpoint", MISSING, "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["evaluate", "--checkpoint", MISSING, "--num-steps", "-3"], "--num-steps must be an integer >= 1, got -3"),
        (["generate", "--checkpoint", MISSING, "--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
        (["generate", "--checkpoint", MISSING, "--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["generate", "--checkpoint", MISSING, "--num-samples", "-2"], "--num-samples must be an integer >= 1, got -2"),
        (["generate", "--checkpoint", MISSING, "--max-tokens", "-5"], "--max-tokens must be an integer >= 0, got -5"),
        (["generate", "--checkpoint", MISSING, "--top-k", "0"], "--top-k must be an integer >= 1 or None, got 0"),
    ]
    for argv, message in cases:
        assert cli_error(capsys, argv).endswith(message), argv


def test_bad_training_options_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli_error(capsys, ["train", "--out", "", "--max-steps", "1"]).endswith(
        "--out must name the run directory, got ''")
    assert "checkpoint_minutes must be a number >= 0 (0: after every step; inf: only at the end), got -1.0" in cli_error(
        capsys, ["train", "--out", out, "--max-steps", "1", "--checkpoint-minutes", "-1"])
    assert "lr must be a finite number > 0, got nan" in cli_error(capsys, ["train", "--out", out, "--lr", "nan"])
    assert "cell 'lstm' takes no argument 'rank'" in cli_error(capsys, ["train", "--out", out, "--rank", "8"])
    assert not os.path.exists(out)  # nothing was created for a run that could not start


def test_config_files_of_the_wrong_shape(tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert "list.json must hold a JSON object" in cli_error(capsys, ["train", "--out", str(tmp_path / "r"),
                                                                    "--config", str(listed)])
    misspelled = tmp_path / "typo.json"  # a whole section that would otherwise vanish
    misspelled.write_text(json.dumps({"preset": "debug", "training": {"lr": 0.5}}))
    assert "typo.json: unknown top-level key 'training' (did you mean 'train'?)" in cli_error(
        capsys, ["train", "--out", str(tmp_path / "r"), "--config", str(misspelled)])


def test_outputs_that_cannot_be_written_are_found_up_front(tmp_path, capsys):
    plain = tmp_path / "plainfile"
    plain.write_text("not a directory")
    assert cli_error(capsys, ["train", "--out", str(plain / "run"), "--max-steps", "1"]).endswith(
        f"cannot create the run directory {plain / 'run'}: {plain} is a file, not a directory")
    assert cli_error(capsys, ["train", "--out", str(plain), "--max-steps", "1"]).endswith(
        f"the run directory {plain} is a file; expected a directory")
    # evaluate --json: refused before the (long) evaluation, here before the checkpoint is read
    assert cli_error(capsys, ["evaluate", "--checkpoint", MISSING, "--json", str(tmp_path / "no" / "r.json")]).endswith(
        f"cannot write --json file {tmp_path / 'no' / 'r.json'}: the directory {tmp_path / 'no'} does not exist")
    assert cli_error(capsys, ["evaluate", "--checkpoint", MISSING, "--json", str(tmp_path)]).endswith(
        f"--json file {tmp_path} is a directory; expected a file name")
    assert cli_error(capsys, ["count", "--json", str(plain / "counts.json")]).endswith(
        f"the directory {plain} is a file")


def test_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch, capsys):
    """Every file created under ``readonly`` fails as on a read-only mount (EROFS), whoever runs
    the test (root ignores permission bits, not a read-only filesystem)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_open = os.open

    def erofs(path, flags, *args, **kwargs):
        if str(path).startswith(str(readonly)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", erofs)
    assert cli_error(capsys, ["train", "--out", str(readonly), "--max-steps", "1"]).endswith(
        f"cannot write to the run directory {readonly}: Read-only file system")
    assert not any(readonly.iterdir())


def test_score_given_a_directory(tmp_path, capsys):
    assert cli_error(capsys, ["score", "--checkpoint", MISSING, str(tmp_path)]).endswith(
        f"{tmp_path} is a directory; expected a text file with one sentence per line")


def test_an_flstm_rank_that_saves_nothing_is_a_warning(capsys):
    with pytest.warns(ConfigWarning, match=r"F-LSTM rank 1000 in layers 0, 1 has 384,000 gate parameters, the dense "
                                           r"LSTM's 256 x 128 matrix 32,768: ranks from 86 on save nothing"):
        fnn.FLSTM(64, 64, num_layers=2, rank=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnn.FLSTM(64, 64, num_layers=2, rank=85)  # still a saving: no warning
    # on the command line: one line, and the command goes on
    assert main(["count", "--cell", "flstm", "--rank", "100000", "--emb", "64", "--hidden", "64", "--proj", "0",
                 "--vocab", "100", "--num-sampled", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("factorlm count: warning: F-LSTM rank 100000 in layers 0, 1 has "
                                               "38,400,000 gate parameters")


def test_devices_that_cannot_be_used(capsys):
    assert cli_error(capsys, ["generate", "--checkpoint", MISSING, "--device", "foo"]).endswith(
        "unknown device 'foo'; expected cpu, cuda or cuda:N")
    assert "the meta device holds no values" in cli_error(capsys, ["evaluate", "--checkpoint", MISSING,
                                                                  "--device", "meta"])
    if not torch.cuda.is_available():
        assert cli_error(capsys, ["generate", "--checkpoint", MISSING, "--device", "cuda:3"]).endswith(
            "device 'cuda:3' asked for, but this machine has no CUDA GPU; use --device cpu")
