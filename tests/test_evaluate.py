"""Exact evaluation: every target once, token-weighted, state carried, independent of batch size."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SHARED_DATA

from factorlm.data import open_corpus, split_stream
from factorlm.evaluate import checkpoint_positions, evaluate_stream, generate, sample_index, score_sentences
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
    # pass 1 whole; pass 2 re-scores rows 1-31 whole (no state ever meets its kept one), pass 3
    # rows 2-31 (row 1's start held); then rows 4-32 in order. Row 0 is never re-scored.
    assert counted.token_steps == 640 + 31 * 20 + 30 * 20 + 29 * 20
    assert result.rescored_tokens == counted.token_steps - 640
    assert counted.token_steps <= 4 * 640
    assert result.tokens == 640
    assert result.loss == pytest.approx(expected.loss, rel=1e-6)
    assert result.to_dict() == {"perplexity": result.perplexity, "loss": result.loss, "tokens": 640, "passes": 3,
                                "sequential_rows": 29, "rescored_tokens": 31 * 20 + 30 * 20 + 29 * 20}
    whole = _CountingModel(model)  # the old way: every pass re-scores every row whole
    old = evaluate_stream(whole, stream, batch_size=32, num_steps=8, stop_early=False)
    assert (old.passes, old.sequential_rows) == (3, 29)
    assert whole.token_steps == 3 * 640 + 29 * 20 == 640 + old.rescored_tokens
    assert old.loss == pytest.approx(expected.loss, rel=1e-6)


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
    for bad in (-1e-5, float("nan"), "0"):
        with pytest.raises(ValueError, match="tol must be a number >= 0, got"):
            evaluate_stream(model, stream, tol=bad)


def _float64_model(vocab_size, cell="lstm", **extra):
    torch.manual_seed(0)
    return _model(vocab_size, cell, **extra).double()


@pytest.mark.parametrize("cell,extra", [("lstm", {}), ("flstm", {"rank": 4})])
def test_early_stop_keeps_the_two_full_passes_perplexity_at_a_fraction_of_the_work(cell, extra):
    """Pass 2 stops each row where its state meets pass 1's: the perplexity is the two full passes'
    (and batch size 1's) to 1e-9 in float64, and pass 2 re-scores a few chunks per row, not the rows."""
    corpus = open_corpus(None)
    stream = split_stream(corpus, "valid")  # 30,002 targets
    model = _float64_model(len(corpus.vocab), cell, **extra)
    one = evaluate_stream(model, stream, batch_size=1, num_steps=20)  # a single row: exact by definition
    assert (one.passes, one.rescored_tokens) == (1, 0)
    for batch_size in (7, 64, 200):
        old = evaluate_stream(model, stream, batch_size=batch_size, num_steps=20, stop_early=False)
        counted = _CountingModel(model)
        new = evaluate_stream(counted, stream, batch_size=batch_size, num_steps=20)
        assert abs(new.perplexity / old.perplexity - 1) < 1e-9, batch_size
        assert abs(new.perplexity / one.perplexity - 1) < 1e-9, batch_size
        assert new.tokens == old.tokens == one.tokens
        assert (new.passes, new.sequential_rows, old.passes) == (2, 0, 2)
        length = -(-new.tokens // batch_size)  # a row's length (stream_rows)
        one_pass = length * -(-new.tokens // length)
        assert old.rescored_tokens == one_pass  # before: pass 2 re-scored every row whole
        # the reported count is the work done: pass 1 plus what pass 2 re-scored
        assert counted.token_steps == one_pass + new.rescored_tokens
        # every row but row 0 re-scored, none to its end: each stopped within 4 chunks of 20 steps
        assert 0 < new.rescored_tokens <= (batch_size - 1) * 4 * 20
        assert new.rescored_tokens < one_pass / 2
    assert new.rescored_tokens < one_pass / 2 and batch_size == 200  # 150 steps a row: even short rows gain


@pytest.mark.skipif(not (SHARED_DATA / "ptb" / "ptb.valid.txt").exists(),
                    reason=f"the real PTB files are not in {SHARED_DATA / 'ptb'}")
def test_early_stop_on_real_ptb_text_keeps_the_perplexity():
    """Real text (PTB valid, 73,760 targets, 10,000 words): the same agreement and saving."""
    corpus = open_corpus(SHARED_DATA / "ptb")
    stream = split_stream(corpus, "valid")
    model = _float64_model(len(corpus.vocab))
    old = evaluate_stream(model, stream, batch_size=64, num_steps=20, stop_early=False)
    new = evaluate_stream(model, stream, batch_size=64, num_steps=20)
    assert new.tokens == old.tokens == 73_760
    assert abs(new.perplexity / old.perplexity - 1) < 1e-9
    assert (new.passes, new.sequential_rows) == (2, 0)
    assert 0 < new.rescored_tokens <= 63 * 4 * 20 < old.rescored_tokens / 10


def test_rows_that_never_meet_their_trajectory_are_rescored_whole_and_stay_exact():
    """tol = 0: no re-scored state ever equals pass 1's bit for bit, so no row stops early; rows are
    re-scored to their ends, the passes run out and the rest goes in order: still the exact result."""
    torch.manual_seed(7)
    model = _float64_model(30)
    stream = torch.randint(0, 30, (401,))  # 400 targets: 8 rows of 50
    expected = evaluate_stream(model, stream, batch_size=1, num_steps=5)
    counted = _CountingModel(model)
    result = evaluate_stream(counted, stream, batch_size=8, num_steps=5, tol=0.0)
    old = evaluate_stream(model, stream, batch_size=8, num_steps=5, tol=0.0, stop_early=False)
    # pass 2 re-scores rows 1-7 to their ends, pass 3 rows 2-7 (row 1's start held exactly), then
    # rows 4-8 go in order: every re-scored row whole, as before the early stop
    assert (result.passes, result.sequential_rows) == (3, 5)
    assert counted.token_steps == 400 + result.rescored_tokens
    assert result.rescored_tokens == 7 * 50 + 6 * 50 + 5 * 50
    assert abs(result.loss / expected.loss - 1) < 1e-9
    assert abs(result.loss / old.loss - 1) < 1e-9


def test_a_forgetting_row_can_stop_at_its_first_checkpoint():
    """A model that forgets at once (forget gate closed, every state from the current input):
    every re-scored row meets pass 1's state at the end of its first chunk and stops there."""
    torch.manual_seed(8)
    model = _float64_model(30)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias_l" in name:
                p[24:48] = -60.0  # sigmoid(f) == 0 in float64 to 1e-26: c forgets every step
    stream = torch.randint(0, 30, (401,))
    counted = _CountingModel(model)
    result = evaluate_stream(counted, stream, batch_size=8, num_steps=5)
    assert (result.passes, result.sequential_rows) == (2, 0)
    assert result.rescored_tokens == 7 * 5  # rows 1-7, one chunk of 5 steps each
    assert counted.token_steps == 400 + 7 * 5
    assert abs(result.loss / evaluate_stream(model, stream, batch_size=1).loss - 1) < 1e-12


def test_checkpoints_are_dense_early_then_doubling_so_memory_grows_as_log_of_the_row():
    assert checkpoint_positions(45, 5) == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert checkpoint_positions(203, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 160, 203]
    assert checkpoint_positions(3, 20) == [3]
    assert len(checkpoint_positions(10_000, 20)) == 14  # the module docstring's example
    assert len(checkpoint_positions(10_000_000, 20)) == 24  # a million chunks: 24 kept states per row


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
    # 80 in pass 1, rows 1-7 (70) in pass 2, rows 2-7 (60) in pass 3, rows 4-8 (50) in order
    assert lines[-1].startswith("valid, rows 4-8 of 8 in order (the state did not converge): done, 260 tokens in ")
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
