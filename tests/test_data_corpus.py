"""Corpus readers: every layout on small fixture files, streaming, shuffling, partitioning, errors,
and the real PTB files when shared/data is present."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from factorlm.data import TextCorpus, Vocabulary, open_corpus
from factorlm.data.corpus import LM1B_HELDOUT_DIR, LM1B_TRAIN_DIR, _chunk_bounds
from helpers import SHARED_DATA


TRAIN = [" the cat sat on the mat ", " the dog sat ", " a <unk> and a dog ", " the cat ran "]
VALID = [" the cat sat ", " a bird sat "]
TEST = [" the mat ", " dog and cat ran away "]


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def plain_corpus(tmp_path, names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), splits=(TRAIN, VALID, TEST)):
    for name, lines in zip(names, splits):
        write_lines(tmp_path / name, lines)
    return tmp_path


def lm1b_corpus(root: Path, *, vocab: bool = True) -> dict[str, list[str]]:
    """A miniature 1B Word layout; returns the expected sentences (word lists as text) per split."""
    shards = {
        "news.en-00001-of-00100": ["The cat sat .", "", "A dog barked ."],
        "news.en-00002-of-00100": ["The dog sat .", "   "],
        "news.en-00010-of-00100": ["Cats and dogs ."],
    }
    for name, lines in shards.items():
        write_lines(root / LM1B_TRAIN_DIR / name, lines)
    write_lines(root / LM1B_HELDOUT_DIR / "news.en.heldout-00000-of-00050", ["The zebra sat ."])
    write_lines(root / LM1B_HELDOUT_DIR / "news.en.heldout-00001-of-00050", ["A cat .", "The dog ."])
    write_lines(root / LM1B_HELDOUT_DIR / "news.en.heldout-00002-of-00050", ["never used ."])
    (root / LM1B_TRAIN_DIR / "README").write_text("not a shard\n")
    if vocab:
        write_lines(root / "1b_word_vocab.txt",
                    [". 6", "<S> 5", "The 3", "sat 2", "dog 2", "cat 2", "<UNK> 0", "</S> 0"])
    return {
        "train": ["The cat sat .", "A dog barked .", "The dog sat .", "Cats and dogs ."],
        "valid": ["A cat .", "The dog ."],
        "test": ["The zebra sat ."],
    }


def decode(corpus, split, **kw):
    return [" ".join(corpus.vocab.decode(s)) for s in corpus.sentences(split, **kw)]


# ----------------------------------------------------------------- layouts
@pytest.mark.parametrize(
    "names, layout",
    [
        (("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), "ptb"),
        (("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), "wikitext"),
        (("train.txt", "valid.txt", "test.txt"), "text"),
    ],
)
def test_plain_text_layouts(tmp_path, names, layout):
    corpus = open_corpus(plain_corpus(tmp_path, names))
    assert corpus.layout == layout and corpus.splits == ("train", "valid", "test")
    assert (corpus.vocab.boundary, corpus.vocab.unk) == ("<eos>", "<unk>")
    for split, lines in zip(corpus.splits, (TRAIN, VALID, TEST)):
        expected = [" ".join(line.split() + ["<eos>"]) for line in lines]
        if split != "train":  # words never seen in train are unknown
            known = set(" ".join(TRAIN).split()) | {"<eos>"}
            expected = [" ".join(w if w in known else "<unk>" for w in e.split()) for e in expected]
        assert decode(corpus, split) == expected
        assert corpus.num_tokens(split) == sum(len(line.split()) + 1 for line in lines)
        assert corpus.num_sentences(split) == len(lines)
    # the vocabulary is built from train only, frequency-sorted
    counts = Counter(" ".join(TRAIN).split())
    counts["<eos>"] = len(TRAIN)
    assert sorted(corpus.vocab.words) == sorted(counts)
    assert corpus.vocab.counts == sorted(corpus.vocab.counts, reverse=True)


def test_wikitext_keeps_blank_and_heading_lines(tmp_path):
    train = [" ", " = Valkyria Chronicles = ", " ", " The game began . ", " = = Plot = = ", " It ended . "]
    plain_corpus(tmp_path, ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), (train, VALID, TEST))
    corpus = open_corpus(tmp_path)
    assert decode(corpus, "train") == [
        "<eos>", "= Valkyria Chronicles = <eos>", "<eos>", "The game began . <eos>", "= = Plot = = <eos>",
        "It ended . <eos>"]
    assert corpus.num_tokens("train") == 6 + sum(len(line.split()) for line in train)


def test_lm1b_layout_reads_shards_in_order_with_the_vocab_file(tmp_path):
    expected = lm1b_corpus(tmp_path)
    corpus = open_corpus(tmp_path)
    assert corpus.layout == "lm1b"
    assert corpus.vocab == Vocabulary.read(tmp_path / "1b_word_vocab.txt")
    assert (corpus.vocab.boundary, corpus.vocab.unk) == ("<S>", "<UNK>")
    vocab_words = set(corpus.vocab.words)
    for split, sentences in expected.items():
        want = [" ".join([w if w in vocab_words else "<UNK>" for w in s.split()] + ["<S>"]) for s in sentences]
        assert decode(corpus, split) == want, split
        assert corpus.num_tokens(split) == sum(len(s.split()) + 1 for s in sentences)  # blank lines skipped


def test_lm1b_layout_without_vocab_file_builds_one_from_train(tmp_path):
    expected = lm1b_corpus(tmp_path, vocab=False)
    corpus = open_corpus(tmp_path)
    words = Counter(w for s in expected["train"] for w in s.split())
    assert set(corpus.vocab.words) == set(words) | {"<S>", "<UNK>"}
    assert corpus.vocab.counts[corpus.vocab.boundary_id] == len(expected["train"])
    assert decode(corpus, "test") == ["The <UNK> sat . <S>"]


def test_vocab_path_max_vocab_and_min_count(tmp_path):
    plain_corpus(tmp_path / "c")
    vocab_file = write_lines(tmp_path / "v.txt", ["the 10", "<eos> 9", "cat 5", "sat 4", "<unk> 1", "dog 1"])
    corpus = open_corpus(tmp_path / "c", vocab_path=vocab_file)
    assert corpus.vocab.words == ["the", "<eos>", "cat", "sat", "<unk>", "dog"]
    assert decode(corpus, "valid") == ["the cat sat <eos>", "<unk> <unk> sat <eos>"]
    for options in ({"max_vocab": 4}, {"min_count": 5}):  # the file's order is kept
        truncated = open_corpus(tmp_path / "c", vocab_path=vocab_file, **options).vocab
        assert truncated.words == ["the", "<eos>", "cat", "<unk>"]
    # built from train: the 4, <eos> 4, then a/cat/dog/sat 2 (ties alphabetical): "a" is kept and the
    # 10 occurrences of the dropped words join the literal <unk>'s one
    built = open_corpus(tmp_path / "c", max_vocab=4)
    assert built.vocab.words == ["<unk>", "<eos>", "the", "a"]
    assert built.vocab.counts == [11, 4, 4, 2]
    assert decode(built, "valid") == ["the <unk> <unk> <eos>", "a <unk> <unk> <eos>"]


# --------------------------------------------------------------- streaming
def test_chunk_bounds_tile_the_file_at_line_ends(tmp_path):
    lines = [f"line {i} " + "w " * (i % 7) for i in range(200)] + ["x" * 300]
    path = write_lines(tmp_path / "f.txt", lines)
    data = path.read_bytes()
    for chunk_bytes in (1, 16, 64, 1000, len(data), len(data) + 5):
        bounds = _chunk_bounds(path, len(data), chunk_bytes)
        assert bounds[0] == 0 and bounds[-1] == len(data)
        assert all(a < b for a, b in zip(bounds, bounds[1:]))
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert data[b - 1:b] == b"\n"  # every chunk ends a line
            longest = max(len(line) + 1 for line in data[a:b].split(b"\n"))
            assert b - a < chunk_bytes + longest  # a chunk only exceeds chunk_bytes to finish a line


def test_small_chunks_stream_the_same_sentences(tmp_path):
    lines = [f" w{i % 13} w{i % 5} w{i} " for i in range(300)]
    plain_corpus(tmp_path, splits=(lines, VALID, TEST))
    whole = open_corpus(tmp_path)
    chunked = TextCorpus.from_directory(tmp_path, chunk_bytes=97)
    assert chunked._num_shards("train") > 30  # really cut into many chunks
    assert list(chunked.sentences("train")) == list(whole.sentences("train"))
    assert chunked.num_tokens("train") == whole.num_tokens("train") == 4 * 300


@pytest.fixture()
def chunked(tmp_path):
    lines = [f" s{i} " + "x " * (i % 4) for i in range(240)]
    plain_corpus(tmp_path, splits=(lines, VALID, TEST))
    return TextCorpus.from_directory(tmp_path, chunk_bytes=200)


def test_shuffle_is_deterministic_per_seed_and_epoch(chunked):
    plain = list(chunked.sentences("train"))
    a = list(chunked.sentences("train", shuffle=True, seed=7, epoch=3))
    assert a == list(chunked.sentences("train", shuffle=True, seed=7, epoch=3))
    assert sorted(a) == sorted(plain) and a != plain
    assert list(chunked.sentences("train", shuffle=True, seed=7, epoch=4)) != a
    assert list(chunked.sentences("train", shuffle=True, seed=8, epoch=3)) != a


def test_shuffle_permutes_chunks_and_lines_within_chunks(chunked):
    order = [chunked.vocab.decode(s)[0] for s in chunked.sentences("train", shuffle=True, seed=1, epoch=0)]
    chunks = [[line.split()[0] for line in chunked._load_shard("train", i)]
              for i in range(chunked._num_shards("train"))]
    # the shuffled order is a sequence of whole chunks, each chunk's lines permuted
    position, seen_chunks = 0, []
    while position < len(order):
        index = next(i for i, c in enumerate(chunks) if order[position] in c)
        assert sorted(order[position: position + len(chunks[index])]) == sorted(chunks[index])
        seen_chunks.append(index)
        position += len(chunks[index])
    assert sorted(seen_chunks) == list(range(len(chunks))) and seen_chunks != sorted(seen_chunks)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_partition_is_disjoint_and_complete(chunked, world_size, shuffle):
    everything = list(chunked.sentences("train", shuffle=shuffle, seed=5, epoch=2))
    parts = [list(chunked.sentences("train", shuffle=shuffle, seed=5, epoch=2, rank=r, world_size=world_size))
             for r in range(world_size)]
    for r, part in enumerate(parts):
        assert part == everything[r::world_size]  # positions r, r + W, ... of the epoch's order
    assert sum(len(p) for p in parts) == len(everything) == 240


def test_sentences_argument_errors(chunked):
    with pytest.raises(ValueError, match="has no split 'dev'; its splits are train, valid, test"):
        chunked.sentences("dev")
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        chunked.sentences("train", rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        chunked.sentences("train", seed=-1)


# ------------------------------------------------------------------ errors
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"corpus directory {tmp_path / 'nope'} does not exist"):
        open_corpus(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    path = write_lines(tmp_path / "ptb.train.txt", ["a"])
    with pytest.raises(ValueError, match="ptb.train.txt is a file; expected a corpus directory"):
        open_corpus(path)


def test_unrecognized_layout_lists_what_was_looked_for(tmp_path):
    write_lines(tmp_path / "corpus.txt", ["a b"])
    with pytest.raises(ValueError) as info:
        open_corpus(tmp_path)
    message = str(info.value)
    assert f"no recognizable corpus layout in {tmp_path}" in message
    for name in ("training-monolingual.tokenized.shuffled", "ptb.train.txt", "wiki.valid.tokens", "test.txt"):
        assert name in message


def test_missing_and_empty_split_files(tmp_path):
    write_lines(tmp_path / "a" / "ptb.train.txt", TRAIN)
    write_lines(tmp_path / "a" / "ptb.test.txt", TEST)
    with pytest.raises(FileNotFoundError, match=r"split file .*ptb.valid.txt is missing \(ptb layout, split 'valid'\)"):
        open_corpus(tmp_path / "a")
    plain_corpus(tmp_path / "b", ("train.txt", "valid.txt", "test.txt"))
    (tmp_path / "b" / "test.txt").write_text("")
    with pytest.raises(ValueError, match=r"split file .*test.txt is empty"):
        open_corpus(tmp_path / "b")
    lm1b_corpus(tmp_path / "c")
    (tmp_path / "c" / LM1B_HELDOUT_DIR / "news.en.heldout-00000-of-00050").unlink()
    with pytest.raises(FileNotFoundError, match=r"heldout-00000-of-00050 is missing \(lm1b layout, split 'test'\)"):
        open_corpus(tmp_path / "c")


def test_undecodable_bytes_name_the_file_and_line_even_in_a_later_chunk(tmp_path):
    plain_corpus(tmp_path)
    lines = [f"line {i}".encode() for i in range(100)]
    lines[76] = b"caf\xe9 au lait"  # Latin-1, not UTF-8
    (tmp_path / "ptb.valid.txt").write_bytes(b"\n".join(lines) + b"\n")
    for chunk_bytes in (1 << 20, 50):
        corpus = TextCorpus.from_directory(tmp_path, chunk_bytes=chunk_bytes)
        with pytest.raises(ValueError, match=r"ptb.valid.txt, line 77: undecodable bytes b'\\xe9' at byte 4 of the "
                                             r"line \(UTF-8 expected\)"):
            list(corpus.sentences("valid"))


def test_check_readable_reads_a_split_once_and_names_a_bad_line(tmp_path, monkeypatch):
    plain_corpus(tmp_path)
    lines = [f"line {i}".encode() for i in range(60)]
    lines[50] = b"na\xefve"  # Latin-1
    (tmp_path / "ptb.valid.txt").write_bytes(b"\n".join(lines) + b"\n")
    corpus = TextCorpus.from_directory(tmp_path, chunk_bytes=64)
    reads = []
    real = TextCorpus._read_all
    monkeypatch.setattr(TextCorpus, "_read_all", lambda self, split, progress: (reads.append(split),
                                                                                 real(self, split, progress)))
    corpus.check_readable("train")  # read to the end when the vocabulary was built from it
    corpus.check_readable("test")
    corpus.check_readable("test")
    assert reads == ["test"]
    with pytest.raises(ValueError, match=r"ptb.valid.txt, line 51: undecodable bytes b'\\xef'"):
        corpus.check_readable("valid")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        corpus.check_readable("dev")
    builtin = open_corpus(None)
    for split in builtin.splits:  # generated in memory: nothing to go wrong
        builtin.check_readable(split)


def test_builtin_corpus_rejects_vocabulary_options():
    with pytest.raises(ValueError, match="do not apply to the built-in corpus"):
        open_corpus(None, max_vocab=100)


# --------------------------------------------------------------- real data
@pytest.mark.skipif(not (SHARED_DATA / "ptb" / "ptb.train.txt").exists(),
                    reason=f"the real PTB files are not in {SHARED_DATA / 'ptb'}")
def test_real_ptb_counts():
    corpus = open_corpus(SHARED_DATA / "ptb")
    assert corpus.layout == "ptb"
    assert len(corpus.vocab) == 10_000
    assert [corpus.num_tokens(s) for s in ("train", "valid", "test")] == [929_589, 73_760, 82_430]
    assert [corpus.num_sentences(s) for s in ("train", "valid", "test")] == [42_068, 3_370, 3_761]
    # valid/test words are all in the train vocabulary; "<unk>" is PTB's own
    for split in ("valid", "test"):
        words = set((SHARED_DATA / "ptb" / f"ptb.{split}.txt").read_text().split())
        assert words <= set(corpus.vocab.words)
