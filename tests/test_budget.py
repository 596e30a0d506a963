"""Sizing a model to a recurrent-parameter budget (factorlm.budget, count/compare --rnn-params)."""

from __future__ import annotations

import pytest

from factorlm import cli
from factorlm.budget import HIDDEN_MULTIPLE, fit_rnn_params, parse_count, rnn_params
from factorlm.compare.family import Entry
from factorlm.configs import resolve
from factorlm.errors import ConfigError
from factorlm.models.config import ModelConfig
from factorlm.train.config import TrainConfig

BASE = ModelConfig(vocab_size=100, embedding_size=32, hidden_size=64, proj_size=16, num_layers=2)


@pytest.mark.parametrize("text,value", [("20M", 20_000_000), ("1.5m", 1_500_000), ("500k", 500_000),
                                        ("2e6", 2_000_000), ("1234567", 1_234_567), (" 3K ", 3_000), (7, 7)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["2x", "", "M", "-5", "0", "1e-3"])
def test_parse_count_refuses_naming_the_value(text):
    with pytest.raises(ValueError, match=f"--rnn-params .*{text!r}".replace("+", r"\+")):
        parse_count(text)


@pytest.mark.parametrize("cell,args", [("lstm", {}), ("flstm", {"rank": 8}), ("glstm", {"groups": 4})])
def test_hidden_size_is_the_largest_multiple_that_fits(cell, args):
    config = BASE.replace(cell=cell, cell_args=args)
    budget = 150_000
    fit = fit_rnn_params(config, budget)
    assert fit.rnn_params == rnn_params(fit.config) <= budget
    assert fit.config.hidden_size == fit.value and fit.value % HIDDEN_MULTIPLE == 0
    # optimal: the next valid size up is over the budget (for groups=4 every multiple of 8 is valid)
    assert rnn_params(config.replace(hidden_size=fit.value + HIDDEN_MULTIPLE)) > budget
    # everything else is kept
    assert fit.config.replace(hidden_size=config.hidden_size) == config


@pytest.mark.filterwarnings("ignore::factorlm.errors.ConfigWarning")  # ranks past the dense matrix's: said once
def test_a_cell_argument_that_grows_the_count():
    config = BASE.replace(cell="flstm", cell_args={"rank": 4}, hidden_size=256)
    fit = fit_rnn_params(config, "100k", vary="rank")
    rank = fit.config.cell_args["rank"]
    assert fit.value == rank and fit.rnn_params <= 100_000
    assert rnn_params(config.replace(cell_args={"rank": rank + 1})) > 100_000


def test_a_cell_argument_that_shrinks_the_count_takes_the_smallest_that_fits():
    config = BASE.replace(cell="glstm", cell_args={"groups": 1}, hidden_size=256)
    counts = {k: rnn_params(config.replace(cell_args={"groups": k})) for k in (1, 2, 4, 8, 16)}
    budget = (counts[4] + counts[2]) // 2  # groups 2 is over, 4 fits (3 does not divide the sizes)
    fit = fit_rnn_params(config, budget, vary="groups")
    assert fit.value == 4 and fit.rnn_params == counts[4]


def test_a_budget_below_the_smallest_model_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"budget of 1,000 .*hidden_size=24 already has [0-9,]+"):
        fit_rnn_params(BASE, 1000)


def test_an_argument_the_cell_does_not_take_is_refused():
    with pytest.raises(ValueError, match=r"argument of cell 'lstm' \(it takes none\), got 'rank'"):
        fit_rnn_params(BASE, 10**6, vary="rank")


def test_count_command_prints_the_chosen_size(capsys):
    assert cli.main(["count", "--cell", "glstm", "--groups", "4", "--layers", "2", "--vocab", "1000",
                     "--rnn-params", "20M"]) == 0
    out = capsys.readouterr().out
    config, _ = resolve("biglstm", overrides={"model": {"cell": "glstm", "groups": 4, "num_layers": 2,
                                                        "vocab_size": 1000}})
    fit = fit_rnn_params(config, 20_000_000)
    assert f"[hidden_size={fit.value}]" in out
    assert f"{fit.rnn_params:,} RNN parameters" in out


def test_count_vary_without_a_budget_is_one_line(capsys):
    assert cli.main(["count", "--vary", "rank"]) == 2
    assert "give the budget too" in capsys.readouterr().err


def test_compare_match_sizes_every_model_to_the_first():
    train = TrainConfig()
    entries = [Entry("lstm", BASE, train), Entry("g4", BASE.replace(cell="glstm", cell_args={"groups": 4}), train),
               Entry("f8", BASE.replace(cell="flstm", cell_args={"rank": 8}), train)]
    sized = cli._size_entries(entries, None, quiet=True)
    budget = rnn_params(BASE)
    assert sized[0].model == BASE  # the first model is its own budget
    for entry in sized[1:]:
        assert rnn_params(entry.model) <= budget
        assert rnn_params(entry.model.replace(hidden_size=entry.model.hidden_size + HIDDEN_MULTIPLE)) > budget
