"""Progress lines on stderr: quiet for short work, throttled, with rate and time left; the heartbeat."""

from __future__ import annotations

import io
import time

from factorlm.progress import Progress, format_duration, heartbeat


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 125, 3720, -3)] == ["0 s", "42 s", "2 min 05 s", "1 h 02 min", "0 s"]


def test_plain_lines_wait_for_the_delay_then_are_throttled():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(1000, "counting", unit="lines", delay=2.0, interval=5.0, stream=out, clock=clock)
    clock.now += 1.0
    bar.update(100)
    assert out.getvalue() == ""  # quick work shows nothing
    clock.now += 1.5
    bar.update(150)  # 250 lines in 2.5 s: 100 lines/s, 750 left -> 7.5 s (rounds to 8)
    assert out.getvalue() == "counting: 250 lines / 1,000 lines (25%), 100 lines/s, 8 s left\n"
    clock.now += 4.0
    bar.update(100)
    assert out.getvalue().count("\n") == 1  # within the 5 s interval
    clock.now += 1.0
    bar.update(50)
    assert out.getvalue().splitlines()[-1] == "counting: 400 lines / 1,000 lines (40%), 53 lines/s, 11 s left"  # 400 in 7.5 s
    clock.now += 2.0
    bar.close()
    assert out.getvalue().splitlines()[-1] == "counting: done, 400 lines in 10 s"


def test_a_phase_measures_its_rate_from_its_own_start():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(200, "eval, pass 1", unit="tokens", delay=0.0, interval=0.0, stream=out, clock=clock)
    clock.now += 1.0
    bar.update(100)  # fast: 100 tokens/s
    bar.phase("eval, tail", 300)
    clock.now += 10.0
    bar.update(50)  # slow: 5 tokens/s, 150 left -> 30 s
    assert out.getvalue().splitlines() == [
        "eval, pass 1: 100 tokens / 200 tokens (50%), 100 tokens/s, 1 s left",
        "eval, tail: 150 tokens / 300 tokens (50%), 5 tokens/s, 30 s left",
    ]


def test_bytes_unknown_totals_and_disabled():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(None, "reading", unit="B", delay=0.0, stream=out, clock=clock)
    clock.now += 2.0
    bar.update(3_000_000)
    assert out.getvalue() == "reading: 3.0 MB, 1.5 MB/s\n"
    silent = _Terminal()
    quiet = Progress(10, "x", enabled=False, delay=0.0, stream=silent, clock=clock)
    clock.now += 10
    quiet.update(5)
    quiet.close()
    assert silent.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    out = _Terminal()
    with Progress(10, "building", delay=0.0, stream=out) as bar:
        bar.update(4)
        bar.phase("building, stage 2", 20)
        bar.update(6)
    text = out.getvalue()  # tqdm redraws at most every 0.1 s: the last update may not be drawn
    assert text.startswith("\rbuilding:   0%") and "\rbuilding, stage 2:  20%" in text and " 4/20 " in text
    assert bar.done == 10 and bar._bar is None


def test_heartbeat_prints_while_the_block_runs_and_stops_after():
    out = io.StringIO()
    with heartbeat(lambda s: f"still working, {s:.1f} s", interval=0.02, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("still working, ") for line in lines)
    time.sleep(0.1)
    assert out.getvalue().splitlines() == lines  # the thread has stopped
    silent = io.StringIO()
    with heartbeat(lambda s: "x", interval=0.01, enabled=False, stream=silent):
        time.sleep(0.05)
    assert silent.getvalue() == ""


def test_building_a_vocabulary_shows_the_bytes_read(tmp_path, monkeypatch, capsys):
    import factorlm.data.corpus as corpus_module
    from factorlm.data import TextCorpus

    bars = []

    class Eager(Progress):  # print every update: this corpus is read in well under the usual 2 s delay
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "delay": 0.0, "interval": 0.0})
            bars.append(self)

    monkeypatch.setattr(corpus_module, "Progress", Eager)
    train = tmp_path / "train.txt"
    train.write_text("".join(f"w{i % 7} é x{i % 3}\n" for i in range(25_000)), encoding="utf-8")
    size = train.stat().st_size
    corpus = TextCorpus("tiny", {"train": [train]}, chunk_bytes=size // 3)
    assert corpus.vocab.counts[corpus.vocab.boundary_id] == 25_000
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("tiny: building the vocabulary from train: ") and " MB (" in lines[0]
    assert lines[-1].startswith(f"tiny: building the vocabulary from train: done, {size / 1e6:,.1f} MB in ")
    assert len(lines) >= 4  # three chunks, and updates within a chunk
    assert bars[0].total == bars[0].done == size
    list(corpus.words("train"))  # no description: no progress
    assert capsys.readouterr().err == ""
