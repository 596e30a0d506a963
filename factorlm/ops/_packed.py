"""The row layout every fast-path time loop runs on, and the index maps a packed batch needs.

A ``torch.nn.utils.rnn.PackedSequence`` stores its sequences sorted by length, longest first, and
time-major: the rows of step t are the first ``batch_sizes[t]`` sequences, contiguous, after all
rows of the earlier steps (N = Σ batch_sizes rows in all). A (T, B, ·) tensor is the same layout
with every batch size equal to B. The time loops (factorlm.ops._scan_torch, csrc/scan.cpp) run on
this layout with a shrinking batch, as cuDNN does: step t reads h_{t-1} and c_{t-1} from the first
``batch_sizes[t]`` rows of step t-1 and writes its own rows; a sequence that has ended is simply no
longer in the batch. Why this and not masked steps over a padded batch: no work is done for padding
(masking still computes every padded row and throws it away), the per-step GEMMs just get smaller,
the gate loops stay branch-free, and a padded batch runs exactly the code it ran before.

Each sequence's final state sits in the row of its own last step; ``last_step_rows`` finds it. The
weight gradient of the recurrent matrix pairs each row with the row holding its h_{t-1}
(``previous_step_rows``). The reverse direction of a bidirectional layer runs each sequence
backwards from its own last step: ``reversed_rows`` is that permutation of the rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def as_batch_sizes(batch_sizes: Tensor | Sequence[int], rows: int, batch: int) -> tuple[int, ...]:
    """``batch_sizes`` (a PackedSequence's CPU int64 tensor, or ints) as a tuple of ints, checked:
    1-D, non-empty, positive, non-increasing, starting at ``batch`` (h0's rows) and summing to
    ``rows`` (the packed data's rows). ValueError naming what is wrong otherwise."""
    if isinstance(batch_sizes, Tensor):
        if batch_sizes.dim() != 1 or batch_sizes.dtype.is_floating_point:
            raise ValueError(f"batch_sizes must be a 1-D integer tensor, got {batch_sizes.dtype} of shape "
                             f"{tuple(batch_sizes.shape)}")
        batch_sizes = batch_sizes.tolist()
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"batch_sizes must be positive and non-increasing (a PackedSequence's), got {list(sizes)}")
    if sizes[0] != batch or sum(sizes) != rows:
        raise ValueError(f"batch_sizes {list(sizes)} describe {sizes[0]} sequences in {sum(sizes)} rows, but h0 "
                         f"has {batch} rows and the packed input {rows}")
    return sizes


def is_uniform(batch_sizes: tuple[int, ...]) -> bool:
    """True when every step has the whole batch (a padded (T, B, ·) tensor): the index maps below are
    then plain slices, and the callers use slices."""
    return batch_sizes[-1] == batch_sizes[0]


def _grid(batch_sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The batch as a (T, B) grid of (step, sequence) cells, on the CPU: (first row of each step
    (T,), length of each sequence (B,), which cells hold a row (T, B) bool). The rows are the true
    cells in row-major order, so boolean indexing of a (T, B) tensor lists something per row."""
    sizes = torch.tensor(batch_sizes, dtype=torch.int64)
    starts = sizes.cumsum(0) - sizes
    present = torch.arange(batch_sizes[0])[None, :] < sizes[:, None]
    return starts, present.sum(0), present


def last_step_rows(batch_sizes: tuple[int, ...], device) -> Tensor:
    """(B,) the row of each sequence's last step: where its final h and c are."""
    starts, lengths, _ = _grid(batch_sizes)
    return (starts[lengths - 1] + torch.arange(batch_sizes[0])).to(device)


def previous_step_rows(batch_sizes: tuple[int, ...], device) -> Tensor:
    """(N - B,) for every row of steps 1 … T-1 in order, the row of step t-1 holding its h_{t-1}."""
    starts, _, present = _grid(batch_sizes)
    same_sequence_before = starts[:-1, None] + torch.arange(batch_sizes[0])  # (T-1, B)
    return same_sequence_before[present[1:]].to(device)


def reversed_rows(batch_sizes: tuple[int, ...], device) -> Tensor:
    """(N,) the permutation that reverses every sequence within its own length: row (t, b) of the
    result is row (length_b - 1 - t, b) of the input. It is its own inverse."""
    starts, lengths, present = _grid(batch_sizes)
    mirror = (lengths[None, :] - 1 - torch.arange(len(batch_sizes))[:, None]).clamp(min=0)  # (T, B); used where present
    return (starts[mirror] + torch.arange(batch_sizes[0]))[present].to(device)
