"""Softmax output layers: the exact full softmax and TensorFlow-style sampled softmax.

Both heads own the same parameters, ``weight`` (V, d) and ``bias`` (V,), so a model trained with
the sampled head is evaluated with the exact one and their checkpoints are interchangeable.

Sampled softmax follows ``tf.nn.sampled_softmax_loss`` with its default candidate sampler, as used
by the paper's code (Jozefowicz et al. 2016; Kuchaiev & Ginsburg 2017):

1. ``LogUniformSampler`` draws ``num_sampled`` candidate ids once per batch, shared by every row,
   from P(k) = (log(k + 2) - log(k + 1)) / log(V + 1) (ids sorted by decreasing frequency).
   With ``unique=True`` (TensorFlow's default) it draws with replacement until ``num_sampled``
   distinct ids have been seen; ``num_tries`` is the number of draws that took.
2. Each id's expected count Q(k) (how often it is expected among the candidates) is
   ``num_sampled · P(k)`` when no draw was rejected (always the case with ``unique=False``), and
   ``1 - (1 - P(k))^num_tries`` otherwise: TensorFlow's approximation of the post-rejection
   probability, computed as ``-expm1(num_tries · log1p(-P(k)))``.
3. Row i's logits are its true class's logit and the candidates' logits (bias included), each
   minus log Q ("subtract_log_q"); a candidate equal to row i's target is removed for that row
   (logit -inf: "remove_accidental_hits"); the loss is the cross entropy with the true class at
   index 0, natural log.

Only the true and candidate rows of ``weight`` and ``bias`` are read, so the (N, V) logits are never
formed and only those rows receive gradient.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from factorlm.models.exact_nll import SMALL_LOGITS, full_softmax_nll, tile_shape


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CandidateSample:
    """One batch's shared candidates.

    ids: (S,) int64 sampled ids (distinct when drawn with ``unique=True``), in the order drawn;
    expected_counts: (S,) float64 Q of each id; num_tries: draws it took (S without rejection).
    """

    ids: Tensor
    expected_counts: Tensor
    num_tries: int


class LogUniformSampler:
    """TensorFlow's log-uniform (Zipfian) candidate sampler over ids 0 … V-1.

    P(k) = (log(k + 2) - log(k + 1)) / log(V + 1): meant for ids sorted by decreasing frequency.
    A draw is ``floor(exp(u · log(V + 1))) - 1`` with u ~ U[0, 1), which has exactly that law.

    ``unique=True`` (TensorFlow's default for sampled softmax) returns distinct ids: draws are made
    with replacement and repeats rejected until ``num_sampled`` distinct ids are found. It is
    vectorised: a block of draws is made at once, the first occurrence of each id is marked with a
    stable sort, and the sample ends at the draw that brings the distinct count to ``num_sampled``
    (further blocks only when the first one falls short), so the result is the one a draw-by-draw
    rejection loop would give on the same stream of draws.
    """

    def __init__(self, vocab_size: int, *, unique: bool = True) -> None:
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.unique = bool(unique)
        self._log_range = math.log(self.vocab_size + 1)

    def __repr__(self) -> str:
        return f"LogUniformSampler({self.vocab_size}, unique={self.unique})"

    def probability(self, ids: Tensor) -> Tensor:
        """P(k) for each id in ``ids`` (any shape), as float64 of the same shape."""
        k = ids.to(torch.float64)
        return torch.log1p(1.0 / (k + 1.0)) / self._log_range

    def expected_count(self, ids: Tensor, num_sampled: int, num_tries: int) -> Tensor:
        """Q(k) for each id in ``ids`` (any shape), float64: TensorFlow's expected count.

        ``num_sampled · P(k)`` when ``num_tries == num_sampled`` (no rejection happened, always so
        for ``unique=False``), else ``1 - (1 - P(k))^num_tries``.
        """
        p = self.probability(ids)
        if num_tries == num_sampled:
            return p * num_sampled
        return -torch.expm1(num_tries * torch.log1p(-p))

    def _draw(self, count: int, device, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(count, dtype=torch.float64, device=device, generator=generator)
        ids = torch.exp(u * self._log_range).floor_().long() - 1
        return ids.clamp_(0, self.vocab_size - 1)  # guards against rounding at u -> 1

    def sample(
        self, num_sampled: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> CandidateSample:
        """Draw one batch's candidates: ids (num_sampled,) int64 on ``device``, and their Q.

        ``generator`` (on ``device``) makes the draw reproducible; without it the global RNG is used.
        """
        num_sampled = _check_int("num_sampled", num_sampled, 1)
        if not self.unique:
            ids = self._draw(num_sampled, device, generator)
            return CandidateSample(ids, self.expected_count(ids, num_sampled, num_sampled), num_sampled)
        if num_sampled > self.vocab_size:
            raise ValueError(
                f"unique sampling needs num_sampled <= vocab_size, got num_sampled={num_sampled} and "
                f"vocab_size={self.vocab_size}"
            )
        # Typical runs need about 2 draws per distinct id (1.96 for 8192 of the paper's 793,470
        # words); the first block covers that, later blocks double the stream.
        draws = self._draw(2 * num_sampled + 64, device, generator)
        while True:
            _, order = torch.sort(draws, stable=True)
            sorted_draws = draws[order]
            first = torch.ones_like(draws, dtype=torch.bool)
            first[1:] = sorted_draws[1:] != sorted_draws[:-1]  # earliest draw of each id (stable sort)
            is_new = torch.empty_like(first)
            is_new[order] = first  # back to draw order: True where an id appears for the first time
            distinct = torch.cumsum(is_new, 0)
            if int(distinct[-1]) >= num_sampled:
                break
            draws = torch.cat([draws, self._draw(draws.numel(), device, generator)])
        num_tries = int(torch.searchsorted(distinct, num_sampled)) + 1  # the draw giving the S-th id
        ids = draws[:num_tries][is_new[:num_tries]]
        return CandidateSample(ids, self.expected_count(ids, num_sampled, num_tries), num_tries)


def sampled_softmax_nll(
    hidden: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    candidates: CandidateSample,
    true_expected_counts: Tensor,
    *,
    remove_accidental_hits: bool = True,
    subtract_log_q: bool = True,
    sparse_grad: bool = False,
) -> Tensor:
    """Per-row sampled-softmax negative log-likelihood, the formula of ``tf.nn.sampled_softmax_loss``.

    hidden (N, d), targets (N,) int64, weight (V, d), bias (V,) or None, candidates with S ids,
    true_expected_counts (N,) Q of each target -> (N,) loss, natural log.
    sparse_grad: weight's gradient is a sparse tensor holding only the N + S gathered rows (as
    TensorFlow's IndexedSlices), instead of a dense (V, d) one that is mostly zeros.
    """
    ids = candidates.ids
    true_logits = (hidden * F.embedding(targets, weight, sparse=sparse_grad)).sum(-1)  # (N,)
    sampled_logits = hidden @ F.embedding(ids, weight, sparse=sparse_grad).t()  # (N, S)
    if sampled_logits.dtype in (torch.float16, torch.bfloat16):
        # Under autocast (or a half model) keep the log-Q corrections and the softmax in fp32:
        # log Q reaches -13 for rare words, where bf16 resolves only steps of 1/16.
        true_logits, sampled_logits = true_logits.float(), sampled_logits.float()
    if bias is not None:
        true_logits = true_logits + bias[targets]
        sampled_logits = sampled_logits + bias[ids]
    if subtract_log_q:
        true_logits = true_logits - torch.log(true_expected_counts).to(true_logits.dtype)
        sampled_logits = sampled_logits - torch.log(candidates.expected_counts).to(sampled_logits.dtype)
    if remove_accidental_hits:
        # A candidate that is the row's own target must not count as a negative for that row.
        hits = targets.unsqueeze(1) == ids.unsqueeze(0)  # (N, S)
        sampled_logits = sampled_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([true_logits.unsqueeze(1), sampled_logits], dim=1)  # (N, 1 + S), true class first
    # -log softmax(logits)[0]; the true logit is finite, so the -inf entries only drop out.
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


class FullSoftmax(nn.Module):
    """The exact softmax over the whole vocabulary: logits = hidden · weightᵀ + bias.

    weight (V, d), bias (V,). ``nll`` gives the per-token negative log-likelihood (natural log);
    without autograd (evaluation) it forms the logits in cache-sized tiles of at most
    ``max_logits`` and takes the logsumexp in place (factorlm.models.exact_nll; a call of at most
    SMALL_LOGITS logits runs F.cross_entropy whole), so evaluating a large vocabulary (the paper's
    793,470 words) never forms all (N, V) at once.
    """

    #: Largest number of logits formed at once when no gradient is needed (2^26: 256 MiB in fp32).
    max_logits: int = 1 << 26

    def __init__(self, in_features: int, vocab_size: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1)
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.weight = nn.Parameter(torch.empty(self.vocab_size, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.vocab_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, 1/d) (logits of unit scale for unit-scale inputs), bias = 0."""
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> logits (..., V)."""
        return F.linear(hidden, self.weight, self.bias)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) -> log-softmax over the vocabulary (..., V)."""
        return torch.log_softmax(self.logits(hidden), dim=-1)

    def nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Exact negative log-likelihood: hidden (..., d), targets (...) int64 -> (...)."""
        self._check(hidden, targets)
        rows = hidden.reshape(-1, self.in_features)
        flat = targets.reshape(-1)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, self.weight, self.bias)
        )
        if needs_grad or rows.shape[0] * self.vocab_size <= min(SMALL_LOGITS, self.max_logits):
            # backward needs the logits anyway; a few logits fit in cache whole
            loss = F.cross_entropy(self.logits(rows), flat, reduction="none")
        else:
            block_rows, block_vocab = tile_shape(rows.shape[0], self.vocab_size, rows.device, self.max_logits)
            loss = full_softmax_nll(rows, flat, self.weight, self.bias, block_rows=block_rows,
                                    block_vocab=block_vocab)
        return loss.view(targets.shape)

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """The exact per-token loss (see :meth:`nll`)."""
        return self.nll(hidden, targets)

    def _check(self, hidden: Tensor, targets: Tensor) -> None:
        name = type(self).__name__
        if hidden.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"{name}: hidden must end in in_features={self.in_features}, got shape {tuple(hidden.shape)}"
            )
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"{name}: targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                f"dimension), got {tuple(targets.shape)}"
            )
        if targets.dtype != torch.int64:
            raise ValueError(f"{name}: targets must be int64 word ids, got {targets.dtype}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}"


class SampledSoftmax(FullSoftmax):
    """A softmax head trained with sampled softmax (``tf.nn.sampled_softmax_loss``); see the module doc.

    Same parameters as :class:`FullSoftmax` (``nll``, ``logits`` and ``log_probs`` stay exact);
    ``sampled_nll`` / ``forward`` give the sampled loss. Candidates are drawn on the weight's
    device, with ``generator`` when given, once per call and shared by all rows.

    Args: in_features d, vocab_size V, num_sampled S, bias; ``unique`` (sample without
    replacement, TensorFlow's default); ``remove_accidental_hits`` and ``subtract_log_q`` (both on
    in TensorFlow; switches for testing and ablations). ``sparse_grad`` (attribute, default False):
    the sampled loss gives the weight a sparse gradient of the gathered rows only.
    """

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        num_sampled: int,
        bias: bool = True,
        *,
        unique: bool = True,
        remove_accidental_hits: bool = True,
        subtract_log_q: bool = True,
    ) -> None:
        super().__init__(in_features, vocab_size, bias)
        self.num_sampled = _check_int("num_sampled", num_sampled, 1)
        if unique and self.num_sampled > self.vocab_size:
            raise ValueError(
                f"SampledSoftmax: num_sampled={num_sampled} distinct candidates cannot be drawn from "
                f"vocab_size={vocab_size} ids; use num_sampled <= vocab_size, or the full softmax"
            )
        self.sampler = LogUniformSampler(self.vocab_size, unique=unique)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.subtract_log_q = bool(subtract_log_q)
        #: sparse weight gradients from the sampled loss (see sampled_softmax_nll); set by
        #: LanguageModel.use_sparse_gradients
        self.sparse_grad = False

    def sample(self, generator: torch.Generator | None = None) -> CandidateSample:
        """One batch's candidates, drawn on the weight's device."""
        return self.sampler.sample(self.num_sampled, device=self.weight.device, generator=generator)

    def sampled_nll(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        generator: torch.Generator | None = None,
        candidates: CandidateSample | None = None,
    ) -> Tensor:
        """Sampled-softmax loss: hidden (..., d), targets (...) int64 -> (...).

        ``candidates`` replays a given sample (for tests); otherwise one is drawn for the call.
        """
        self._check(hidden, targets)
        if candidates is None:
            candidates = self.sample(generator)
        flat = targets.reshape(-1)
        true_expected = self.sampler.expected_count(flat, self.num_sampled, candidates.num_tries)
        loss = sampled_softmax_nll(
            hidden.reshape(-1, self.in_features),
            flat,
            self.weight,
            self.bias,
            candidates,
            true_expected,
            remove_accidental_hits=self.remove_accidental_hits,
            subtract_log_q=self.subtract_log_q,
            sparse_grad=self.sparse_grad,
        )
        return loss.view(targets.shape)

    def forward(self, hidden: Tensor, targets: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The sampled per-token loss (see :meth:`sampled_nll`); ``nll`` is the exact one."""
        return self.sampled_nll(hidden, targets, generator=generator)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"num_sampled={self.num_sampled}"]
        if not self.sampler.unique:
            parts.append("unique=False")
        if not self.remove_accidental_hits:
            parts.append("remove_accidental_hits=False")
        if not self.subtract_log_q:
            parts.append("subtract_log_q=False")
        return ", ".join(parts)
