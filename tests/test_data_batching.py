"""StreamBatcher (continuity, the documented layout, epoch ends, exact resume)
and split_stream."""

from __future__ import annotations

import io
import random

import pytest
import torch

from factorlm.data import ContiguousBatcher, StreamBatcher, stream_rows, open_corpus, split_stream
from factorlm.data.synthetic import SyntheticConfig, builtin_corpus

BOUNDARY = 0


def make_sentences(count: int, seed: int = 0) -> list[list[int]]:
    """Sentences with globally unique word ids (so a row's stream can be parsed back), ending with 0."""
    rng = random.Random(seed)
    sentences, next_id = [], 1
    for _ in range(count):
        n = rng.choice([0, 1, 2, 3, 7, 15])
        sentences.append(list(range(next_id, next_id + n)) + [BOUNDARY])
        next_id += n
    return sentences


def reference_rows(sentences, batch_size, num_steps):
    """Independent reference: each row's stream and the number of full batches, following the rule
    "before batch i, rows 0..B-1 in turn take the next sentences until they hold (i+1)T + 1 tokens"."""
    rows = [[BOUNDARY] for _ in range(batch_size)]
    it = iter(sentences)
    batches = 0
    while True:
        need = (batches + 1) * num_steps + 1
        for row in rows:
            while len(row) < need:
                s = next(it, None)
                if s is None:
                    return rows, batches
                row.extend(s)
        batches += 1


@pytest.mark.parametrize("batch_size, num_steps", [(1, 1), (3, 4), (4, 5), (8, 3)])
def test_rows_are_continuous_streams_of_whole_sentences(batch_size, num_steps):
    sentences = make_sentences(120, seed=batch_size)
    batcher = StreamBatcher(lambda e: iter(sentences), batch_size, num_steps, BOUNDARY)
    batches = list(batcher.epoch_batches(0))
    rows, count = reference_rows(sentences, batch_size, num_steps)
    assert len(batches) == count > 0
    for i, batch in enumerate(batches):
        assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (num_steps, batch_size)
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.mask.all()
        assert batch.num_tokens == num_steps * batch_size
        assert torch.equal(batch.inputs[1:], batch.targets[:-1])
        if i:  # row b of batch i continues row b of batch i - 1
            assert torch.equal(batch.inputs[0], batches[i - 1].targets[-1])
    assert torch.equal(batches[0].inputs[0], torch.zeros(batch_size, dtype=torch.int64))
    for b in range(batch_size):
        stream = torch.cat([x.inputs[:, b] for x in batches] + [batches[-1].targets[-1:, b]]).tolist()
        assert stream == rows[b][: len(stream)]
    # every sentence a row took appears whole and once, in iterator order across the rows' takes
    taken = sorted(w for row in rows for w in row if w != BOUNDARY)
    assert taken == list(range(1, len(taken) + 1))


def test_the_module_docstring_example():
    letters = ".abcdefghijk"
    lengths = [3, 1, 4, 2, 3, 5, 1, 2, 3, 2, 3]
    sentences = [[i + 1] * n + [0] for i, n in enumerate(lengths)]
    batcher = StreamBatcher(lambda e: iter(sentences), 3, 4, 0)
    batches = list(batcher.epoch_batches(0))
    pictured = [" | ".join(" ".join(letters[t] for t in batch.inputs[:, row].tolist()) for batch in batches[:3])
                for row in range(3)]
    assert pictured == [". a a a | . f f f | f f . i", ". b . c | c c c . | g . j j", ". d d . | e e e . | h h . k"]


def test_epoch_end_drops_the_partial_batch_and_next_epoch_starts_fresh():
    sentences = make_sentences(40)
    epochs = {0: sentences, 1: sentences[::-1]}
    batcher = StreamBatcher(lambda e: iter(epochs[e]), 4, 6, BOUNDARY)
    first = list(batcher.epoch_batches(0))
    assert len(first) == reference_rows(sentences, 4, 6)[1]
    state = batcher.state_dict()
    assert (state["epoch"], state["sentences_consumed"], state["batches"]) == (1, 0, 0)
    assert state["pending"] == [[BOUNDARY]] * 4
    second = list(batcher.epoch_batches(1))
    rows, count = reference_rows(sentences[::-1], 4, 6)
    assert len(second) == count
    assert second[0].inputs[:, 2].tolist() == rows[2][:6]


def copy_state(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_exact_resume_from_any_batch():
    corpus = builtin_corpus(SyntheticConfig(train_tokens=3_000, valid_tokens=100, test_tokens=100))

    def sentences(epoch):
        return corpus.sentences("train", shuffle=True, seed=3, epoch=epoch)

    reference = StreamBatcher(sentences, 5, 7, corpus.vocab.boundary_id)
    run = [(e, b) for e in range(2) for b in reference.epoch_batches(e)]
    assert len(run) > 100
    for stop in (0, 1, 17, len(run) // 2 - 1, len(run) // 2, len(run) - 2):
        first = StreamBatcher(sentences, 5, 7, corpus.vocab.boundary_id)
        done = 0
        for e in range(2):
            for _ in first.epoch_batches(e):
                done += 1
                if done == stop + 1:
                    break
            if done == stop + 1:
                break
        state = copy_state(first.state_dict())
        resumed = StreamBatcher(sentences, 5, 7, corpus.vocab.boundary_id)
        resumed.load_state_dict(state)
        rest = [(e, b) for e in range(state["epoch"], 2) for b in resumed.epoch_batches(e)]
        assert len(rest) == len(run) - stop - 1
        for (e1, b1), (e2, b2) in zip(rest, run[stop + 1:]):
            assert e1 == e2 and torch.equal(b1.inputs, b2.inputs) and torch.equal(b1.targets, b2.targets)


def test_abandoned_generator_continues_where_it_stopped():
    sentences = make_sentences(60)
    reference = list(StreamBatcher(lambda e: iter(sentences), 2, 5, BOUNDARY).epoch_batches(0))
    batcher = StreamBatcher(lambda e: iter(sentences), 2, 5, BOUNDARY)
    head = []
    for batch in batcher.epoch_batches(0):
        head.append(batch)
        if len(head) == 3:
            break
    tail = list(batcher.epoch_batches(0))
    assert [b.inputs.tolist() for b in head + tail] == [b.inputs.tolist() for b in reference]


def test_batcher_errors():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        StreamBatcher(lambda e: iter([]), 0, 5, BOUNDARY)
    bad = StreamBatcher(lambda e: iter([[1, 2, 0], [3, 4]]), 1, 5, BOUNDARY)
    with pytest.raises(ValueError, match=r"sentence 1 of epoch 0 does not end with the boundary id 0: \[3, 4\]"):
        list(bad.epoch_batches(0))
    small = StreamBatcher(lambda e: iter([[1, 0], [2, 0]]), 4, 5, BOUNDARY)
    with pytest.raises(ValueError, match="epoch 0 has 2 sentences, too few to fill one batch of 4 rows x 6 tokens"):
        list(small.epoch_batches(0))
    other = StreamBatcher(lambda e: iter([]), 4, 6, BOUNDARY)
    with pytest.raises(ValueError, match="the saved position has num_steps=5, this batcher has 6"):
        other.load_state_dict(StreamBatcher(lambda e: iter([]), 4, 5, BOUNDARY).state_dict())


def test_resume_detects_data_that_shrank():
    sentences = make_sentences(50)
    batcher = StreamBatcher(lambda e: iter(sentences), 2, 4, BOUNDARY)
    next(iter(batcher.epoch_batches(0)))
    state = batcher.state_dict()
    shrunk = StreamBatcher(lambda e: iter(sentences[:1]), 2, 4, BOUNDARY)
    shrunk.load_state_dict(state)
    consumed = state["sentences_consumed"]
    with pytest.raises(ValueError, match=f"consumed {consumed} sentences but the epoch now has fewer"):
        next(iter(shrunk.epoch_batches(0)))


# ------------------------------------------------------------- evaluation
@pytest.mark.parametrize("length, num_rows", [(2, 1), (2, 5), (11, 3), (100, 7), (64, 64), (10, 100), (101, 10)])
def test_stream_rows_cover_every_target_once(length, num_rows):
    stream = torch.arange(100, 100 + length)
    rows = stream_rows(stream, num_rows)
    targets = length - 1
    L, R = rows.inputs.shape
    assert rows.num_targets == targets and R <= min(num_rows, targets)
    assert L == -(-targets // R) and (R - 1) * L < targets <= R * L  # equal rows, only the last is short
    assert int(rows.mask.sum()) == targets and bool(rows.mask[:, :-1].all())
    # each target exactly once, in order, and each input is the token before its target
    assert rows.targets.t()[rows.mask.t()].tolist() == stream[1:].tolist()
    assert rows.inputs.t()[rows.mask.t()].tolist() == stream[:-1].tolist()


def test_stream_rows_of_the_docstring_picture():
    rows = stream_rows(torch.arange(11), 3)
    assert rows.inputs.t().tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]
    assert rows.mask.t().tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]


def test_stream_rows_errors():
    with pytest.raises(ValueError, match=r"stream must be a 1-D tensor of at least 2 tokens, got \(2, 2\)"):
        stream_rows(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"at least 2 tokens, got \(1,\)"):
        stream_rows(torch.zeros(1), 2)
    with pytest.raises(ValueError, match="num_rows must be an integer >= 1, got 0"):
        stream_rows(torch.zeros(5), 0)


def test_contiguous_batcher_is_batchify_and_resumes_exactly():
    stream = torch.arange(1, 104)  # 102 targets, B = 4 rows of 26, T = 10: batches of 10, 10, 6 steps
    batcher = ContiguousBatcher(lambda: stream, batch_size=4, num_steps=10)
    batches = list(batcher.epoch_batches(0))
    assert [b.inputs.shape[0] for b in batches] == [10, 10, 6]
    assert sum(b.num_tokens for b in batches) == 102
    row1 = torch.cat([b.inputs[:, 1] for b in batches])
    assert row1.tolist() == stream[26:52].tolist()  # row 1 is the second contiguous quarter
    assert batcher.state_dict()["epoch"] == 1
    again = ContiguousBatcher(lambda: stream, batch_size=4, num_steps=10)
    iterator = again.epoch_batches(0)
    next(iterator)
    saved = again.state_dict()
    resumed = ContiguousBatcher(lambda: stream, batch_size=4, num_steps=10)
    resumed.load_state_dict(saved)
    rest = list(resumed.epoch_batches(0))
    assert [b.inputs.tolist() for b in rest] == [b.inputs.tolist() for b in batches[1:]]
    with pytest.raises(ValueError, match="batch_size=4"):
        ContiguousBatcher(lambda: stream, batch_size=5, num_steps=10).load_state_dict(saved)


def test_split_stream_is_boundary_then_all_sentences(tmp_path):
    (tmp_path / "train.txt").write_text("a b\nc\n")
    (tmp_path / "valid.txt").write_text("b a a\n\nc z\n")
    (tmp_path / "test.txt").write_text("c\n")
    corpus = open_corpus(tmp_path)
    stream = split_stream(corpus, "valid")
    v = corpus.vocab
    expected = [v.boundary_id] + v.encode("b a a".split()) + [v.boundary_id, v.boundary_id] + [v.id("c"), v.unk_id,
                                                                                              v.boundary_id]
    assert stream.dtype == torch.int64 and stream.tolist() == expected
    assert stream.numel() == corpus.num_tokens("valid") + 1


def test_contiguous_ranks_side_by_side_are_one_process_with_all_rows():
    stream = torch.arange(1000)
    whole = ContiguousBatcher(lambda: stream, 6, 7)
    parts = [ContiguousBatcher(lambda: stream, 3, 7, rank=r, world_size=2) for r in range(2)]
    batches = list(whole.epoch_batches(0))
    per_rank = [list(p.epoch_batches(0)) for p in parts]
    assert all(len(b) == len(batches) for b in per_rank)  # every rank takes the same number of steps
    for i, batch in enumerate(batches):
        for field in ("inputs", "targets", "mask"):
            joined = torch.cat([getattr(per_rank[r][i], field) for r in range(2)], dim=1)
            assert torch.equal(joined, getattr(batch, field))
        assert sum(per_rank[r][i].num_tokens for r in range(2)) == batch.num_tokens
    assert parts[1].state_dict()["rank"] == 1


def test_contiguous_world_size_too_large_for_the_stream():
    batcher = ContiguousBatcher(lambda: torch.arange(10), 4, 3, rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"too few for batch_size 4 x world_size 4 = 16 rows"):
        next(batcher.epoch_batches(0))


def test_stream_batcher_ranks_read_disjoint_shares_of_the_corpus():
    corpus = builtin_corpus(SyntheticConfig(train_tokens=3_000, valid_tokens=100, test_tokens=100))
    ranks = [StreamBatcher.from_corpus(corpus, "train", 2, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    taken = [sum(1 for _ in ranks[r].epoch_batches(0)) for r in range(2)]
    assert min(taken) > 0
    shares = [list(corpus.sentences("train", shuffle=True, seed=3, epoch=0, rank=r, world_size=2)) for r in range(2)]
    whole = list(corpus.sentences("train", shuffle=True, seed=3, epoch=0))
    assert sorted(map(tuple, shares[0] + shares[1])) == sorted(map(tuple, whole))
    # a rank's first row starts with its own first sentence
    first = next(StreamBatcher.from_corpus(corpus, "train", 2, 5, seed=3, rank=1, world_size=2).epoch_batches(0))
    assert first.inputs[1 : len(shares[1][0]) + 1, 0].tolist() == shares[1][0][: first.inputs.shape[0] - 1]


@pytest.mark.parametrize("make", [
    lambda r, w: StreamBatcher(lambda e: iter(make_sentences(300)), 2, 4, BOUNDARY, rank=r, world_size=w),
    lambda r, w: ContiguousBatcher(lambda: torch.arange(500), 2, 4, rank=r, world_size=w),
], ids=["streams", "contiguous"])
def test_resume_refuses_another_rank_layout_and_reads_old_positions(make):
    saved = make(0, 1).state_dict()
    with pytest.raises(ValueError, match="saved position has world_size=1, this batcher has 2"):
        make(0, 2).load_state_dict(saved)
    old = {k: v for k, v in saved.items() if k not in ("rank", "world_size")}  # written before ranks existed
    make(0, 1).load_state_dict(old)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        make(2, 2)
