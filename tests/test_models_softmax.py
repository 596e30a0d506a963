"""Softmax heads: the full softmax, and sampled softmax with TensorFlow's semantics.

References are written here independently (Python loops over math.log / math.exp) from the
formulas of tf.nn.log_uniform_candidate_sampler and tf.nn.sampled_softmax_loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from factorlm.models import CandidateSample, FullSoftmax, LogUniformSampler, SampledSoftmax
from factorlm.models.exact_nll import CPU_BLOCK_ROWS, CPU_TILE_LOGITS, full_softmax_nll, tile_shape

TOL = dict(rtol=1e-10, atol=1e-12)


def p_log_uniform(k: int, V: int) -> float:
    return (math.log(k + 2) - math.log(k + 1)) / math.log(V + 1)


def q_expected(k: int, V: int, num_sampled: int, num_tries: int) -> float:
    """TensorFlow's expected count (range_sampler.cc): S·P without rejections, else 1 - (1 - P)^tries."""
    p = p_log_uniform(k, V)
    return num_sampled * p if num_tries == num_sampled else 1.0 - (1.0 - p) ** num_tries


def reference_sampled_nll(h, y, weight, bias, ids, V, num_sampled, num_tries, *, remove=True, log_q=True):
    """tf.nn.sampled_softmax_loss for one batch, row by row."""
    losses = []
    for i in range(h.shape[0]):
        def logit(k):
            z = sum(h[i, j].item() * weight[k, j].item() for j in range(h.shape[1])) + bias[k].item()
            return z - math.log(q_expected(k, V, num_sampled, num_tries)) if log_q else z

        true = logit(int(y[i]))
        negatives = [logit(int(k)) for k in ids if not (remove and int(k) == int(y[i]))]
        top = max([true, *negatives])
        lse = top + math.log(sum(math.exp(v - top) for v in [true, *negatives]))
        losses.append(lse - true)
    return torch.tensor(losses, dtype=torch.float64)


def make_head(V=8, d=3, S=4, seed=0, **kw) -> SampledSoftmax:
    head = SampledSoftmax(d, V, S, **kw).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=gen, dtype=torch.float64) * 0.7)
        head.bias.copy_(torch.randn(V, generator=gen, dtype=torch.float64) * 0.3)
    return head


# ------------------------------------------------------------------ sampler
def test_log_uniform_probabilities_formula_and_normalisation():
    V = 37
    sampler = LogUniformSampler(V)
    p = sampler.probability(torch.arange(V))
    torch.testing.assert_close(p, torch.tensor([p_log_uniform(k, V) for k in range(V)], dtype=torch.float64), **TOL)
    assert abs(p.sum().item() - 1.0) < 1e-12
    assert torch.all(p[1:] < p[:-1])  # frequency-sorted ids: id 0 is the most likely


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()  # chi2 survival


def test_sampler_frequencies_match_p_chi_square():
    V, draws = 25, 200_000
    sampler = LogUniformSampler(V, unique=False)
    sample = sampler.sample(draws, generator=torch.Generator().manual_seed(11))
    assert sample.num_tries == draws and sample.ids.dtype == torch.int64
    counts = torch.bincount(sample.ids, minlength=V).double()
    probs = sampler.probability(torch.arange(V))
    assert _chi_square_p_value(counts, probs) > 1e-3
    # the test has power: the same counts are rejected against a uniform law
    assert _chi_square_p_value(counts, torch.full((V,), 1.0 / V, dtype=torch.float64)) < 1e-9


def test_with_replacement_expected_count_is_the_mean_count():
    """unique=False: Q(k) = S·P(k) is exactly the expected number of times k is drawn in S draws."""
    V, S, runs = 12, 5, 4000
    sampler = LogUniformSampler(V, unique=False)
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(runs):
        sample = sampler.sample(S, generator=gen)
        counts += torch.bincount(sample.ids, minlength=V)
        torch.testing.assert_close(sample.expected_counts, S * sampler.probability(sample.ids), **TOL)
    q = S * sampler.probability(torch.arange(V))
    standard_error = (q / runs).sqrt()  # counts are ~ Poisson-binomial with variance <= mean
    assert torch.all((counts / runs - q).abs() < 4.5 * standard_error)


def test_expected_count_formula():
    V = 100
    sampler = LogUniformSampler(V)
    ids = torch.tensor([0, 1, 7, 42, 99])
    for num_sampled, num_tries in [(10, 10), (10, 17), (3, 250)]:
        got = sampler.expected_count(ids, num_sampled, num_tries)
        want = [q_expected(int(k), V, num_sampled, num_tries) for k in ids]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **TOL)


def test_unique_sampling_is_a_rejection_loop_over_the_draw_stream(monkeypatch):
    """Vectorised unique sampling equals a draw-by-draw loop over the same stream, across blocks."""
    V, S = 50, 6
    stream = torch.tensor([3, 3, 0, 0, 0, 1, 0, 3, 1, 0, 0, 1, 1, 3, 0, 0] * 20 + [9, 3, 2, 9, 4, 7, 8, 5])
    sampler = LogUniformSampler(V)
    position = [0]

    def fake_draw(count, device, generator):
        block = stream[position[0] : position[0] + count]
        position[0] += count
        return block.clone()

    monkeypatch.setattr(sampler, "_draw", fake_draw)
    sample = sampler.sample(S)
    seen, tries = [], 0
    for k in stream.tolist():
        tries += 1
        if k not in seen:
            seen.append(k)
        if len(seen) == S:
            break
    assert sample.ids.tolist() == seen == [3, 0, 1, 9, 2, 4]
    assert sample.num_tries == tries == 325
    assert position[0] > 2 * S + 64  # the first block fell short: later blocks were drawn
    want = [q_expected(k, V, S, tries) for k in seen]
    torch.testing.assert_close(sample.expected_counts, torch.tensor(want, dtype=torch.float64), **TOL)


def test_unique_sampling_returns_distinct_ids_and_is_seeded():
    sampler = LogUniformSampler(1000)
    a = sampler.sample(300, generator=torch.Generator().manual_seed(5))
    b = sampler.sample(300, generator=torch.Generator().manual_seed(5))
    c = sampler.sample(300, generator=torch.Generator().manual_seed(6))
    assert a.ids.numel() == 300 and a.ids.unique().numel() == 300
    assert 0 <= a.ids.min() and a.ids.max() < 1000 and a.num_tries > 300
    assert torch.equal(a.ids, b.ids) and a.num_tries == b.num_tries
    assert not torch.equal(a.ids, c.ids)


# ------------------------------------------------------------ sampled loss
def test_all_classes_sampled_and_tf_reference():
    """(a) num_sampled = V with unique sampling draws every class; the loss is TensorFlow's formula."""
    V, S = 6, 6
    head = make_head(V=V, S=S)
    sample = head.sample(torch.Generator().manual_seed(1))
    assert sorted(sample.ids.tolist()) == list(range(V))
    h = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 5, 2, 2, 4])
    got = head.sampled_nll(h, y, candidates=sample)
    want = reference_sampled_nll(h, y, head.weight, head.bias, sample.ids, V, S, sample.num_tries)
    torch.testing.assert_close(got, want, **TOL)
    # every candidate set is then {target} + all other classes: without the log-Q correction the
    # sampled loss is exactly the full softmax loss
    head.subtract_log_q = False
    torch.testing.assert_close(head.sampled_nll(h, y, candidates=sample), head.nll(h, y), **TOL)


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("remove, log_q", [(True, True), (False, True), (True, False), (False, False)])
def test_sampled_loss_matches_tf_reference(unique, remove, log_q):
    V, S = 30, 7
    head = make_head(V=V, S=S, unique=unique, remove_accidental_hits=remove, subtract_log_q=log_q)
    sample = head.sample(torch.Generator().manual_seed(4))
    h = torch.randn(4, 3, 3, dtype=torch.float64)  # (T, B, d)
    y = torch.stack([sample.ids[:3], torch.tensor([0, 29, 11]), sample.ids[2:5], sample.ids[4:7]])  # with hits
    got = head.sampled_nll(h, y, candidates=sample)
    assert got.shape == (4, 3)
    want = reference_sampled_nll(h.reshape(-1, 3), y.reshape(-1), head.weight, head.bias, sample.ids.tolist(),
                                 V, S, sample.num_tries, remove=remove, log_q=log_q)
    torch.testing.assert_close(got.reshape(-1), want, **TOL)


def test_accidental_hits_are_removed_for_that_row_only():
    """(d) a candidate equal to a row's target is not a negative for that row, and only that row."""
    V = 10
    head = make_head(V=V, S=3)
    sample = CandidateSample(torch.tensor([2, 5, 7]), torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64), 3)
    h = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([5, 1])  # row 0 hits candidate 5
    loss = head.sampled_nll(h, y, candidates=sample)
    w, b = head.weight, head.bias
    t0 = h[0] @ w[5] + b[5] - math.log(head.sampler.expected_count(torch.tensor(5), 3, 3))
    neg0 = [h[0] @ w[k] + b[k] - math.log(q) for k, q in ((2, 0.5), (7, 0.125))]  # 5 left out
    want0 = torch.logsumexp(torch.stack([t0, *neg0]), 0) - t0
    torch.testing.assert_close(loss[0], want0, **TOL)
    # row 1 keeps all three candidates
    t1 = h[1] @ w[1] + b[1] - math.log(head.sampler.expected_count(torch.tensor(1), 3, 3))
    neg1 = [h[1] @ w[k] + b[k] - math.log(q) for k, q in ((2, 0.5), (5, 0.25), (7, 0.125))]
    torch.testing.assert_close(loss[1], torch.logsumexp(torch.stack([t1, *neg1]), 0) - t1, **TOL)
    # row 0's loss depends on w[5] only through its true logit: dL/dw5 = (p_true - 1)·h0
    (g5,) = torch.autograd.grad(loss[0], w)
    p_true = torch.softmax(torch.stack([t0, *neg0]), 0)[0]
    torch.testing.assert_close(g5[5], (p_true - 1) * h[0], **TOL)
    # without the removal the hit also counts as a negative: a different loss
    head.remove_accidental_hits = False
    assert not torch.allclose(head.sampled_nll(h, y, candidates=sample)[0], loss[0])


def test_gradients_reach_only_true_and_sampled_rows():
    """(e) the softmax weight and bias get gradient on the target and candidate rows, nowhere else."""
    V = 40
    head = make_head(V=V, S=6)
    sample = head.sample(torch.Generator().manual_seed(2))
    h = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([33, 1, 33, 20, 8])
    head.sampled_nll(h, y, candidates=sample).sum().backward()
    touched = set(y.tolist()) | set(sample.ids.tolist())
    assert set(head.weight.grad.abs().sum(1).nonzero().flatten().tolist()) == touched
    assert set(head.bias.grad.nonzero().flatten().tolist()) == touched


def test_sampled_loss_never_forms_full_logits(monkeypatch):
    head = make_head(V=1000, S=20)

    def forbidden(*args):
        raise AssertionError("the sampled loss computed the full logits")

    monkeypatch.setattr(head, "logits", forbidden)
    loss = head.sampled_nll(torch.randn(3, 2, 3, dtype=torch.float64), torch.randint(0, 1000, (3, 2)))
    assert loss.shape == (3, 2) and torch.isfinite(loss).all()


def _mean_gradient(head, h, y, draws, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.stack([torch.autograd.grad(head.sampled_nll(h, y, generator=gen).sum(), head.weight)[0]
                         for _ in range(draws)])
    return grads.mean(0), grads.std(0) / math.sqrt(draws)


def test_sampled_gradient_approaches_the_full_softmax_gradient():
    """(b) averaged over draws, the sampled gradient approaches the full-softmax gradient.

    Sampled softmax is a self-normalised importance-sampling estimate of the full softmax: it is
    biased for few candidates, and with unique sampling its expected gradient converges to the full
    one as the candidate set grows toward the vocabulary (every Q -> 1, every class a candidate).
    The log-Q correction is what removes most of the bias on the way. Checked on the whole weight
    and on the true-class rows, with the Monte-Carlo standard error of the average as the yardstick.
    """
    V, d, draws = 50, 4, 600
    h = torch.randn(4, d, dtype=torch.float64)
    y = torch.tensor([0, 7, 7, 41])  # frequent and rare targets, one repeated
    errors = {}
    for S in (10, 40):
        for log_q in (True, False):
            head = make_head(V=V, d=d, S=S, seed=3, subtract_log_q=log_q)
            (full,) = torch.autograd.grad(head.nll(h, y).sum(), head.weight)
            mean, se = _mean_gradient(head, h, y, draws, seed=9)
            rows = y.unique()
            errors[S, log_q] = (
                ((mean - full).norm() / full.norm()).item(),
                ((mean[rows] - full[rows]).norm() / full[rows].norm()).item(),
                (se.norm() / full.norm()).item(),
            )
    whole, true_rows, noise = errors[40, True]
    assert whole < 3 * noise + 0.01 and true_rows < 3 * noise + 0.01  # close to the full gradient
    assert errors[10, True][0] > 4 * whole  # the bias shrinks as the candidate set grows
    assert errors[40, False][0] > 2 * whole  # and the log-Q correction is what makes it small
    assert errors[10, False][0] > errors[10, True][0]


def test_generator_makes_sampled_loss_reproducible_and_sampling_follows_the_weights_device():
    head = make_head(V=200, S=10)
    h, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 200, (4,))
    a = head(h, y, generator=torch.Generator().manual_seed(0))
    b = head(h, y, generator=torch.Generator().manual_seed(0))
    c = head(h, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert head.sample().ids.device == head.weight.device


def test_half_precision_inputs_get_an_fp32_sampled_loss():
    """bf16 hidden states and weights (autocast, or a bf16 model): log Q and the softmax run in fp32."""
    head = make_head(V=500, d=8, S=40)
    h, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 500, (6,))
    sample = head.sample(torch.Generator().manual_seed(0))
    exact = head.to(torch.bfloat16).double().sampled_nll(h.bfloat16().double(), y, candidates=sample)
    half = head.to(torch.bfloat16).sampled_nll(h.bfloat16(), y, candidates=sample)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), exact, rtol=0.02, atol=0.02)


# --------------------------------------------------------------- full head
def test_full_softmax_nll_and_log_probs_match_log_softmax():
    head = FullSoftmax(3, 11).double()
    with torch.no_grad():
        head.bias.normal_()
    h = torch.randn(4, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 11, (4, 2))
    logits = h @ head.weight.t() + head.bias
    want = -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(head.nll(h, y), want, **TOL)
    torch.testing.assert_close(head(h, y), want, **TOL)
    torch.testing.assert_close(head.log_probs(h), torch.log_softmax(logits, -1), **TOL)


def test_full_softmax_chunks_rows_without_autograd():
    head = FullSoftmax(3, 11).double()
    head.max_logits = 11 * 3  # three rows at a time
    h, y = torch.randn(7, 2, 3, dtype=torch.float64), torch.randint(0, 11, (7, 2))
    with_grad = head.nll(h, y)
    with torch.no_grad():
        chunked = head.nll(h, y)
    torch.testing.assert_close(chunked, with_grad.detach(), **TOL)


def test_no_bias_and_repr():
    head = SampledSoftmax(4, 20, 5, bias=False, unique=False)
    assert head.bias is None
    assert head(torch.randn(3, 4), torch.tensor([1, 2, 3])).shape == (3,)
    assert repr(head) == "SampledSoftmax(in_features=4, vocab_size=20, bias=False, num_sampled=5, unique=False)"


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SampledSoftmax(4, 10, 11), "num_sampled=11 distinct candidates cannot be drawn from vocab_size=10"),
        (lambda: SampledSoftmax(4, 10, 0), "num_sampled must be an integer >= 1, got 0"),
        (lambda: FullSoftmax(0, 10), "in_features must be an integer >= 1, got 0"),
        (lambda: LogUniformSampler(5).sample(6), "unique sampling needs num_sampled <= vocab_size"),
    ],
)
def test_construction_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_input_errors():
    head = SampledSoftmax(4, 10, 3)
    with pytest.raises(ValueError, match=r"hidden must end in in_features=4, got shape \(2, 5\)"):
        head.nll(torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\).*got \(3,\)"):
        head(torch.randn(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="targets must be int64 word ids, got torch.float32"):
        head(torch.randn(2, 4), torch.tensor([1.0, 2.0]))


# ------------------------------------------------------- tiled exact scoring
def _log_softmax_nll(h, y, weight, bias):
    logits = h @ weight.t() + (0 if bias is None else bias)
    return -torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("block_rows,block_vocab", [(1, 97), (7, 13), (64, 1000), (5, 5003), (500, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tiled_nll_equals_log_softmax_in_float64(block_rows, block_vocab, with_bias):
    """Every tiling (blocks that do not divide N or V, one row per block, the whole vocabulary)
    gives log_softmax-then-gather's value to 1e-10: the online logsumexp merges the blocks exactly."""
    g = torch.Generator().manual_seed(11)
    V, d, N = 5003, 16, 150
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    bias = 3 * torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None
    h = 2 * torch.randn(N, d, generator=g, dtype=torch.float64)  # logits up to ~±30: the shift matters
    y = torch.randint(0, V, (N,), generator=g)
    y[:3] = torch.tensor([0, V - 1, block_vocab % V])  # first, last and a block's first word
    got = full_softmax_nll(h, y, weight, bias, block_rows=block_rows, block_vocab=block_vocab)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _log_softmax_nll(h, y, weight, bias), rtol=1e-10, atol=1e-10)


def test_full_softmax_nll_without_autograd_uses_tiles_and_keeps_the_scores():
    head = FullSoftmax(8, 2_001).double()
    with torch.no_grad():
        head.bias.normal_()
    h, y = torch.randn(30, 4, 8, dtype=torch.float64), torch.randint(0, 2_001, (30, 4))
    want = _log_softmax_nll(h, y, head.weight, head.bias)
    for max_logits in (1 << 26, 1_000, 300):  # one tile; 120 rows x 8 words; 120 rows x 2 words
        head.max_logits = max_logits
        with torch.no_grad():
            torch.testing.assert_close(head.nll(h, y), want, rtol=1e-10, atol=1e-10)
    with_grad = head.nll(h, y)  # autograd: the plain cross entropy, the same values
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), want, rtol=1e-10, atol=1e-10)


def test_tile_shape_fits_the_cache_on_cpu_and_max_logits_everywhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    assert tile_shape(1280, 10_000, cpu, 1 << 26) == (CPU_BLOCK_ROWS, CPU_TILE_LOGITS // CPU_BLOCK_ROWS)
    assert tile_shape(1280, 1_000, cpu, 1 << 26) == (CPU_BLOCK_ROWS, 1_000)  # the whole vocabulary fits
    assert tile_shape(3, 793_470, cpu, 1 << 26) == (3, CPU_TILE_LOGITS // 3)
    assert tile_shape(1280, 10_000, cuda, 1 << 26) == (1280, 10_000)  # whole rows, as many as allowed
    assert tile_shape(1280, 793_470, cuda, 1 << 26) == ((1 << 26) // 793_470, 793_470)
    assert tile_shape(1280, 793_470, cuda, 1000) == (1, 1000)
    for device in (cpu, cuda):
        for rows, vocab, limit in ((1, 1, 1), (1280, 10_000, 4096), (17, 793_470, 1 << 26)):
            block_rows, block_vocab = tile_shape(rows, vocab, device, limit)
            assert 1 <= block_rows <= rows and 1 <= block_vocab <= vocab and block_rows * block_vocab <= limit
    with pytest.raises(ValueError, match="max_logits must be >= 1, got 0"):
        tile_shape(4, 4, cpu, 0)


def test_tiled_nll_sums_half_precision_logits_in_float32_and_rejects_bad_targets():
    g = torch.Generator().manual_seed(12)
    weight, h = torch.randn(3_000, 16, generator=g), torch.randn(40, 16, generator=g)
    y = torch.randint(0, 3_000, (40,), generator=g)
    exact = _log_softmax_nll(h.bfloat16().double(), y, weight.bfloat16().double(), None)
    half = full_softmax_nll(h.bfloat16(), y, weight.bfloat16(), None, block_rows=16, block_vocab=500)
    assert half.dtype == torch.float32
    # the logits are rounded to bf16 (steps of 1/32 near 4): the loss is within that, the sum is not
    torch.testing.assert_close(half.double(), exact, rtol=0, atol=0.05)
    for bad in (3_000, -1):
        y[5] = bad
        with pytest.raises(ValueError, match=rf"targets must be word ids in \[0, 3000\), got {bad}"):
            full_softmax_nll(h, y, weight, None, block_rows=16, block_vocab=500)
