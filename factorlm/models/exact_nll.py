"""The exact full-softmax negative log-likelihood without autograd, in cache-sized tiles.

Evaluation scores every token against the whole vocabulary: for N rows of hidden states (N, d) and
a softmax weight (V, d) the loss of row i is logsumexp_v(h_i · w_v + b_v) - (h_i · w_t + b_t). The
matmul is 2·N·d·V flops; everything else is a few passes over the N·V logits. Formed whole and
then put through ``F.cross_entropy`` (log_softmax, then a gather) those passes run over a matrix
far larger than the caches (1,280 rows × 10,000 words is 51 MB in fp32) and log_softmax writes a
second one, so on a CPU the scoring ran at about half the speed of the matmul alone.

Here the logits are formed one tile at a time, ``block_rows`` rows by ``block_vocab`` words, into
one reused buffer (no allocation per tile, no copy): ``addmm`` writes the tile, the targets that
fall in it are picked out, and the tile's row maxima and ``exp(logit - max)`` sums are taken in
place while it is still in cache. Across the vocabulary blocks of a row block the sums are merged
with the running maximum (the "online" logsumexp: s ← s·exp(m - m') + Σ exp(x - m')), so the
vocabulary can be any size. The result is the same function as log_softmax-then-gather (to
rounding: float64 agrees to ~1e-15); the accumulation is in float32 at least (float64 for float64
inputs), so half-precision logits do not lose the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Logits per tile on a CPU: 2^19 fp32 logits are 2 MiB, about one core's L2 here (a Xeon with
#: 2 MiB L2 per core); the tile and the weight block it reads stay close to the core.
CPU_TILE_LOGITS = 1 << 19
#: Up to this many logits in all, the plain F.cross_entropy is used: they fit in cache whole, and
#: its one call beats the tiles' dozen small ones (1.8x faster at 64 rows x 1,000 words).
SMALL_LOGITS = 1 << 17
#: Rows per tile on a CPU: enough for the matmul to run near its peak (its efficiency falls with
#: fewer rows), few enough to leave most of the tile to the vocabulary.
CPU_BLOCK_ROWS = 256


def tile_shape(rows: int, vocab: int, device: torch.device, max_logits: int) -> tuple[int, int]:
    """(block_rows, block_vocab) for scoring ``rows`` rows against ``vocab`` words on ``device``,
    never forming more than ``max_logits`` logits at once.

    CUDA: whole vocabulary rows (the GPU's memory bandwidth makes the passes cheap; fewer, larger
    kernels matter more), as many rows as ``max_logits`` allows. CPU: tiles of about
    CPU_TILE_LOGITS, CPU_BLOCK_ROWS rows by the rest of the vocabulary (all of it when it fits).
    """
    if max_logits < 1:
        raise ValueError(f"max_logits must be >= 1, got {max_logits!r}")
    if device.type != "cpu":
        block_vocab = min(vocab, max_logits)
        return max(1, min(rows, max_logits // block_vocab)), block_vocab
    tile = min(max_logits, CPU_TILE_LOGITS)
    block_rows = max(1, min(rows, CPU_BLOCK_ROWS, tile))
    block_vocab = max(1, min(vocab, tile // block_rows))
    return block_rows, block_vocab


def full_softmax_nll(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None, *,
                     block_rows: int, block_vocab: int) -> Tensor:
    """-log softmax(hidden · weightᵀ + bias)[target] per row, without autograd.

    hidden (N, d), targets (N,) int64 in [0, V), weight (V, d), bias (V,) or None -> (N,) in
    float64 for float64 inputs, else float32. Logits are formed ``block_rows`` × ``block_vocab``
    at a time (see the module docstring).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    if block_rows < 1 or block_vocab < 1:
        raise ValueError(f"block_rows and block_vocab must be >= 1, got {block_rows!r} and {block_vocab!r}")
    if rows and bool((targets.min() < 0) | (targets.max() >= vocab)):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"targets must be word ids in [0, {vocab}), got {bad}")
    accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(rows, dtype=accumulate, device=hidden.device)
    block_rows, block_vocab = min(block_rows, rows), min(block_vocab, vocab)
    # one flat buffer; each tile is a contiguous view of its front, so addmm writes it in place
    buffer = torch.empty(block_rows * block_vocab, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()
    for r0 in range(0, rows, block_rows):
        h, t = hidden[r0 : r0 + block_rows], targets[r0 : r0 + block_rows]
        n = h.shape[0]
        maximum = total = target_logit = None
        for v0 in range(0, vocab, block_vocab):
            width = min(block_vocab, vocab - v0)
            tile = buffer[: n * width].view(n, width)
            if bias is None:
                torch.mm(h, weight_t[:, v0 : v0 + width], out=tile)
            else:
                torch.addmm(bias[v0 : v0 + width], h, weight_t[:, v0 : v0 + width], out=tile)
            work = tile if tile.dtype == accumulate else tile.to(accumulate)  # half logits: sum in fp32
            if width == vocab:  # the whole vocabulary in one block: a plain gather
                target_logit = work.gather(1, t.unsqueeze(1)).squeeze(1)
            else:
                local = t - v0
                picked = work.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
                inside = (local >= 0) & (local < width)
                target_logit = picked if target_logit is None else torch.where(inside, picked, target_logit)
            block_max = work.amax(dim=1)
            new_max = block_max if maximum is None else torch.maximum(maximum, block_max)
            sums = work.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
            total = sums if total is None else total.mul_((maximum - new_max).exp_()).add_(sums)
            maximum = new_max
        out[r0 : r0 + n] = total.log_().add_(maximum).sub_(target_logit)
    return out
