"""Batches for truncated BPTT: B continuous sentence streams, T steps at a time (time-major).

Training (StreamBatcher), as in the paper's code: each of the B rows is its own stream that starts
with the boundary and appends whole sentences; when a row needs more tokens it takes the NEXT
sentence of one shared iterator (rows are filled in order 0..B-1 within a batch). Batch i holds
tokens i*T .. i*T + T of every row, so row b of batch i+1 continues exactly where row b of batch
i stopped and the recurrent state can be carried over. Example with B = 3, T = 4 and sentences
s1 = "a a a .", s2 = "b .", s3 = "c c c c .", s4 = "d d .", s5 = "e e e .", s6 = "f f f f f .",
s7 = "g .", ... ("." is the boundary id); the inputs of the first three batches:

              batch 0     batch 1     batch 2
    row 0:   . a a a  |  . f f f  |  f f . i        s1, s6, s9
    row 1:   . b . c  |  c c c .  |  g . j j        s2, s3, s7, s10
    row 2:   . d d .  |  e e e .  |  h h . k        s4, s5, s8, s11
             ^ every row starts with the boundary

    inputs[t, b] = row_b[i*T + t],   targets[t, b] = row_b[i*T + t + 1]   (shape (T, B))

Batch i needs tokens up to i*T + T of every row: in batch 0, row 0 takes s1, row 1 takes s2 and
s3, row 2 takes s4 and s5; in batch 1 each row takes one more (s6, s7, s8); and so on.
An epoch ends when the iterator is exhausted before every row can fill a full (T, B) batch: that
last partial batch is dropped (at most B*(T+1) tokens plus the rest of the rows' sentences, a
vanishing share of a real corpus), and the next epoch starts new streams (each row again starts
with the boundary, so the recurrent state should start from zeros).

Evaluation (and Zaremba-style training, ContiguousBatcher): ``split_stream`` gives a whole split as
one 1-D stream, and ``stream_rows`` cuts it into R contiguous rows of equal length that together
score every target exactly once (R = 3: 4, 4 and 2 targets, the last row padded and masked):

    stream:  .  w  w  w  w  .  w  w  w  w  .     (N + 1 = 11 tokens, N = 10 targets)
    row 0:   .  w  w  w  w                       targets: stream[1..4]
    row 1:               w  .  w  w  w           targets: stream[5..8]
    row 2:                           w  w  .  _  targets: stream[9..10], then padding
"""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from factorlm.data.corpus import Corpus
from factorlm.validate import check_int, is_int

__all__ = ["Batch", "ContiguousBatcher", "StreamBatcher", "StreamRows", "split_stream", "stream_rows"]


@dataclass
class Batch:
    """One (T, B) window. mask is False only on padding (training batches have none)."""

    inputs: Tensor  # (T, B) int64, time-major
    targets: Tensor  # (T, B) int64: the next token of each input
    mask: Tensor  # (T, B) bool
    num_tokens: int  # mask.sum(): targets that count


def _check_rank(rank, world_size) -> tuple[int, int]:
    world_size = check_int("world_size", world_size)
    if not is_int(rank, 0) or rank >= world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    return int(rank), world_size


#: Values a checkpoint written before the batchers knew about ranks implies.
_SAVED_DEFAULTS = {"rank": 0, "world_size": 1}


def _check_saved(state: dict, batcher, keys: tuple[str, ...]) -> None:
    """A saved position fits this batcher only with the same sizes (and the same rank layout)."""
    for key in keys:
        saved = state.get(key, _SAVED_DEFAULTS.get(key))
        if saved != getattr(batcher, key):
            raise ValueError(f"cannot resume: the saved position has {key}={saved!r}, "
                             f"this batcher has {getattr(batcher, key)!r}")


class StreamBatcher:
    """Training batches as in the paper: B rows, each a continuous stream of sentences; row b of
    batch i+1 continues exactly where row b of batch i stopped (see the module docstring).

    make_sentences(epoch) returns that epoch's sentence iterator (each sentence a list of ids
    ending with boundary_id), e.g. ``lambda e: corpus.sentences("train", shuffle=True, epoch=e)``.

    Several processes: rank r of world_size gets its own batcher whose make_sentences yields only
    that rank's disjoint share (:meth:`from_corpus` wires this to ``Corpus.sentences``); each
    yields B rows, so the global batch is B·world_size. Shares may differ in length by a few
    sentences, so ranks must agree on when an epoch ends (the Trainer does).

    The position is exact and small: the epoch, how many sentences this epoch has taken from the
    iterator, and each row's pending tokens. ``state_dict()`` after batch i, then
    ``load_state_dict`` and ``epoch_batches(epoch)`` in a new process, yields batch i+1 of an
    uninterrupted run (resuming re-reads and skips the consumed sentences of that epoch).
    Use one ``epoch_batches`` generator at a time: they share this position.
    """

    def __init__(self, make_sentences: Callable[[int], Iterator[list[int]]], batch_size: int, num_steps: int,
                 boundary_id: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.make_sentences = make_sentences
        self.batch_size = check_int("batch_size", batch_size)
        self.num_steps = check_int("num_steps", num_steps)
        self.boundary_id = check_int("boundary_id", boundary_id, 0)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self._start_epoch(0)

    @classmethod
    def from_corpus(cls, corpus: Corpus, split: str, batch_size: int, num_steps: int, *, seed: int = 0,
                    rank: int = 0, world_size: int = 1) -> "StreamBatcher":
        """Batches of ``split``'s sentences, shuffled per epoch by (seed, epoch); this rank's share only."""
        def make_sentences(epoch: int) -> Iterator[list[int]]:
            return corpus.sentences(split, shuffle=True, seed=seed, epoch=epoch, rank=rank, world_size=world_size)

        return cls(make_sentences, batch_size, num_steps, corpus.vocab.boundary_id, rank=rank, world_size=world_size)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sentences_consumed = 0
        self.batches = 0  # batches yielded in this epoch
        self._pending = [[self.boundary_id] for _ in range(self.batch_size)]

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        """The (T, B) batches of ``epoch``, continuing from the saved position when it is in this epoch.

        When the epoch's data runs out, the position moves to the start of epoch + 1.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        if epoch != self.epoch:
            self._start_epoch(epoch)
        fresh = self.sentences_consumed == 0 and self.batches == 0
        sentences = iter(self.make_sentences(epoch))
        skip = self.sentences_consumed
        if skip and sum(1 for _ in itertools.islice(sentences, skip)) < skip:
            raise ValueError(f"cannot resume epoch {epoch}: the saved position has consumed {skip} sentences but "
                             f"the epoch now has fewer (did the data or the shuffling seed change?)")
        T, B, boundary = self.num_steps, self.batch_size, self.boundary_id
        while True:
            rows = []
            for buffer in self._pending:
                while len(buffer) <= T:
                    sentence = next(sentences, None)
                    if sentence is None:
                        if fresh and self.batches == 0:
                            raise ValueError(
                                f"epoch {epoch} has {self.sentences_consumed} sentences, too few to fill one batch "
                                f"of {B} rows x {T + 1} tokens; use a smaller batch_size or num_steps")
                        self._start_epoch(epoch + 1)  # the partial batch is dropped
                        return
                    if not sentence or sentence[-1] != boundary:
                        raise ValueError(f"sentence {self.sentences_consumed} of epoch {epoch} does not end with the "
                                         f"boundary id {boundary}: {list(sentence[-5:])!r}")
                    buffer.extend(sentence)
                    self.sentences_consumed += 1
                rows.append(buffer[: T + 1])
                del buffer[:T]  # the last target is the next batch's first input
            window = torch.tensor(rows, dtype=torch.int64).t().contiguous()  # (T + 1, B)
            self.batches += 1
            yield Batch(window[:-1], window[1:], torch.ones(T, B, dtype=torch.bool), T * B)

    def state_dict(self) -> dict:
        """The exact position (plain ints and lists, safe for torch.load(weights_only=True))."""
        return {
            "epoch": self.epoch,
            "sentences_consumed": self.sentences_consumed,
            "batches": self.batches,
            "pending": [list(b) for b in self._pending],
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "boundary_id": self.boundary_id,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_saved(state, self, ("batch_size", "num_steps", "boundary_id", "rank", "world_size"))
        pending = [[int(t) for t in row] for row in state["pending"]]
        if len(pending) != self.batch_size or not all(pending):
            raise ValueError(f"cannot resume: the saved position needs {self.batch_size} non-empty rows, "
                             f"got {len(pending)}")
        self.epoch = int(state["epoch"])
        self.sentences_consumed = int(state["sentences_consumed"])
        self.batches = int(state["batches"])
        self._pending = pending


@dataclass
class StreamRows:
    """A 1-D token stream laid out as R contiguous rows of equal length (the last may be shorter).

    inputs/targets (L, R): row r holds targets stream[r*L + 1 .. r*L + L]; mask (L, R) is False on
    the padding that fills the last row; num_targets = N (each target exactly once).
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    num_targets: int


def stream_rows(stream: Tensor, num_rows: int) -> StreamRows:
    """Cut a stream of N + 1 tokens (boundary first, N targets) into min(num_rows, N) contiguous rows.

    Every row but the last has L = ceil(N / R) targets, so rows run in lock step and each row's final
    state is reached at the same time step (exact evaluation relies on that). Row r continues where
    row r - 1 ends: its first input is row r - 1's last target.
    """
    if not isinstance(stream, Tensor) or stream.dim() != 1 or stream.numel() < 2:
        shape = tuple(stream.shape) if isinstance(stream, Tensor) else type(stream).__name__
        raise ValueError(f"stream must be a 1-D tensor of at least 2 tokens, got {shape}")
    num_rows = check_int("num_rows", num_rows)
    targets = stream.numel() - 1
    length = -(-targets // min(num_rows, targets))  # ceil
    rows = -(-targets // length)
    padded = torch.zeros(rows * length + 1, dtype=stream.dtype)
    padded[: stream.numel()] = stream
    positions = torch.arange(length).unsqueeze(1) + length * torch.arange(rows).unsqueeze(0)  # (L, R)
    return StreamRows(padded[positions], padded[positions + 1], positions < targets, targets)


class ContiguousBatcher:
    """Training batches in Zaremba et al.'s layout (pytorch/examples' ``batchify``): the split's
    token stream, in corpus order, cut into B contiguous rows; batch i is time steps i*T .. i*T + T
    of every row (the last batch may be shorter). Same interface as StreamBatcher.

    PTB recipes use this: PTB's sentences follow article order, and its published perplexities were
    trained on that order, not on shuffled sentences.

    Several processes: the stream is cut into B·world_size rows and rank r takes rows
    r·B .. r·B + B - 1, so the ranks' batches side by side are exactly one process's batch of
    B·world_size rows (and every rank has the same number of batches per epoch).
    """

    def __init__(self, make_stream: Callable[[], Tensor], batch_size: int, num_steps: int, *,
                 rank: int = 0, world_size: int = 1) -> None:
        self.make_stream = make_stream
        self.batch_size = check_int("batch_size", batch_size)
        self.num_steps = check_int("num_steps", num_steps)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.epoch = 0
        self.batches = 0  # batches already yielded in this epoch
        self._rows: StreamRows | None = None

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0
        if self._rows is None:
            self._rows = self._rank_rows(self.make_stream())
        rows, T = self._rows, self.num_steps
        length = rows.inputs.shape[0]
        while self.batches * T < length:
            t0 = self.batches * T
            window = slice(t0, min(t0 + T, length))
            self.batches += 1
            mask = rows.mask[window]
            yield Batch(rows.inputs[window], rows.targets[window], mask, int(mask.sum()))
        self.epoch, self.batches = epoch + 1, 0

    def _rank_rows(self, stream: Tensor) -> StreamRows:
        """This rank's B columns of the stream cut into B·world_size rows."""
        total = self.batch_size * self.world_size
        rows = stream_rows(stream, total)
        if self.world_size == 1:
            return rows
        if rows.inputs.shape[1] < total:
            raise ValueError(
                f"the training stream has {rows.num_targets:,} targets, too few for batch_size {self.batch_size} x "
                f"world_size {self.world_size} = {total} rows; use a smaller batch_size or fewer processes")
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        mask = rows.mask[:, mine]
        return StreamRows(rows.inputs[:, mine], rows.targets[:, mine], mask, int(mask.sum()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "batch_size": self.batch_size,
                "num_steps": self.num_steps, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        _check_saved(state, self, ("batch_size", "num_steps", "rank", "world_size"))
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def split_stream(corpus: Corpus, split: str) -> Tensor:
    """The whole ``split`` as one 1-D int64 stream: the boundary id, then every sentence in order."""
    tokens = array("q", [corpus.vocab.boundary_id])
    for sentence in corpus.sentences(split):
        tokens.extend(sentence)
    return torch.from_numpy(np.frombuffer(tokens, dtype=np.int64).copy())
