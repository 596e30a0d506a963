"""The parameter counter reproduces the paper's Table 1 from real (meta-device) modules."""

from __future__ import annotations

import json

import pytest
import torch

import factorlm.nn as fnn
from factorlm.cli import main
from factorlm.count import PAPER_RNN_PARAMS_M, count_model
from factorlm.configs import PAPER_PRESETS, model_preset
from factorlm.models import build_rnn


@pytest.mark.parametrize("name", list(PAPER_PRESETS))
def test_paper_rnn_parameter_counts_within_0_1M(name):
    counts = count_model(model_preset(name))
    assert abs(counts["rnn_params"] / 1e6 - PAPER_RNN_PARAMS_M[name]) < 0.1


def test_counts_come_from_modules_and_agree_with_the_closed_forms():
    n, p, L = 8192, 1024, 2
    bias = 4 * n * L
    proj = p * n * L
    expect = {
        "biglstm": 4 * n * 2 * p * L + proj + bias,
        "biglstm-f512": 512 * (2 * p + 4 * n) * L + proj + bias,
        "biglstm-g2": 4 * n * 2 * p * L // 2 + proj + bias,
        "biglstm-g4": 4 * n * 2 * p * L // 4 + proj + bias,
        "biglstm-g8": 4 * n * 2 * p * L // 8 + proj + bias,
    }
    for name, exact in expect.items():
        config = model_preset(name)
        with torch.device("meta"):
            rnn = build_rnn(config)
        assert next(rnn.parameters()).is_meta
        assert fnn.count_parameters(rnn) == exact == count_model(config)["rnn_params"]
    # embedding (V x E) + softmax (V x p + V bias) of the original vocabulary
    assert count_model(model_preset("biglstm"))["embedding_params"] == 793_470 * 1024
    assert count_model(model_preset("biglstm"))["softmax_params"] == 793_470 * 1025


def test_g2_with_and_without_bias_bracket_the_paper():
    g2 = model_preset("biglstm-g2")
    assert count_model(g2)["rnn_params"] == 83_951_616  # one bias per gate unit: 83.95M
    with torch.device("meta"):
        no_bias = fnn.GLSTM(1024, 8192, num_layers=2, proj_size=1024, groups=2, bias=False)
    assert fnn.count_parameters(no_bias) == 83_886_080  # 83.89M


def test_count_cli_prints_table_and_json(tmp_path, capsys):
    path = tmp_path / "counts.json"
    assert main(["count", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "151,060,480" in out and "33,619,968" in out and "one gate bias of 4n" in out
    data = json.loads(path.read_text())
    assert [row["model"] for row in data] == list(PAPER_PRESETS)
    assert data[1]["rnn_macs_per_token"] == 512 * (2048 + 32768) * 2 + 1024 * 8192 * 2


def test_count_cli_custom_sizes(capsys):
    assert main(["count", "--cell", "glstm", "--groups", "4,8", "--vocab", "1000"]) == 0
    out = capsys.readouterr().out
    expected = (4 * 8192 * 2048 // 4 + 4 * 8192 * 2048 // 8) + 2 * (4 * 8192 + 1024 * 8192)
    assert f"{expected:,}" in out


def test_coupled_gates_count_three_quarters_of_every_gate_parameter(tmp_path, capsys):
    n, p, L = 8192, 1024, 2
    gate_params = {"biglstm": 3 * n * 2 * p, "biglstm-f512": 512 * (2 * p + 3 * n), "biglstm-g4": 3 * n * 2 * p // 4}
    for name, gates in gate_params.items():
        config = model_preset(name).replace(coupled_gates=True)
        counts = count_model(config)
        assert counts["rnn_params"] == (gates + p * n + 3 * n) * L
        assert counts["rnn_macs_per_token"] == (gates + p * n) * L
    path = tmp_path / "counts.json"
    assert main(["count", "biglstm", "--coupled-gates", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"| biglstm (coupled_gates=True) | lstm cifg | {(3 * n * 2 * p + p * n + 3 * n) * L:,} " in out
    assert "3n with coupled input and forget gates" in out
    assert json.loads(path.read_text())[0]["config"]["coupled_gates"] is True


def test_count_cli_errors(capsys):
    assert main(["count", "--cell", "glstm", "--groups", "3"]) == 2
    assert "groups=3 does not divide the input size 1024" in capsys.readouterr().err
    assert main(["count", "nosuchmodel"]) == 2
    assert "unknown preset 'nosuchmodel'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["count", "--groups", "a,b"])
