"""The built-in corpus: a seeded synthetic language whose best possible loss is known exactly.

No text is copied from anywhere: a hidden Markov model over K "topic" states generates sentences,
and because the generator is known, the exact probability of every token given all the tokens
before it follows from the forward algorithm. The mean of -log P(token | history) over a split is
the lowest loss any model can reach on it in expectation, so a run can report its gap to the
optimum (perplexity exp(optimal_loss)).

The generator, one sentence at a time (sentences are independent, so shuffling them changes
nothing and the history that matters is the current sentence):

    s ~ start                              (K,) first state of the sentence
    repeat:
        x ~ emit[s]                        (K, W+1): W words, column W ends the sentence (the boundary)
        if x is the boundary: stop
        s ~ trans[s]                       (K, K): mostly stay (0.5-0.85), else one of 3 successors

Each state emits the boundary with its own probability (0.02-0.15: mean sentence length ~10),
"function words" (the 30 most frequent forms, shared by all states, 15-40% of a state's words)
and content words from its own Zipf-distributed window of 120 forms; neighbouring states' windows
overlap, so a word rarely reveals the state: a model must infer the topic from the context, and
the states persist for several tokens, which an LSTM can learn.

Exact conditional probabilities (forward algorithm with normalised forward variables, so nothing
under- or overflows): with alpha_1 = start and tokens x_1 ... x_n of a sentence,

    P(x_t | x_<t) = sum_k alpha_t[k] emit[k, x_t]
    alpha_{t+1}   = (alpha_t * emit[:, x_t] / P(x_t | x_<t)) @ trans

Word forms are deterministic pseudo-words (consonant-vowel syllables, "ba", "keto", ...). Vocabulary
ids are ranked by train-split count (ties by generator word id), with "<S>" as boundary and "<UNK>"
(never emitted) as unknown word. The default splits have ~300k / 30k / 30k tokens; generating them
and their optimum takes well under a second. Everything is drawn from NumPy's PCG64 generator
seeded with ``config.seed``, so the corpus is identical across runs and machines for a given NumPy
(NumPy keeps its Generator streams stable in practice, without a formal guarantee across versions;
the vocabulary fingerprint stored in checkpoints would reveal a change).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from factorlm.data.corpus import SPLITS, Corpus
from factorlm.data.vocab import Vocabulary
from factorlm.validate import check_int

__all__ = ["SyntheticConfig", "SentenceHMM", "SyntheticCorpus", "builtin_corpus", "word_forms"]

BOUNDARY, UNK = "<S>", "<UNK>"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in language and its split sizes (the defaults are ``open_corpus(None)``)."""

    seed: int = 1703  # everything (language and splits) follows from it
    num_words: int = 1500  # W: word forms, besides "<S>" and "<UNK>"
    num_states: int = 24  # K: hidden topic states
    num_function_words: int = 30  # forms every state emits (the most frequent ones)
    support_size: int = 120  # content words per state (neighbouring states' windows overlap)
    train_tokens: int = 300_000  # each split: the fewest whole sentences with at least this many tokens
    valid_tokens: int = 30_000
    test_tokens: int = 30_000

    def __post_init__(self) -> None:
        for name in ("num_words", "num_states", "support_size", "train_tokens", "valid_tokens", "test_tokens"):
            check_int(f"SyntheticConfig.{name}", getattr(self, name))
        check_int("SyntheticConfig.seed", self.seed, 0)
        if not 0 <= self.num_function_words < self.num_words:
            raise ValueError(f"SyntheticConfig.num_function_words must be in [0, num_words={self.num_words}), "
                             f"got {self.num_function_words}")
        content = self.num_words - self.num_function_words
        if self.support_size > content:
            raise ValueError(f"SyntheticConfig.support_size={self.support_size} exceeds the {content} content words "
                             f"(num_words - num_function_words)")

    def split_tokens(self) -> dict[str, int]:
        return {"train": self.train_tokens, "valid": self.valid_tokens, "test": self.test_tokens}


@dataclass(frozen=True, eq=False)
class SentenceHMM:
    """A hidden Markov model of sentences; token ids 0..W-1 are words and W is the boundary.

    start (K,), trans (K, K), emit (K, W + 1): rows are probability distributions.
    """

    start: np.ndarray
    trans: np.ndarray
    emit: np.ndarray

    @property
    def num_states(self) -> int:
        return self.emit.shape[0]

    @property
    def boundary(self) -> int:
        """The id of the sentence end (= the number of words W)."""
        return self.emit.shape[1] - 1

    @classmethod
    def from_config(cls, config: SyntheticConfig) -> "SentenceHMM":
        """The language of ``config`` (see the module docstring), drawn from its seed."""
        rng = np.random.default_rng([config.seed, 0])
        K, W, F, M = config.num_states, config.num_words, config.num_function_words, config.support_size
        content = W - F
        function = np.zeros(W)
        function[:F] = 1.0 / np.arange(1, F + 1)
        function /= max(function.sum(), 1.0)
        zipf = 1.0 / np.arange(1, M + 1) ** 1.1
        zipf /= zipf.sum()
        emit = np.zeros((K, W + 1))
        for k in range(K):
            window = F + (round(k * content / K) + np.arange(M)) % content  # overlaps the next states' windows
            words = np.zeros(W)
            words[window] = zipf[rng.permutation(M)]
            share = rng.uniform(0.15, 0.4) if F else 0.0
            end = rng.uniform(0.02, 0.15)
            emit[k, :W] = (1.0 - end) * (share * function + (1.0 - share) * words)
            emit[k, W] = end
        trans = np.zeros((K, K))
        for k in range(K):
            stay = rng.uniform(0.5, 0.85) if K > 1 else 1.0
            trans[k, k] = stay
            if K > 1:
                others = rng.choice(np.delete(np.arange(K), k), size=min(3, K - 1), replace=False)
                trans[k, others] += (1.0 - stay) * rng.dirichlet(np.ones(others.size))
        start = rng.dirichlet(np.full(K, 0.5))
        return cls(start=start, trans=trans, emit=emit)

    def mean_length(self) -> float:
        """Expected tokens per sentence (boundary included): start @ (I - diag(1 - end) @ trans)^-1 @ 1."""
        go_on = (1.0 - self.emit[:, -1])[:, None] * self.trans
        return float(self.start @ np.linalg.solve(np.eye(self.num_states) - go_on, np.ones(self.num_states)))

    def sample(self, num_sentences: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw sentences: (tokens, lengths), tokens the concatenated sentences (each ending with the
        boundary id W), int64; all sentences are advanced together, one token per step."""
        width = self.emit.shape[1]
        emit_cdf, trans_cdf = _stacked_cdf(self.emit), _stacked_cdf(self.trans)
        state = _draw(_stacked_cdf(self.start[None]), np.zeros(num_sentences, np.int64), self.num_states, rng)
        sentence = np.arange(num_sentences)
        who, what = [], []
        while sentence.size:
            token = _draw(emit_cdf, state, width, rng)
            who.append(sentence)
            what.append(token)
            going = token != self.boundary
            sentence, state = sentence[going], _draw(trans_cdf, state[going], self.num_states, rng)
        who_all = np.concatenate(who) if who else np.zeros(0, np.int64)
        order = np.argsort(who_all, kind="stable")  # stable: each sentence's tokens stay in time order
        tokens = (np.concatenate(what) if what else np.zeros(0, np.int64))[order]
        return tokens.astype(np.int64), np.bincount(who_all, minlength=num_sentences).astype(np.int64)

    def log_probs(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """ln P(token | the sentence's earlier tokens) for every token (same layout as ``tokens``).

        tokens: concatenated sentences, each ending with the boundary id and containing it only
        there; lengths: tokens per sentence. All sentences run together, longest first.
        """
        tokens, lengths = np.asarray(tokens, np.int64), np.asarray(lengths, np.int64)
        ends = np.cumsum(lengths)
        if lengths.size and (lengths.min() < 1 or ends[-1] != tokens.size):
            raise ValueError(f"lengths (sum {int(ends[-1])}, min {int(lengths.min())}) do not cut "
                             f"{tokens.size} tokens into non-empty sentences")
        boundaries = np.flatnonzero(tokens == self.boundary)
        if boundaries.size != lengths.size or (lengths.size and not np.array_equal(boundaries, ends - 1)):
            raise ValueError(f"every sentence must end with the boundary id {self.boundary} and contain it only there")
        if tokens.size and (tokens.min() < 0 or tokens.max() > self.boundary):
            raise ValueError(f"token ids must be in [0, {self.boundary}], got {tokens.min()}..{tokens.max()}")
        order = np.argsort(-lengths, kind="stable")
        sorted_lengths, starts = lengths[order], (ends - lengths)[order]
        out = np.empty(tokens.size)
        alpha = np.tile(self.start, (lengths.size, 1))  # (S, K) P(state | sentence so far)
        emit_t = self.emit.T  # (W + 1, K)
        for t in range(int(sorted_lengths[0]) if lengths.size else 0):
            active = int(np.count_nonzero(sorted_lengths > t))  # a prefix: sentences are longest first
            where = starts[:active] + t
            joint = alpha[:active] * emit_t[tokens[where]]  # (active, K)
            p = joint.sum(axis=1)
            out[where] = np.log(p)
            alpha = (joint / p[:, None]) @ self.trans
        return out


def _stacked_cdf(probs: np.ndarray) -> np.ndarray:
    """Row k's cumulative distribution shifted by k, flattened: one increasing array for all rows."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0  # no rounding gap at the top of a row
    return (cdf + np.arange(probs.shape[0])[:, None]).ravel()


def _draw(stacked_cdf: np.ndarray, rows: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """One draw from distribution ``rows[i]`` for every i (inverse CDF in a single searchsorted)."""
    u = rng.random(rows.size)
    index = np.searchsorted(stacked_cdf, rows + u, side="right") - rows * width
    return np.minimum(index, width - 1)  # rows + u may round up to rows + 1


def word_forms(count: int) -> list[str]:
    """``count`` distinct pseudo-words: all 1-syllable forms, then 2-syllable ones, ..., in a fixed order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    forms: list[str] = []
    level = [""]
    rng = np.random.default_rng(0)  # a fixed scramble, so consecutive ids do not look alike
    while len(forms) < count:
        level = [a + s for a in level for s in syllables]
        forms.extend(level[i] for i in rng.permutation(len(level))[: count - len(forms)])
    return forms


def _generate_split(hmm: SentenceHMM, target: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The fewest whole sentences with >= target tokens. Stopping there depends only on what was
    already generated, so every kept token still has the HMM's conditional distribution."""
    mean = hmm.mean_length()
    tokens, lengths, total = [], [], 0
    while total < target:
        t, n = hmm.sample(int((target - total) / mean * 1.05) + 16, rng)
        tokens.append(t)
        lengths.append(n)
        total += t.size
    tokens_all, lengths_all = np.concatenate(tokens), np.concatenate(lengths)
    keep = int(np.searchsorted(np.cumsum(lengths_all), target)) + 1
    return tokens_all[: int(lengths_all[:keep].sum())], lengths_all[:keep]


class SyntheticCorpus(Corpus):
    """The built-in corpus of ``config``: splits train/valid/test, one shard each, and
    ``optimal_loss`` (the exact best mean loss per split). ``language`` is the generating HMM."""

    layout = "builtin"

    def __init__(self, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.config = config
        self.language = hmm = SentenceHMM.from_config(config)
        raw = {split: _generate_split(hmm, target, np.random.default_rng([config.seed, 1 + i]))
               for i, (split, target) in enumerate(config.split_tokens().items())}
        self.optimal_loss = {split: float(-hmm.log_probs(t, n).mean()) for split, (t, n) in raw.items()}

        # Vocabulary ranked by train count; generator id w (boundary: W) becomes vocab id to_vocab[w].
        W = hmm.boundary
        counts = np.bincount(raw["train"][0], minlength=W + 1)
        forms = word_forms(W) + [BOUNDARY]
        ranked = sorted(range(W + 1), key=lambda w: (-counts[w], w))
        vocab = Vocabulary([forms[w] for w in ranked] + [UNK], [int(counts[w]) for w in ranked] + [0],
                           boundary=BOUNDARY, unk=UNK)
        to_vocab = np.empty(W + 1, np.int64)
        to_vocab[ranked] = np.arange(W + 1)
        self._data = {split: np.split(to_vocab[t], np.cumsum(n)[:-1]) for split, (t, n) in raw.items()}
        super().__init__("builtin", vocab, SPLITS)
        self._counts = {split: (n.size, int(n.sum())) for split, (_, n) in raw.items()}

    def _num_shards(self, split: str) -> int:
        return 1

    def _load_shard(self, split: str, index: int) -> list[np.ndarray]:
        return self._data[split]

    def _encode(self, item: np.ndarray) -> list[int]:
        return item.tolist()

    def _item_tokens(self, item: np.ndarray) -> int:
        return item.size


def builtin_corpus(config: SyntheticConfig | None = None) -> SyntheticCorpus:
    """The built-in corpus (cached: generated once per process and config)."""
    return _cached_corpus(config if config is not None else SyntheticConfig())


@functools.lru_cache(maxsize=4)
def _cached_corpus(config: SyntheticConfig) -> SyntheticCorpus:
    return SyntheticCorpus(config)
