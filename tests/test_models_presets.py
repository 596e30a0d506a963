"""Model presets build, have the published shapes, and count as computed by hand here."""

from __future__ import annotations

import pytest
import torch

from factorlm.count import count_model
from factorlm.configs import MODEL_PRESETS, PAPER_PRESETS, model_preset
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn import count_parameters


def lstm_lm_params(V: int, E: int, n: int, L: int) -> int:
    """Embedding + L LSTM layers without projection (one gate bias of 4n each) + softmax with bias."""
    layers = sum(4 * n * ((E if k == 0 else n) + n) + 4 * n for k in range(L))
    return V * E + layers + (n * V + V)


@pytest.mark.parametrize(
    "name, V, size, dropout, init_scale, expected",
    [
        # Zaremba et al. 2014: small 2 x 200, medium 2 x 650, large 2 x 1500, PTB vocabulary 10k
        ("ptb-small", 10_000, 200, 0.0, 0.1, 4_651_600),
        ("ptb-medium", 10_000, 650, 0.5, 0.05, 19_775_200),
        ("ptb-large", 10_000, 1500, 0.65, 0.04, 66_022_000),
    ],
)
def test_ptb_presets(name, V, size, dropout, init_scale, expected):
    c = model_preset(name)
    assert (c.vocab_size, c.embedding_size, c.hidden_size, c.num_layers) == (V, size, size, 2)
    assert (c.cell, c.proj_size, c.forget_bias, c.num_sampled) == ("lstm", 0, 0.0, 0)
    assert (c.dropout, c.init_scale, c.tie_embeddings, c.residual) == (dropout, init_scale, False, False)
    assert lstm_lm_params(V, size, size, 2) == expected
    with torch.device("meta"):
        lm = LanguageModel(c)
    assert count_parameters(lm) == expected == count_model(c)["total_params"]


def test_debug_preset_builds_and_runs_on_cpu():
    c = model_preset("debug")
    assert (c.embedding_size, c.hidden_size, c.num_layers, c.num_sampled) == (64, 64, 2, 0)
    lm = LanguageModel(c)
    assert count_parameters(lm) == lstm_lm_params(c.vocab_size, 64, 64, 2) == 195_048
    x = torch.randint(0, c.vocab_size, (20, 4))
    hidden, state = lm(x)
    loss = lm.loss(hidden, x)
    assert loss.shape == (20, 4)
    loss.mean().backward()
    assert torch.isfinite(loss).all()


def test_paper_presets_are_kept_and_build_through_the_language_model():
    assert set(PAPER_PRESETS) <= set(MODEL_PRESETS) and {"debug", "ptb-small", "ptb-medium"} <= set(MODEL_PRESETS)
    c = model_preset("biglstm")
    with torch.device("meta"):
        lm = LanguageModel(c)
    V, E, n, p = 793_470, 1024, 8192, 1024
    rnn = 2 * (4 * n * (E + p) + 4 * n + p * n)
    assert sum(q.numel() for q in lm.parameter_groups()["rnn"]) == rnn == 151_060_480
    assert count_parameters(lm) == rnn + V * E + V * p + V
    assert lm.softmax.num_sampled == 8192 and lm.drop.p == 0.1 and lm.rnn.forget_bias == 1.0


def test_count_model_with_tied_embeddings():
    c = model_preset("ptb-small").replace(tie_embeddings=True)
    counts = count_model(c)
    assert counts["softmax_params"] == 10_000  # only the bias: the weight is the embedding
    assert counts["total_params"] == 4_651_600 - 10_000 * 200


def test_config_round_trip_keeps_init_scale():
    c = model_preset("ptb-medium")
    assert ModelConfig.from_dict(c.to_dict()) == c
    hierarchical = ModelConfig(cell="glstm", groups=(2, 4), init_scale=0.1)
    assert ModelConfig.from_dict(hierarchical.to_dict()) == hierarchical
