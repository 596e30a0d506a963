"""``open_corpus``: the corpus a directory holds, or the built-in one.

Its own module because it is the one place that knows both kinds: TextCorpus (factorlm.data.corpus)
and the built-in corpus (factorlm.data.synthetic, itself built on corpus.Corpus).
"""

from __future__ import annotations

import os
from pathlib import Path

from factorlm.data.corpus import Corpus, TextCorpus
from factorlm.data.synthetic import builtin_corpus

__all__ = ["open_corpus"]


def open_corpus(
    path: str | os.PathLike | None,
    *,
    vocab_path: str | os.PathLike | None = None,
    max_vocab: int | None = None,
    min_count: int = 1,
) -> Corpus:
    """The corpus in directory ``path`` (see factorlm.data.corpus for the layouts), or with
    ``path=None`` the built-in synthetic corpus (factorlm.data.synthetic, no download).

    vocab_path: a vocabulary file (``word count`` lines) to use instead of the layout's own or one
    built from train. max_vocab / min_count: keep at most max_vocab words / only words seen at
    least min_count times (the boundary and unknown words always stay).
    """
    if path is None:
        if vocab_path is not None or max_vocab is not None or min_count != 1:
            raise ValueError("vocab_path, max_vocab and min_count do not apply to the built-in corpus, whose "
                             "vocabulary is fixed by its generator (pass a corpus directory to use them)")
        return builtin_corpus()
    corpus = TextCorpus.from_directory(path, vocab_path=vocab_path, max_vocab=max_vocab, min_count=min_count)
    corpus.path = str(Path(path).expanduser().resolve())
    return corpus
