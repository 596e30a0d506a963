"""The built-in synthetic corpus: exact conditional probabilities (brute force over state paths),
the sampler draws from the same model, determinism, and the optimum beats simpler models."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from factorlm.data import open_corpus
from factorlm.data.synthetic import SentenceHMM, SyntheticConfig, SyntheticCorpus, builtin_corpus, word_forms


def tiny_hmm(seed: int = 0, states: int = 2, words: int = 2) -> SentenceHMM:
    rng = np.random.default_rng(seed)
    return SentenceHMM(start=rng.dirichlet(np.ones(states)), trans=rng.dirichlet(np.ones(states), size=states),
                       emit=rng.dirichlet(np.ones(words + 1), size=states))


def brute_force_prefix_probability(hmm: SentenceHMM, tokens) -> float:
    """P(the sentence starts with ``tokens``): a sum over every hidden state path."""
    K = hmm.num_states
    total = 0.0
    for path in itertools.product(range(K), repeat=len(tokens)):
        p = hmm.start[path[0]]
        for t, (state, token) in enumerate(zip(path, tokens)):
            if t:
                p *= hmm.trans[path[t - 1], state]
            p *= hmm.emit[state, token]
        total += p
    return total


def all_sentences(words: int, max_words: int):
    for n in range(max_words + 1):
        for body in itertools.product(range(words), repeat=n):
            yield list(body) + [words]  # the boundary id is W


def test_forward_conditionals_equal_brute_force_ratios():
    hmm = tiny_hmm(seed=1, states=3, words=2)
    sentences = list(all_sentences(2, 4))
    lengths = np.array([len(s) for s in sentences])
    log_probs = hmm.log_probs(np.concatenate(sentences), lengths)
    offset = 0
    for sentence in sentences:
        for t in range(len(sentence)):
            exact = brute_force_prefix_probability(hmm, sentence[: t + 1]) / (
                brute_force_prefix_probability(hmm, sentence[:t]) if t else 1.0)
            assert math.exp(log_probs[offset + t]) == pytest.approx(exact, rel=1e-12)
        offset += len(sentence)


def test_conditionals_are_normalised():
    hmm = tiny_hmm(seed=2, states=3, words=3)
    prefix = [0, 2, 1]
    candidates = [prefix + [x] for x in range(4)]  # the 3 words and the boundary (no boundary inside)
    total = 0.0
    for c in candidates:
        body = c if c[-1] == 3 else c + [3]
        total += math.exp(hmm.log_probs(np.array(body), np.array([len(body)]))[len(prefix)])
    assert total == pytest.approx(1.0, abs=1e-12)


def test_sampler_draws_from_the_model():
    hmm = tiny_hmm(seed=3, states=2, words=2)
    rng = np.random.default_rng(11)
    n = 40_000
    tokens, lengths = hmm.sample(n, rng)
    assert tokens.size == lengths.sum() and (tokens[np.cumsum(lengths) - 1] == 2).all()
    assert np.count_nonzero(tokens == 2) == n  # exactly one boundary per sentence, at its end
    counts = {}
    for sentence in np.split(tokens, np.cumsum(lengths)[:-1]):
        key = tuple(sentence.tolist())
        counts[key] = counts.get(key, 0) + 1
    for sentence in all_sentences(2, 2):
        p = brute_force_prefix_probability(hmm, sentence)
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts.get(tuple(sentence), 0) / n - p) < 5 * sigma + 1e-9, sentence
    # the mean length, exact from the model, versus the sample
    assert abs(lengths.mean() - hmm.mean_length()) < 5 * lengths.std() / math.sqrt(n)


def test_log_probs_input_errors():
    hmm = tiny_hmm()
    with pytest.raises(ValueError, match="must end with the boundary id 2"):
        hmm.log_probs(np.array([0, 1, 1]), np.array([3]))
    with pytest.raises(ValueError, match="must end with the boundary id 2 and contain it only there"):
        hmm.log_probs(np.array([0, 2, 1, 2]), np.array([4]))
    with pytest.raises(ValueError, match="do not cut 3 tokens"):
        hmm.log_probs(np.array([0, 1, 2]), np.array([2]))


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return builtin_corpus()


def test_open_corpus_none_is_the_cached_builtin(corpus):
    assert open_corpus(None) is corpus is builtin_corpus(SyntheticConfig())
    assert corpus.name == "builtin" and corpus.splits == ("train", "valid", "test")
    assert set(corpus.optimal_loss) == set(corpus.splits)


def test_generation_is_deterministic(corpus):
    again = SyntheticCorpus(SyntheticConfig())  # generated afresh, not the cached one
    assert again.vocab == corpus.vocab
    assert again.optimal_loss == corpus.optimal_loss
    assert list(again.sentences("valid")) == list(corpus.sentences("valid"))
    other = SyntheticCorpus(SyntheticConfig(seed=5, train_tokens=2000, valid_tokens=500, test_tokens=500))
    assert list(other.sentences("valid")) != list(corpus.sentences("valid"))[: other.num_sentences("valid")]


def test_split_sizes_and_vocabulary(corpus):
    config = corpus.config
    longest = max(len(s) for split in corpus.splits for s in corpus.sentences(split))
    for split, target in config.split_tokens().items():
        tokens = corpus.num_tokens(split)
        assert target <= tokens < target + longest  # the fewest whole sentences reaching the target
        assert tokens == sum(len(s) for s in corpus.sentences(split))
    vocab = corpus.vocab
    assert len(vocab) == config.num_words + 2 and (vocab.boundary, vocab.unk) == ("<S>", "<UNK>")
    train_counts = np.bincount(np.concatenate([np.array(s) for s in corpus.sentences("train")]), minlength=len(vocab))
    assert vocab.counts == train_counts.tolist()
    assert vocab.counts == sorted(vocab.counts, reverse=True)  # ids are frequency ranks
    assert len(set(word_forms(config.num_words))) == config.num_words


def unigram_loss(corpus) -> float:
    """Cross-entropy of valid under the train unigram distribution (add-one smoothed)."""
    counts = np.array(corpus.vocab.counts, dtype=float) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-np.mean([log_p[t] for s in corpus.sentences("valid") for t in s]))


def bigram_loss(corpus) -> float:
    """Cross-entropy of valid under the train bigram model (within sentences, interpolated with the unigram)."""
    V = len(corpus.vocab)
    pairs = np.zeros((V, V))
    for s in corpus.sentences("train"):
        prev = [corpus.vocab.boundary_id] + s[:-1]
        np.add.at(pairs, (prev, s), 1.0)
    unigram = (np.array(corpus.vocab.counts, float) + 1.0) / (sum(corpus.vocab.counts) + V)
    cond = pairs / np.maximum(pairs.sum(1, keepdims=True), 1.0)
    losses = []
    for s in corpus.sentences("valid"):
        prev = [corpus.vocab.boundary_id] + s[:-1]
        losses.extend(-np.log(0.7 * cond[prev, s] + 0.3 * unigram[s]))
    return float(np.mean(losses))


def test_optimal_loss_beats_unigram_and_bigram_models(corpus):
    optimal = corpus.optimal_loss["valid"]
    assert 3.0 < optimal < unigram_loss(corpus) - 0.5
    assert optimal < bigram_loss(corpus) - 0.3  # hidden topics: more than the previous word matters


def test_optimal_loss_is_the_generators_own_and_beats_perturbed_generators(corpus):
    hmm = corpus.language
    # back from vocabulary ids to generator ids: generator word w is vocab word word_forms(W)[w]
    forms = word_forms(hmm.boundary) + ["<S>"]
    to_generator = np.array([forms.index(w) if w in forms else -1 for w in corpus.vocab.words])
    sentences = [to_generator[np.array(s)] for s in corpus.sentences("valid")]
    tokens, lengths = np.concatenate(sentences), np.array([len(s) for s in sentences])
    assert -hmm.log_probs(tokens, lengths).mean() == pytest.approx(corpus.optimal_loss["valid"], rel=1e-12)
    K = hmm.num_states
    flatter = SentenceHMM(hmm.start, 0.5 * hmm.trans + 0.5 / K, hmm.emit)  # topics persist less
    forgetful = SentenceHMM(hmm.start, np.tile(hmm.start, (K, 1)), hmm.emit)  # no topic memory at all
    for other in (flatter, forgetful):
        assert -other.log_probs(tokens, lengths).mean() > corpus.optimal_loss["valid"] + 0.1


def test_config_errors():
    with pytest.raises(ValueError, match="num_function_words must be in"):
        SyntheticConfig(num_words=10, num_function_words=10)
    with pytest.raises(ValueError, match="support_size=50 exceeds the 8 content words"):
        SyntheticConfig(num_words=10, num_function_words=2, support_size=50)
    with pytest.raises(ValueError, match="train_tokens must be an integer >= 1, got 0"):
        SyntheticConfig(train_tokens=0)
