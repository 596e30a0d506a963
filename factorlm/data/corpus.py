"""Corpora: train/valid/test splits of sentences over one vocabulary, streamed shard by shard.

Every sentence comes out as a list of ids ending with the boundary id (``w1 ... wn <S>``); the
token stream of a split is one boundary id followed by all its sentences, so every word and every
sentence end is a prediction target exactly once (the paper's ``<S> w1 ... wn <S>``, where one
sentence's closing <S> opens the next). A split's token count is the sum of its sentence lengths.

Layouts ``open_corpus`` (factorlm.data.sources) recognises in a directory (looked for in this order):

    lm1b      training-monolingual.tokenized.shuffled/news.en-NNNNN-of-00100   train: every shard found
              heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050   valid
              heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050   test (the benchmark's
              test set, as in the paper's code); the other 48 heldout shards are not used.
              Vocabulary: ``1b_word_vocab.txt`` in the directory (the paper's file), boundary "<S>",
              unknown "<UNK>". Blank lines are skipped.
    ptb       ptb.train.txt, ptb.valid.txt, ptb.test.txt
    wikitext  wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens
    text      train.txt, valid.txt, test.txt
              The plain-text layouts: one sentence per line, boundary "<eos>", unknown "<unk>" (PTB and
              WikiText already contain <unk>). EVERY line is a sentence, as in the usual WikiText/PTB
              word-LM setup (pytorch/examples' ``line.split() + ['<eos>']``): WikiText's blank lines
              become a lone <eos> and its `` = Heading = `` lines stay, which gives the published
              token counts (WikiText-2 train: 2,088,628).

Without a vocabulary file, the vocabulary is built from the train split. Words are split on
whitespace (``str.split()``); files must be UTF-8.

Streaming: a file is read in line-aligned chunks of at most ``chunk_bytes`` (64 MiB; one 1B Word
shard is ~40 MB, so one chunk). A chunk is the unit of shuffling: ``shuffle=True`` permutes the
chunk order and the lines within each chunk, from (seed, epoch) only, like the paper's code
(which shuffled the shard files and the lines of each shard every pass), without ever holding
more than one chunk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from factorlm.data.vocab import Vocabulary
from factorlm.progress import Progress
from factorlm.validate import check_int

__all__ = ["Corpus", "TextCorpus", "SPLITS", "DEFAULT_CHUNK_BYTES"]

SPLITS = ("train", "valid", "test")
DEFAULT_CHUNK_BYTES = 64 << 20

LM1B_TRAIN_DIR = "training-monolingual.tokenized.shuffled"
LM1B_HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
LM1B_TRAIN_GLOB = "news.en-[0-9][0-9][0-9][0-9][0-9]-of-00100"
LM1B_VALID = "news.en.heldout-00001-of-00050"
LM1B_TEST = "news.en.heldout-00000-of-00050"
LM1B_VOCAB = "1b_word_vocab.txt"

#: layout name -> (train, valid, test) file names, for the one-sentence-per-line text layouts
PLAIN_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "ptb": ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    "wikitext": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    "text": ("train.txt", "valid.txt", "test.txt"),
}


class Corpus:
    """Named splits of sentences over one vocabulary (base class; see TextCorpus and the built-in
    corpus in factorlm.data.synthetic).

    A subclass says how a split is cut into shards (``_num_shards``), what one shard holds
    (``_load_shard``: a sequence of items, small enough to hold in memory) and how an item becomes
    a sentence (``_encode``) and how many tokens it has (``_item_tokens``).
    """

    layout = "corpus"
    #: the directory it was read from (None for the built-in corpus), stored in checkpoints
    path: str | None = None
    #: the exact best possible mean loss (nats/token) per split; only the built-in corpus knows it
    optimal_loss: dict[str, float] | None = None

    def __init__(self, name: str, vocab: Vocabulary, splits: Sequence[str] = SPLITS) -> None:
        self.name = name
        self.vocab = vocab
        self.splits = tuple(splits)
        self._counts: dict[str, tuple[int, int]] = {}
        # splits read to the end without an error (a subclass may have read some before this runs)
        self._readable: set[str] = vars(self).get("_readable", set())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, layout={self.layout!r}, splits={self.splits}, "
                f"vocab={len(self.vocab)} words)")

    def sentences(self, split: str, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[list[int]]:
        """Stream the sentences of ``split``, each a list of ids ending with the boundary id.

        shuffle: permute the shards and the sentences within each shard, determined by
        (seed, epoch) alone. rank/world_size: yield only the sentences whose position in this
        epoch's order is rank modulo world_size, so the ranks' shares are disjoint and together
        are the whole split (every rank reads all shards; it encodes only its own sentences).
        """
        self._check_split(split)
        seed = check_int("seed", seed, 0)
        epoch = check_int("epoch", epoch, 0)
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return self._stream(split, bool(shuffle), seed, epoch, rank, world_size)

    def _stream(self, split, shuffle, seed, epoch, rank, world_size) -> Iterator[list[int]]:
        num_shards = self._num_shards(split)
        # Distinct SeedSequence entropy for the shard order ([.., 0]) and each shard ([.., 1, i]).
        order = np.random.default_rng([seed, epoch, 0]).permutation(num_shards) if shuffle else range(num_shards)
        position = 0  # index, in this epoch's order, of the shard's first sentence
        for shard in order:
            items = self._load_shard(split, int(shard))
            if shuffle:
                picks = np.random.default_rng([seed, epoch, 1, int(shard)]).permutation(len(items))
            else:
                picks = range(len(items))
            if world_size > 1:
                picks = picks[(rank - position) % world_size::world_size]
            for j in picks:
                yield self._encode(items[j])
            position += len(items)

    def num_tokens(self, split: str) -> int:
        """Tokens (targets) in ``split``: words plus one boundary per sentence. Counted once, cached."""
        return self._count(split)[1]

    def num_sentences(self, split: str) -> int:
        """Sentences in ``split`` (counted with num_tokens, in the same pass)."""
        return self._count(split)[0]

    def _count(self, split: str) -> tuple[int, int]:
        self._check_split(split)
        if split not in self._counts:
            sentences = tokens = 0
            for shard in range(self._num_shards(split)):
                items = self._load_shard(split, shard)
                sentences += len(items)
                tokens += sum(self._item_tokens(item) for item in items)
            self._counts[split] = (sentences, tokens)
            self._readable.add(split)
        return self._counts[split]

    def check_readable(self, split: str, *, progress: bool = False) -> None:
        """Read all of ``split`` once, so that what would stop a run later (bytes that are not
        UTF-8, a file that went missing) stops it now, naming the file and line.

        Training calls this for every split it will read before its first step: an error in the
        valid split must not surface only at the first evaluation, hours in. A split already read
        to its end (counted, or train when the vocabulary was built from it) is not read again.
        progress: show the reading on stderr when it takes a while.
        """
        self._check_split(split)
        if split not in self._readable:
            self._read_all(split, progress)
            self._readable.add(split)

    def _read_all(self, split: str, progress: bool) -> None:
        """Load every shard of ``split`` (a subclass may show progress or read more cheaply)."""
        for shard in range(self._num_shards(split)):
            self._load_shard(split, shard)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"corpus {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}")

    # ------------------------------------------------------- subclass hooks
    def _num_shards(self, split: str) -> int:
        raise NotImplementedError

    def _load_shard(self, split: str, index: int) -> Sequence:
        raise NotImplementedError

    def _encode(self, item) -> list[int]:
        raise NotImplementedError

    def _item_tokens(self, item) -> int:
        raise NotImplementedError


class TextCorpus(Corpus):
    """Splits stored as text files, one sentence per line (whitespace-separated words).

    files: split name -> its files in order (the 1B Word train split has 99 shards). vocab: None
    builds it from the train split (max_vocab / min_count as in Vocabulary.from_counts); a given
    vocabulary is cut down with Vocabulary.truncated when max_vocab or min_count ask for it.
    keep_blank_lines: a blank line is a sentence of just the boundary (True), or is skipped.
    """

    def __init__(
        self,
        name: str,
        files: Mapping[str, Sequence[str | os.PathLike]],
        *,
        layout: str = "text",
        boundary: str = "<eos>",
        unk: str = "<unk>",
        vocab: Vocabulary | None = None,
        max_vocab: int | None = None,
        min_count: int = 1,
        keep_blank_lines: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.layout = layout
        self.keep_blank_lines = keep_blank_lines
        self.chunk_bytes = check_int("chunk_bytes", chunk_bytes, 1)
        self.files = {split: [Path(p) for p in paths] for split, paths in files.items()}
        self._readable: set[str] = set()  # Corpus.__init__ runs after the vocabulary is built
        for split, paths in self.files.items():
            if not paths:
                raise ValueError(f"split {split!r} of corpus {name!r} has no files")
            for p in paths:
                if not p.is_file():
                    raise FileNotFoundError(f"split file {p} is missing ({layout} layout, split {split!r})")
                if p.stat().st_size == 0:
                    raise ValueError(f"split file {p} is empty ({layout} layout, split {split!r})")
        self._chunks: dict[str, list[tuple[Path, int, int]]] = {}
        if vocab is None:
            if "train" not in self.files:
                raise ValueError(f"corpus {name!r} has no train split to build a vocabulary from; pass a vocabulary")
            vocab = Vocabulary.build(self.words("train", progress=f"{name}: building the vocabulary from train"),
                                     max_size=max_vocab, min_count=min_count,
                                     boundary=boundary, unk=unk)
        elif max_vocab is not None or min_count != 1:
            vocab = vocab.truncated(max_size=max_vocab, min_count=min_count)
        super().__init__(name, vocab, tuple(self.files))

    @classmethod
    def from_directory(
        cls,
        path: str | os.PathLike,
        *,
        vocab_path: str | os.PathLike | None = None,
        max_vocab: int | None = None,
        min_count: int = 1,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> "TextCorpus":
        """The corpus in directory ``path`` (a layout of the module docstring); see open_corpus."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"corpus directory {path} does not exist")
        if not path.is_dir():
            raise ValueError(f"{path} is a file; expected a corpus directory holding {_layouts_text()}")
        layout, files = _detect_layout(path)
        lm1b = layout == "lm1b"
        boundary, unk = ("<S>", "<UNK>") if lm1b else ("<eos>", "<unk>")
        if vocab_path is None and lm1b and (path / LM1B_VOCAB).is_file():
            vocab_path = path / LM1B_VOCAB
        vocab = None if vocab_path is None else Vocabulary.read(vocab_path, boundary=boundary, unk=unk)
        return cls(path.resolve().name or layout, files, layout=layout, boundary=boundary, unk=unk, vocab=vocab,
                   max_vocab=max_vocab, min_count=min_count, keep_blank_lines=not lm1b, chunk_bytes=chunk_bytes)

    def words(self, split: str, *, progress: str | None = None) -> Iterator[list[str]]:
        """The sentences of ``split`` as word lists (no boundary), in file order; no vocabulary needed.

        progress: a description to show the bytes read under on stderr, once reading takes over 2 s.
        """
        chunks = self._split_chunks(split)
        with Progress(sum(end - start for _, start, end in chunks), progress or split, unit="B",
                      enabled=progress is not None) as bar:
            for index, (_, start, end) in enumerate(chunks):
                shown = pending = 0  # characters reported / not yet reported (a chunk has at least as many bytes)
                for n, line in enumerate(self._load_shard(split, index), start=1):
                    yield line.split()
                    pending += len(line) + 1  # and its newline
                    if n % 10_000 == 0:  # chunks are large (64 MB): move the display within one
                        bar.update(pending)
                        shown, pending = shown + pending, 0
                bar.update(end - start - shown)
        self._readable.add(split)  # read to the end: check_readable need not read it again

    def _read_all(self, split: str, progress: bool) -> None:
        """Decode every chunk of ``split`` (the bytes shown on stderr), without splitting words."""
        chunks = self._split_chunks(split)
        with Progress(sum(end - start for _, start, end in chunks), f"{self.name}: checking {split}", unit="B",
                      enabled=progress) as bar:
            for index, (_, start, end) in enumerate(chunks):
                self._load_shard(split, index)
                bar.update(end - start)

    # ------------------------------------------------------- shard hooks
    def _split_chunks(self, split: str) -> list[tuple[Path, int, int]]:
        if split not in self._chunks:
            chunks = []
            for p in self.files[split]:
                bounds = _chunk_bounds(p, p.stat().st_size, self.chunk_bytes)
                chunks.extend((p, a, b) for a, b in zip(bounds[:-1], bounds[1:]))
            self._chunks[split] = chunks
        return self._chunks[split]

    def _num_shards(self, split: str) -> int:
        return len(self._split_chunks(split))

    def _load_shard(self, split: str, index: int) -> list[str]:
        lines = _read_lines(*self._split_chunks(split)[index])
        if not self.keep_blank_lines:
            lines = [line for line in lines if not line.isspace() and line]
        return lines

    def _encode(self, line: str) -> list[int]:
        ids = self.vocab.encode(line.split())
        ids.append(self.vocab.boundary_id)
        return ids

    def _item_tokens(self, line: str) -> int:
        return len(line.split()) + 1


# ---------------------------------------------------------------- helpers
def _layouts_text() -> str:
    plain = "; ".join(", ".join(names) for names in PLAIN_LAYOUTS.values())
    return f"{LM1B_TRAIN_DIR}/news.en-NNNNN-of-00100 (1B Word); {plain}"


def _detect_layout(path: Path) -> tuple[str, dict[str, list[Path]]]:
    """(layout name, split -> files) of the corpus directory ``path``."""
    train_dir = path / LM1B_TRAIN_DIR
    if train_dir.is_dir():
        shards = sorted(train_dir.glob(LM1B_TRAIN_GLOB))
        if not shards:
            raise FileNotFoundError(f"{train_dir} has no training shards named news.en-NNNNN-of-00100")
        heldout = path / LM1B_HELDOUT_DIR
        return "lm1b", {"train": shards, "valid": [heldout / LM1B_VALID], "test": [heldout / LM1B_TEST]}
    for layout, names in PLAIN_LAYOUTS.items():
        if any((path / name).exists() for name in names):
            return layout, {split: [path / name] for split, name in zip(SPLITS, names)}
    raise ValueError(f"no recognizable corpus layout in {path}: looked for {_layouts_text()}")


def _chunk_bounds(path: Path, size: int, chunk_bytes: int) -> list[int]:
    """Byte offsets [0, ..., size] cutting the file into chunks of about chunk_bytes, each ending
    just after a newline (a line longer than chunk_bytes makes a longer chunk)."""
    bounds = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            # The chunk ends after the first newline at or after byte target - 1.
            f.seek(target - 1)
            end = target - 1
            while True:
                block = f.read(1 << 16)
                if not block:
                    end = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    end += i + 1
                    break
                end += len(block)
            if end >= size:
                break
            bounds.append(end)
            target = end + chunk_bytes
    bounds.append(size)
    return bounds


def _read_lines(path: Path, start: int, end: int) -> list[str]:
    """The lines (without newline) of bytes [start, end) of ``path``, which start a line."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = _line_number(path, start + exc.start)
        raise ValueError(f"{path}, line {line}: undecodable bytes {data[exc.start:exc.end]!r} at byte "
                         f"{exc.start - line_start + 1} of the line (UTF-8 expected)") from None
    lines = text.split("\n")  # not splitlines(): only "\n" ends a line, as in the byte offsets
    if lines and lines[-1] == "":  # the newline ending the last line
        lines.pop()
    return lines


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line holding byte ``offset`` of ``path`` (only used for error messages)."""
    newlines = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            remaining -= len(block)
    return newlines + 1
