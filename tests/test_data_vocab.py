"""Vocabulary: file round trips, bad lines, building with max_size/min_count, OOV handling."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from factorlm.data import Vocabulary

SENTENCES = [
    "the cat sat on the mat".split(),
    "the dog sat".split(),
    "a cat and a dog".split(),
    "zebra".split(),
]


def test_write_read_round_trip_with_counts(tmp_path):
    vocab = Vocabulary(["the", "<S>", "cat", "<UNK>", "é"], [9, 5, 3, 2, 1], boundary="<S>", unk="<UNK>")
    path = tmp_path / "vocab.txt"
    vocab.write(path)
    assert path.read_text(encoding="utf-8") == "the 9\n<S> 5\ncat 3\n<UNK> 2\né 1\n"
    again = Vocabulary.read(path)
    assert again == vocab
    assert again.fingerprint() == vocab.fingerprint()
    assert (again.boundary_id, again.unk_id) == (1, 3)


def test_write_read_round_trip_without_counts(tmp_path):
    vocab = Vocabulary(["<eos>", "<unk>", "b", "a"], boundary="<eos>", unk="<unk>")
    path = tmp_path / "vocab.txt"
    vocab.write(path)
    assert path.read_text() == "<eos>\n<unk>\nb\na\n"
    again = Vocabulary.read(path, boundary="<eos>", unk="<unk>")
    assert again == vocab and again.counts is None


def test_read_1b_format_follows_file_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "1b_word_vocab.txt"
    path.write_text("the 35936573\n, 35089484\n\n<S> 30305271\n<UNK> 1947127\n   \n</S> 0\n")
    vocab = Vocabulary.read(path)
    assert vocab.words == ["the", ",", "<S>", "<UNK>", "</S>"]
    assert vocab.counts == [35936573, 35089484, 30305271, 1947127, 0]
    assert (vocab.boundary_id, vocab.unk_id) == (2, 3)


def test_fingerprint_is_sha256_of_the_words_in_order():
    vocab = Vocabulary(["<S>", "<UNK>", "x"])
    assert vocab.fingerprint() == hashlib.sha256(b"<S>\n<UNK>\nx\n").hexdigest()
    assert Vocabulary(["<S>", "x", "<UNK>"]).fingerprint() != vocab.fingerprint()
    # counts do not change the id assignment, so not the fingerprint
    assert Vocabulary(["<S>", "<UNK>", "x"], [1, 2, 3]).fingerprint() == vocab.fingerprint()


@pytest.mark.parametrize(
    "text, message",
    [
        ("<S> 3\n<UNK> 2\nthe cat 1\n", "line 3: bad vocabulary line 'the cat 1', expected 'word count' or 'word'"),
        ("<S> 3\n<UNK> x\n", "line 2: bad vocabulary line '<UNK> x', expected a non-negative integer count, got 'x'"),
        ("<S> 3\n<UNK> -2\n", "line 2: bad vocabulary line '<UNK> -2', expected a non-negative integer count"),
        ("<S> 3\n<UNK>\n", "line 2: bad vocabulary line '<UNK>', expected 'word count' like the lines before it"),
        ("<S>\n<UNK> 4\n", "line 2: bad vocabulary line '<UNK> 4', expected 'word' like the lines before it"),
        ("<S> 3\n<UNK> 2\n<S> 1\n", "vocabulary words must be distinct, '<S>' appears twice"),
        ("the 3\n<UNK> 2\n", "has no boundary word '<S>'"),
        ("the 3\n<S> 2\n", "has no unknown word '<UNK>'"),
        ("\n\n", "is empty"),
    ],
)
def test_read_errors_name_the_file_line_and_expectation(tmp_path, text, message):
    path = tmp_path / "vocab.txt"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        Vocabulary.read(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_read_undecodable_bytes_names_the_line(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"<S> 3\n<UNK> 2\nca\xfft 1\n")
    with pytest.raises(ValueError, match=r"vocab.txt, line 3: undecodable bytes .*UTF-8 expected"):
        Vocabulary.read(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        Vocabulary.read(tmp_path / "nope.txt")


def test_constructor_errors():
    with pytest.raises(ValueError, match="got 2 counts for 3 words"):
        Vocabulary(["<S>", "<UNK>", "a"], [1, 2])
    with pytest.raises(ValueError, match="must differ"):
        Vocabulary(["<S>"], boundary="<S>", unk="<S>")
    with pytest.raises(ValueError, match="without whitespace"):
        Vocabulary(["<S>", "<UNK>", "a b"]).write("unused.txt")


def test_build_counts_ranks_and_includes_specials():
    vocab = Vocabulary.build(SENTENCES, boundary="<eos>", unk="<unk>")
    reference = Counter(w for s in SENTENCES for w in s)
    reference["<eos>"] = len(SENTENCES)
    reference["<unk>"] = 0
    # frequency descending, ties in code-point order
    assert vocab.words == ["<eos>", "the", "a", "cat", "dog", "sat", "and", "mat", "on", "zebra", "<unk>"]
    assert vocab.counts == [reference[w] for w in vocab.words]
    assert vocab.boundary_id == 0 and vocab.unk_id == len(vocab) - 1


def test_build_is_independent_of_sentence_order():
    shuffled = SENTENCES[:]
    random.Random(3).shuffle(shuffled)
    a = Vocabulary.build(SENTENCES, boundary="<S>", unk="<UNK>")
    b = Vocabulary.build(shuffled, boundary="<S>", unk="<UNK>")
    assert a == b


def test_build_max_size_keeps_the_most_frequent_and_moves_the_rest_to_unk():
    vocab = Vocabulary.build(SENTENCES, max_size=5, boundary="<eos>", unk="<unk>")
    # kept besides the specials: the three most frequent words ("the" 3, "a" 2, "cat" 2)
    assert set(vocab.words) == {"<eos>", "<unk>", "the", "a", "cat"}
    total = sum(len(s) for s in SENTENCES) + len(SENTENCES)
    assert sum(vocab.counts) == total
    assert vocab.counts[vocab.unk_id] == total - 4 - 3 - 2 - 2  # <eos>, the, a, cat
    assert vocab.counts == sorted(vocab.counts, reverse=True)  # re-ranked after <unk> grew


def test_build_min_count_keeps_specials_even_when_rare():
    vocab = Vocabulary.build([["x", "x", "y"]], min_count=2, boundary="<S>", unk="<UNK>")
    assert vocab.words == ["x", "<S>", "<UNK>"]  # "x" 2; "<S>" 1 and "<UNK>" 1 (from "y") tie
    assert vocab.counts == [2, 1, 1]


def test_build_and_truncated_reject_bad_sizes():
    with pytest.raises(ValueError, match="max_size must be an integer >= 2"):
        Vocabulary.build(SENTENCES, max_size=1, boundary="<S>", unk="<UNK>")
    with pytest.raises(ValueError, match="min_count must be an integer >= 1, got 0"):
        Vocabulary.build(SENTENCES, min_count=0, boundary="<S>", unk="<UNK>")
    with pytest.raises(ValueError, match="min_count=2 needs word counts"):
        Vocabulary(["<S>", "<UNK>", "a"]).truncated(min_count=2)


def test_truncated_keeps_the_existing_order():
    vocab = Vocabulary(["the", "<S>", "of", "zz", "<UNK>", "rare"], [50, 40, 30, 20, 10, 1])
    small = vocab.truncated(max_size=4)
    assert small.words == ["the", "<S>", "of", "<UNK>"]
    assert small.counts == [50, 40, 30, 10 + 20 + 1]
    assert vocab.truncated(min_count=15).words == ["the", "<S>", "of", "zz", "<UNK>"]
    assert vocab.truncated() == vocab


def test_oov_maps_to_unk_and_encode_decode():
    vocab = Vocabulary.build(SENTENCES, boundary="<eos>", unk="<unk>")
    assert vocab.id("platypus") == vocab.unk_id
    assert "platypus" not in vocab and "cat" in vocab
    ids = vocab.encode(["the", "platypus", "sat"])
    assert ids == [vocab.id("the"), vocab.unk_id, vocab.id("sat")]
    assert vocab.decode(ids) == ["the", "<unk>", "sat"]
    with pytest.raises(IndexError, match="word id 11 out of range for a vocabulary of 11 words"):
        vocab.word(11)


# ---------------------------------------------------------- checkpoint form
def test_checkpoint_form_round_trips_in_the_stored_layout():
    vocab = Vocabulary(["<S>", "the", "<UNK>", "cat"], counts=[9, 5, 0, 2])
    data = vocab.to_dict()
    # the keys and values checkpoints have always stored (train/loop.py wrote them by hand before)
    assert data == {"words": ["<S>", "the", "<UNK>", "cat"], "counts": [9, 5, 0, 2], "boundary": "<S>",
                    "unk": "<UNK>", "fingerprint": vocab.fingerprint()}
    assert Vocabulary.from_dict(data) == vocab
    bare = Vocabulary(["<eos>", "<unk>"], boundary="<eos>", unk="<unk>")
    assert Vocabulary.from_dict(bare.to_dict()) == bare and bare.to_dict()["counts"] is None


def test_checkpoint_form_errors():
    from factorlm.errors import CheckpointError

    data = Vocabulary(["<S>", "<UNK>", "a"]).to_dict()
    with pytest.raises(CheckpointError, match="does not match its own fingerprint"):
        Vocabulary.from_dict({**data, "words": ["<S>", "<UNK>", "b"]})
    with pytest.raises(CheckpointError, match=r"lacks \['fingerprint'\]"):
        Vocabulary.from_dict({k: v for k, v in data.items() if k != "fingerprint"})
    with pytest.raises(CheckpointError, match="invalid: .*'<S>' appears twice"):
        Vocabulary.from_dict({**data, "words": ["<S>", "<UNK>", "<S>"]})


def test_check_same_names_both_vocabularies():
    from factorlm.errors import CheckpointError

    a, b = Vocabulary(["<S>", "<UNK>", "a"]), Vocabulary(["<S>", "<UNK>", "b", "c"])
    a.check_same(Vocabulary(["<S>", "<UNK>", "a"], counts=[1, 2, 3]), name="x", other_name="y")  # counts do not count
    with pytest.raises(CheckpointError, match=rf"^checkpoint c.pt has another vocabulary \(3 words, fingerprint "
                       rf"{a.fingerprint()[:12]}\) than the corpus 'd' \(4 words, fingerprint {b.fingerprint()[:12]}\); "
                       rf"retry$"):
        a.check_same(b, name="checkpoint c.pt", other_name="the corpus 'd'", hint="; retry")
