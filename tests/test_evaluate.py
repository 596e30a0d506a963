"""Exact evaluation: every target once, token-weighted, state carried, independent of batch size."""

from __future__ import annotations

import math

import pytest
import torch

from factorlm.data import open_corpus, split_stream
from factorlm.evaluate import evaluate_stream, generate, sample_index, score_sentences
from factorlm.models import LanguageModel, ModelConfig


def _model(vocab_size, cell="lstm", **kw):
    config = ModelConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=24, proj_size=8, num_layers=2,
                         cell=cell, forget_bias=1.0, **kw)
    return LanguageModel(config).eval()


def _reference_loss(model, stream):
    """Batch size 1, one token at a time, full log-softmax written out: the definition."""
    state = model.init_state(1)
    total = 0.0
    with torch.no_grad():
        for t in range(stream.numel() - 1):
            hidden, state = model(stream[t : t + 1].view(1, 1), state)
            log_probs = torch.log_softmax(model.log_probs(hidden).view(-1).double(), dim=0)
            total -= log_probs[stream[t + 1]].item()
    return total / (stream.numel() - 1)


@pytest.mark.parametrize("cell,extra", [("lstm", {}), ("glstm", {"groups": 2}), ("flstm", {"rank": 4})])
def test_matches_token_by_token_definition(cell, extra):
    torch.manual_seed(0)
    stream = torch.randint(0, 50, (157,))
    model = _model(50, cell, **extra)
    expected = _reference_loss(model, stream)
    for batch_size in (1, 4, 64):
        result = evaluate_stream(model, stream, batch_size=batch_size, num_steps=7)
        assert result.tokens == 156
        assert result.loss == pytest.approx(expected, rel=1e-6)
        assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


def test_batch_size_1_and_64_agree_on_the_builtin_corpus():
    corpus = open_corpus(None)
    stream = split_stream(corpus, "valid")
    assert stream.numel() - 1 == corpus.num_tokens("valid")
    model = _model(len(corpus.vocab))
    one = evaluate_stream(model, stream, batch_size=1, num_steps=20)
    many = evaluate_stream(model, stream, batch_size=64, num_steps=20)
    assert one.tokens == many.tokens == corpus.num_tokens("valid")
    assert abs(many.perplexity / one.perplexity - 1) < 1e-4
    assert many.passes >= 2 and many.sequential_rows == 0  # an LSTM forgets: the passes converge


def test_state_that_never_forgets_still_gives_the_exact_result():
    """forget gate pinned open: the state carries through every segment; the passes propagate it."""
    torch.manual_seed(1)
    model = _never_forgetting_model(30)
    stream = torch.randint(0, 30, (90,))
    expected = _reference_loss(model, stream)
    result = evaluate_stream(model, stream, batch_size=8, num_steps=5)
    assert result.loss == pytest.approx(expected, rel=1e-6)


class _CountingModel:
    """The model with a count of the token positions its forward calls process (the work done)."""

    def __init__(self, model):
        self.model, self.token_steps = model, 0

    def __call__(self, inputs, state):
        self.token_steps += inputs.numel()
        return self.model(inputs, state)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _never_forgetting_model(vocab_size, cell="lstm", **extra):
    model = _model(vocab_size, cell, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias_l" in name:
                p[24:48] = 30.0  # sigmoid(f) == 1: c never forgets
    return model


@pytest.mark.parametrize("cell,extra", [("lstm", {}), ("flstm", {"rank": 4})])
def test_a_state_that_never_forgets_costs_at_most_a_few_passes(cell, extra):
    """Waiting for convergence would take one pass per row (32 here); the work stays within 4 passes."""
    torch.manual_seed(4)
    model = _never_forgetting_model(30, cell, **extra)
    stream = torch.randint(0, 30, (641,))  # 640 targets: 32 rows of 20
    one = _CountingModel(model)
    expected = evaluate_stream(one, stream, batch_size=1, num_steps=8)
    assert one.token_steps == 640 and (expected.passes, expected.sequential_rows) == (1, 0)
    counted = _CountingModel(model)
    result = evaluate_stream(counted, stream, batch_size=32, num_steps=8)
    assert (result.passes, result.sequential_rows) == (3, 29)
    assert counted.token_steps == 3 * 640 + 29 * 20
    assert counted.token_steps <= 4 * 640
    assert result.tokens == 640
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    assert result.to_dict() == {"perplexity": result.perplexity, "loss": result.loss, "tokens": 640, "passes": 3,
                                "sequential_rows": 29}


def test_max_passes_bounds_the_batched_passes_and_keeps_the_result():
    torch.manual_seed(5)
    model = _never_forgetting_model(30)
    stream = torch.randint(0, 30, (101,))
    expected = _reference_loss(model, stream)
    for max_passes, rows_in_order in ((1, 9), (2, 8), (10, 0)):
        result = evaluate_stream(model, stream, batch_size=10, num_steps=3, max_passes=max_passes)
        assert (result.passes, result.sequential_rows) == (min(max_passes, 10), rows_in_order)
        assert result.loss == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="max_passes must be an integer >= 1, got 0"):
        evaluate_stream(model, stream, max_passes=0)


def test_evaluation_shows_passes_and_time_left_on_stderr(monkeypatch, capsys):
    import factorlm.evaluate as evaluate_module
    from factorlm.progress import Progress

    class Eager(Progress):  # print every update: the test runs in well under the usual 2 s delay
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "delay": 0.0, "interval": 0.0})

    monkeypatch.setattr(evaluate_module, "Progress", Eager)
    torch.manual_seed(6)
    model = _never_forgetting_model(30)
    stream = torch.randint(0, 30, (81,))
    evaluate_stream(model, stream, batch_size=8, num_steps=5)
    assert capsys.readouterr().err == ""  # progress is off unless asked for
    evaluate_stream(model, stream, batch_size=8, num_steps=5, progress="valid")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0].startswith("valid, pass 1: 40 tokens / 160 tokens (25%), ")
    assert any(line.startswith("valid, pass 3: ") and line.endswith(" left") for line in lines)
    assert any(line.startswith("valid, rows 4-8 of 8 in order (the state did not converge): ") for line in lines)
    assert lines[-1].startswith("valid, rows 4-8 of 8 in order (the state did not converge): done, 290 tokens in ")
    with pytest.raises(TypeError, match="progress must be True, False or a label, got function"):
        evaluate_stream(model, stream, progress=lambda done, total: None)


def test_evaluate_restores_training_mode_and_rejects_bad_input():
    model = _model(20).train()
    evaluate_stream(model, torch.randint(0, 20, (30,)), batch_size=3)
    assert model.training
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_stream(model, torch.tensor([3]))


def test_score_sentences_equals_per_sentence_definition():
    torch.manual_seed(2)
    model = _model(40)
    boundary = 0
    sentences = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8], []]
    scores = score_sentences(model, sentences, boundary, batch_size=2)
    for sentence, (logprob, n) in zip(sentences, scores):
        stream = torch.tensor([boundary, *sentence, boundary])
        assert n == len(sentence) + 1
        assert -logprob / n == pytest.approx(_reference_loss(model, stream), rel=1e-6)


def test_generate_respects_top_k_and_seed():
    torch.manual_seed(3)
    model = _model(40)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = generate(model, [3, 4], 0, max_tokens=12, generator=g1)
    b = generate(model, [3, 4], 0, max_tokens=12, generator=g2)
    assert a == b and len(a) <= 12 and 0 not in a
    grad_modes = []
    hook = model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    generate(model, [3, 4], 0, max_tokens=3)
    hook.remove()
    assert grad_modes and not any(grad_modes)  # no autograd graph is built while sampling
    greedy = generate(model, [3], 0, max_tokens=5, top_k=1)
    again = generate(model, [3], 0, max_tokens=5, top_k=1)
    assert greedy == again
    for bad in (0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0, got"):
            generate(model, [3], 0, temperature=bad)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 0, got -5"):
        generate(model, [3], 0, max_tokens=-5)


def test_sample_index_draws_from_the_distribution_and_never_a_zero_weight():
    """sample_index is inverse-CDF sampling: its frequencies over many draws match the weights
    (a chi-square-sized tolerance), zero weights are never drawn, and a seeded generator repeats."""
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 6.0, 0.0])  # sum 10, not normalised
    g = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = torch.bincount(torch.tensor([sample_index(weights, g) for _ in range(draws)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    expected = weights / weights.sum() * draws
    for i in (1, 3, 4):  # within 5 standard deviations of a binomial count
        sd = (expected[i] * (1 - weights[i] / weights.sum())).sqrt()
        assert abs(counts[i] - expected[i]) < 5 * sd, (i, counts.tolist())
    a = [sample_index(weights, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == [sample_index(weights, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert sample_index(torch.tensor([0.0, 0.0, 2.0]), g) == 2
    with pytest.raises(ValueError, match="cannot sample from weights that sum to 0.0"):
        sample_index(torch.zeros(4), g)
