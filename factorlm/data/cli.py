"""``factorlm data ACTION``: ``get NAME [--dir DIR]`` downloads a corpus, ``stats [PATH]`` describes one."""

from __future__ import annotations

import argparse
import math

from factorlm.data.download import DATASETS, default_root
from factorlm.errors import CLIError

#: the sub-actions: name -> help
ACTIONS = {
    "get": "download a corpus and unpack it into a directory open_corpus reads",
    "stats": "vocabulary size and per-split sentence/token counts of a corpus (reads every split once)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = actions.add_parser("get", help=ACTIONS["get"], description=ACTIONS["get"])
    get.add_argument("name", metavar="NAME", help=f"the corpus: {', '.join(DATASETS)}")
    get.add_argument("--dir", metavar="DIR",
                     help=f"put the corpus in DIR (default: {default_root()}/NAME; FACTORLM_DATA sets the root)")
    get.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive after unpacking")

    stats = actions.add_parser("stats", help=ACTIONS["stats"], description=ACTIONS["stats"])
    stats.add_argument("path", nargs="?", metavar="PATH", help="corpus directory (default: the built-in corpus)")
    stats.add_argument("--vocab", dest="vocab_path", metavar="FILE", help="vocabulary file to use")
    stats.add_argument("--max-vocab", type=int, metavar="N", help="keep the N most frequent words")
    stats.add_argument("--min-count", type=int, default=1, metavar="N", help="keep words seen at least N times")
    stats.add_argument("--split", action="append", dest="splits", metavar="SPLIT",
                       help="only this split (repeatable; default: all)")


def run(args: argparse.Namespace) -> int:
    if args.action == "get":
        return _run_get(args)
    return _run_stats(args)


def _run_get(args: argparse.Namespace) -> int:
    from factorlm.data.download import download_dataset

    try:
        path = download_dataset(args.name, args.dir, keep_archive=args.keep_archive)
    except OSError as exc:  # network and disk errors: one line, no traceback
        raise CLIError(str(exc)) from None
    print(path)
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    from factorlm.data.sources import open_corpus

    corpus = open_corpus(args.path, vocab_path=args.vocab_path, max_vocab=args.max_vocab, min_count=args.min_count)
    splits = args.splits or list(corpus.splits)
    for split in splits:
        if split not in corpus.splits:
            raise ValueError(f"corpus {corpus.name!r} has no split {split!r}; "
                             f"its splits are {', '.join(corpus.splits)}")
    vocab = corpus.vocab
    print(f"corpus {corpus.name!r} ({corpus.layout} layout): vocabulary {len(vocab):,} words, "
          f"boundary {vocab.boundary!r}, unknown {vocab.unk!r}")
    optimal = corpus.optimal_loss or {}
    header = f"{'split':<8}{'sentences':>12}{'tokens':>14}{'unknown':>10}"
    if optimal:
        header += f"{'best loss':>12}{'best ppl':>10}"
    print(header)
    for split in splits:
        unknown = sum(sentence.count(vocab.unk_id) for sentence in corpus.sentences(split))
        tokens = corpus.num_tokens(split)
        line = f"{split:<8}{corpus.num_sentences(split):>12,}{tokens:>14,}{100 * unknown / tokens:>9.2f}%"
        if split in optimal:
            line += f"{optimal[split]:>12.4f}{math.exp(optimal[split]):>10.2f}"
        print(line)
    if optimal:
        print("best loss: the exact lowest mean loss (nats/token) any model can reach; best ppl = exp(best loss)")
    return 0
