"""Data: vocabulary, corpus readers (1B Word, PTB, WikiText, plain text, built-in), batching, download.

    corpus = open_corpus("~/.cache/factorlm/data/ptb")      # or open_corpus(None): the built-in corpus
    batcher = StreamBatcher(lambda e: corpus.sentences("train", shuffle=True, epoch=e), 20, 35,
                            corpus.vocab.boundary_id)
    for batch in batcher.epoch_batches(0): ...               # batch.inputs / .targets: (T, B) int64
    stream = split_stream(corpus, "valid")                    # exact evaluation input

Downloads: ``factorlm data get NAME`` (factorlm.data.download).
"""

from factorlm.data.batching import Batch, ContiguousBatcher, StreamBatcher, StreamRows, split_stream, stream_rows
from factorlm.data.corpus import SPLITS, Corpus, TextCorpus
from factorlm.data.sources import open_corpus
from factorlm.data.synthetic import SyntheticConfig, SyntheticCorpus, builtin_corpus
from factorlm.data.vocab import Vocabulary

__all__ = [
    "SPLITS",
    "Batch",
    "ContiguousBatcher",
    "Corpus",
    "StreamBatcher",
    "SyntheticConfig",
    "SyntheticCorpus",
    "TextCorpus",
    "Vocabulary",
    "builtin_corpus",
    "open_corpus",
    "split_stream",
    "stream_rows",
    "StreamRows",
]
