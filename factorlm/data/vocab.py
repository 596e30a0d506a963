"""Vocabulary: words <-> ids, frequency-sorted, with a sentence-boundary word and an unknown word.

Ids are ranks by frequency (id 0 = most frequent): the sampled softmax's log-uniform candidate
sampler (as in TensorFlow's ``sampled_softmax_loss``) assumes it. Two naming conventions exist:

    1B Word (the paper's vocab file)    boundary "<S>",   unknown "<UNK>"
    PTB / WikiText (text contains them)  boundary "<eos>", unknown "<unk>"

The file format is the 1B Word benchmark's ``1b_word_vocab.txt``: one ``word count`` per line,
most frequent first (a file of bare words, without counts, is read too).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from typing import Iterable, Mapping, Sequence

from factorlm.errors import CheckpointError
from factorlm.validate import check_int

__all__ = ["Vocabulary"]


class Vocabulary:
    """An ordered list of distinct words; ``words[i]`` has id ``i``.

    ``counts[i]`` is the training-data count of ``words[i]`` (None when unknown). Out-of-vocabulary
    words map to ``unk_id``. ``boundary`` ends every sentence (and opens the token stream).
    """

    def __init__(
        self,
        words: Sequence[str],
        counts: Sequence[int] | None = None,
        *,
        boundary: str = "<S>",
        unk: str = "<UNK>",
    ) -> None:
        self.words: list[str] = list(words)
        self.counts: list[int] | None = None if counts is None else [int(c) for c in counts]
        self.boundary = boundary
        self.unk = unk
        self._index = {w: i for i, w in enumerate(self.words)}
        if len(self._index) != len(self.words):
            seen: set[str] = set()
            duplicate = next(w for w in self.words if w in seen or seen.add(w))
            raise ValueError(f"vocabulary words must be distinct, {duplicate!r} appears twice")
        if self.counts is not None and len(self.counts) != len(self.words):
            raise ValueError(f"got {len(self.counts)} counts for {len(self.words)} words; expected one count per word")
        if boundary == unk:
            raise ValueError(f"the boundary and unknown words must differ, both are {boundary!r}")
        for role, word in (("boundary", boundary), ("unknown", unk)):
            if word not in self._index:
                raise ValueError(f"the vocabulary has no {role} word {word!r}; every vocabulary needs one")
        self.boundary_id = self._index[boundary]
        self.unk_id = self._index[unk]

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self.words, self.counts, self.boundary, self.unk) == (
            other.words, other.counts, other.boundary, other.unk)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, boundary={self.boundary!r}, unk={self.unk!r})"

    def id(self, word: str) -> int:
        """The id of ``word``; ``unk_id`` when it is not in the vocabulary."""
        return self._index.get(word, self.unk_id)

    def word(self, i: int) -> str:
        if not 0 <= i < len(self.words):
            raise IndexError(f"word id {i} out of range for a vocabulary of {len(self.words)} words")
        return self.words[i]

    def encode(self, words: Iterable[str]) -> list[int]:
        """Ids of ``words`` (unknown words -> unk_id). No boundary is added."""
        get, unk = self._index.get, self.unk_id
        return [get(w, unk) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (a list, a 1-D tensor or array of ints)."""
        return [self.word(int(i)) for i in ids]

    def fingerprint(self) -> str:
        """sha256 (hex) of the words in id order, each followed by a newline: equal fingerprints mean
        equal id assignments (counts do not enter)."""
        return hashlib.sha256("".join(w + "\n" for w in self.words).encode("utf-8")).hexdigest()

    def check_same(self, other: "Vocabulary", *, name: str, other_name: str, hint: str = "") -> None:
        """Raise CheckpointError unless ``other`` assigns the same ids (equal fingerprints).

        The message reads ``NAME has another vocabulary (N words, fingerprint ...) than OTHER_NAME
        (M words, fingerprint ...)HINT``; e.g. name "checkpoint run/checkpoint.pt", other_name
        "the corpus 'ptb'".
        """
        mine, theirs = self.fingerprint(), other.fingerprint()
        if mine != theirs:
            raise CheckpointError(
                f"{name} has another vocabulary ({len(self):,} words, fingerprint {mine[:12]}) than {other_name} "
                f"({len(other):,} words, fingerprint {theirs[:12]}){hint}"
            )

    # ---------------------------------------------------------- checkpoint form
    def to_dict(self) -> dict:
        """The form stored in checkpoints: {"words", "counts", "boundary", "unk", "fingerprint"}
        (plain lists and strings, safe for ``torch.load(weights_only=True)``)."""
        return {
            "words": list(self.words),
            "counts": list(self.counts) if self.counts is not None else None,
            "boundary": self.boundary,
            "unk": self.unk,
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Vocabulary":
        """The vocabulary ``to_dict`` wrote; CheckpointError when it is incomplete or does not match
        its own stored fingerprint (a damaged or hand-edited checkpoint)."""
        missing = [key for key in ("words", "boundary", "unk", "fingerprint") if key not in data]
        if missing:
            raise CheckpointError(f"the vocabulary stored in the checkpoint lacks {missing}")
        try:
            vocab = cls(list(data["words"]), counts=data.get("counts"), boundary=data["boundary"], unk=data["unk"])
        except ValueError as exc:
            raise CheckpointError(f"the vocabulary stored in the checkpoint is invalid: {exc}") from None
        if vocab.fingerprint() != data["fingerprint"]:
            raise CheckpointError("the vocabulary stored in the checkpoint does not match its own fingerprint")
        return vocab

    # --------------------------------------------------------------- file I/O
    @classmethod
    def read(cls, path: str | os.PathLike, *, boundary: str = "<S>", unk: str = "<UNK>") -> "Vocabulary":
        """Read ``word count`` lines (most frequent first) or bare ``word`` lines; blank lines are skipped.

        Either every line has a count or none has. Ids follow the file's line order.
        """
        words: list[str] = []
        counts: list[int] = []
        with_counts: bool | None = None
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file {os.fspath(path)} does not exist") from None
        with f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"{os.fspath(path)}, line {lineno}: undecodable bytes at column {exc.start + 1} "
                        f"(UTF-8 expected)") from None
                fields = line.split()
                if not fields:
                    continue
                if len(fields) > 2:
                    raise _bad_line(path, lineno, line, "expected 'word count' or 'word'")
                if with_counts is not None and with_counts != (len(fields) == 2):
                    raise _bad_line(path, lineno, line, f"expected {'word count' if with_counts else 'word'!r} "
                                                        f"like the lines before it")
                with_counts = len(fields) == 2
                if with_counts:
                    count = int(fields[1]) if fields[1].isascii() and fields[1].isdigit() else -1
                    if count < 0:
                        raise _bad_line(path, lineno, line,
                                        f"expected a non-negative integer count, got {fields[1]!r}")
                    counts.append(count)
                words.append(fields[0])
        if not words:
            raise ValueError(f"vocabulary file {os.fspath(path)} is empty")
        try:
            return cls(words, counts if with_counts else None, boundary=boundary, unk=unk)
        except ValueError as exc:
            raise ValueError(f"vocabulary file {os.fspath(path)}: {exc}") from None

    def write(self, path: str | os.PathLike) -> None:
        """Write one ``word count`` line per word (bare ``word`` lines when counts are unknown)."""
        for w in self.words:
            if not w or len(w.split()) != 1 or w != w.strip():
                raise ValueError(f"cannot write the word {w!r}: words in a vocabulary file must be "
                                 f"non-empty and without whitespace")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            if self.counts is None:
                f.writelines(w + "\n" for w in self.words)
            else:
                f.writelines(f"{w} {c}\n" for w, c in zip(self.words, self.counts))

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        *,
        max_size: int | None = None,
        min_count: int = 1,
        boundary: str,
        unk: str,
    ) -> "Vocabulary":
        """Count the words of ``sentences`` (word lists, without boundary) and rank them.

        The boundary is counted once per sentence (every sentence ends with it); see from_counts.
        """
        counts: Counter[str] = Counter()
        num_sentences = 0
        for sentence in sentences:
            counts.update(sentence)
            num_sentences += 1
        counts[boundary] += num_sentences
        return cls.from_counts(counts, max_size=max_size, min_count=min_count, boundary=boundary, unk=unk)

    @classmethod
    def from_counts(
        cls,
        counts: Mapping[str, int],
        *,
        max_size: int | None = None,
        min_count: int = 1,
        boundary: str,
        unk: str,
    ) -> "Vocabulary":
        """Rank words by count, descending; ties in code-point (alphabetical) order, so the result is
        the same whatever the order the words were seen in.

        Kept: words with count >= min_count, at most ``max_size`` words in all (the most frequent).
        The boundary and unknown words are always kept; the counts of dropped words are added to
        the unknown word's count (their occurrences become unknown), and the ranking is redone.
        """
        check_int("max_size", max_size, 2, optional=True, note=f"(room for {boundary!r} and {unk!r})")
        ranked = cls(*_ranked(counts, boundary, unk), boundary=boundary, unk=unk)
        kept = ranked.truncated(max_size=max_size, min_count=min_count)
        return cls(*_ranked(dict(zip(kept.words, kept.counts)), boundary, unk), boundary=boundary, unk=unk)

    def truncated(self, *, max_size: int | None = None, min_count: int = 1) -> "Vocabulary":
        """A smaller vocabulary keeping the existing order: words with count >= min_count, then the
        first ``max_size`` of those (the boundary and unknown words always stay).

        Dropped words' counts are added to the unknown word's count. min_count > 1 needs counts.
        """
        check_int("max_size", max_size, 2, optional=True, note=f"(room for {self.boundary!r} and {self.unk!r})")
        check_int("min_count", min_count)
        if min_count > 1 and self.counts is None:
            raise ValueError(f"min_count={min_count} needs word counts, but this vocabulary has none")
        specials = {self.boundary, self.unk}
        counts = self.counts if self.counts is not None else [0] * len(self.words)
        room = None if max_size is None else max_size - 2
        keep: set[str] = set(specials)
        for w, c in zip(self.words, counts):
            if room is not None and room <= 0:
                break
            if w not in specials and c >= min_count:
                keep.add(w)
                if room is not None:
                    room -= 1
        if len(keep) == len(self.words):
            return Vocabulary(self.words, self.counts, boundary=self.boundary, unk=self.unk)
        words = [w for w in self.words if w in keep]
        if self.counts is None:
            return Vocabulary(words, None, boundary=self.boundary, unk=self.unk)
        dropped = sum(c for w, c in zip(self.words, counts) if w not in keep)
        new_counts = [c + (dropped if w == self.unk else 0) for w, c in zip(self.words, counts) if w in keep]
        return Vocabulary(words, new_counts, boundary=self.boundary, unk=self.unk)


def _bad_line(path, lineno: int, line: str, expected: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}, line {lineno}: bad vocabulary line {line.strip()!r}, {expected}")


def _ranked(counts: Mapping[str, int], boundary: str, unk: str) -> tuple[list[str], list[int]]:
    """(words, counts) sorted by count descending, ties by code point; boundary and unk included."""
    table = dict(counts)
    table.setdefault(boundary, 0)
    table.setdefault(unk, 0)
    for w, c in table.items():
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"the count of {w!r} must be a non-negative integer, got {c!r}")
    words = sorted(table, key=lambda w: (-table[w], w))
    return words, [table[w] for w in words]
