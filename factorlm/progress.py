"""Progress of long work on stderr: done / total, rate and time left.

On a terminal a tqdm bar; otherwise (a log file, CI) a plain line at most every ``interval`` seconds:

    valid, pass 2: 40,960 tokens / 73,760 tokens (56%), 12,345 tokens/s, 3 s left

Work that ends within ``delay`` seconds shows nothing, so quick calls stay quiet; ``enabled=False``
(``--quiet``) shows nothing at all. ``heartbeat`` is for work whose progress cannot be measured
(a compiler run): a line every few seconds saying how long it has been going.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

__all__ = ["Progress", "format_duration", "heartbeat"]


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s:02d} s" if m else f"{s} s"


def _amount(n: float, unit: str) -> str:
    return f"{n / 1e6:,.1f} MB" if unit == "B" else f"{n:,.0f} {unit}"


class Progress:
    """A progress display for ``total`` units of work (None: unknown total, no time left shown).

    update(n) after each piece of work; phase(desc, total) starts a new stage of the same work (the
    rate, and so the time left, is measured from the stage's start: stages can run at very different
    speeds); close() (or leaving the ``with`` block) prints the final line if anything was shown.
    stream: stderr by default; a terminal gets a tqdm bar. clock: for tests.
    """

    def __init__(self, total: float | None, desc: str, *, unit: str = "it", enabled: bool = True,
                 delay: float = 2.0, interval: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.delay, self.interval = enabled, delay, interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0.0
        self.start = self._phase_start = clock()
        self._phase_done = 0.0
        self._last_line: float | None = None  # when the last plain line was printed (None: never)
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", delay=delay, leave=False,
                             file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = self.clock()
            due = now - self.start >= self.delay if self._last_line is None else now - self._last_line >= self.interval
            if due:
                self._print(now)

    def phase(self, desc: str, total: float | None = None) -> None:
        """Go on under a new description (and total, counted from the start, when given)."""
        self.desc = desc
        if total is not None:
            self.total = total
        self._phase_start, self._phase_done = self.clock(), self.done
        if self._bar is not None:
            if total is not None:
                self._bar.total = total
            self._bar.set_description_str(desc, refresh=False)
            self._bar.refresh()

    def line(self, now: float | None = None) -> str:
        """The plain progress line at time ``now``."""
        now = self.clock() if now is None else now
        text = f"{self.desc}: {_amount(self.done, self.unit)}"
        if self.total:
            text += f" / {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        seconds = now - self._phase_start
        rate = (self.done - self._phase_done) / seconds if seconds > 0 else 0.0
        if rate > 0:
            text += f", {_amount(rate, self.unit)}/s"
            if self.total:
                text += f", {format_duration(max(0.0, self.total - self.done) / rate)} left"
        return text

    def _print(self, now: float) -> None:
        self._last_line = now
        print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last_line is not None:
            now = self.clock()
            print(f"{self.desc}: done, {_amount(self.done, self.unit)} in {format_duration(now - self.start)}",
                  file=self.stream, flush=True)
            self._last_line = None


@contextlib.contextmanager
def heartbeat(message: Callable[[float], str], *, interval: float = 15.0, enabled: bool = True,
              stream: TextIO | None = None) -> Iterator[None]:
    """While the block runs, print ``message(seconds so far)`` every ``interval`` seconds (a daemon thread)."""
    if not enabled:
        yield
        return
    out = stream if stream is not None else sys.stderr
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval):
            print(message(time.monotonic() - start), file=out, flush=True)

    thread = threading.Thread(target=beat, name="factorlm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
