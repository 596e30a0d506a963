"""The exact per-token loss from a logits function, a few rows at a time (no (N, V) logits at once)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: logits formed at once when no gradient is needed (2^22 floats: 16 MiB)
MAX_LOGITS = 1 << 22


def check_targets(name: str, in_features: int, hidden: Tensor, targets: Tensor) -> None:
    """ValueError unless hidden is (..., d) and targets (...) int64 (FullSoftmax's checks)."""
    if hidden.shape[-1:] != (in_features,):
        raise ValueError(f"{name}: hidden must end in in_features={in_features}, got shape {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:-1] or targets.dtype != torch.int64:
        raise ValueError(f"{name}: targets must be int64 of shape {tuple(hidden.shape[:-1])}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")


def chunked_nll(logits: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """-log softmax(logits(hidden))[target] per token: hidden (..., d), targets (...) -> (...).

    With autograd, in one piece (the backward needs the logits anyway); without, in row chunks of
    at most MAX_LOGITS logits, each quantized per token as the whole would be (per-row scales)."""
    rows, flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled():
        return F.cross_entropy(logits(rows), flat, reduction="none").view(targets.shape)
    step = max(1, MAX_LOGITS // vocab_size)
    parts = [F.cross_entropy(logits(rows[i : i + step]), flat[i : i + step], reduction="none")
             for i in range(0, rows.shape[0], step)]
    return torch.cat(parts).view(targets.shape)
