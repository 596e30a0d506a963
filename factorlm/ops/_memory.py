"""The fast paths' large CPU buffers: reused from a pool, backed by transparent huge pages.

Each call of a fast path allocates a few whole-sequence buffers (F-LSTM's gates are
T·B × 4n floats: 84 MB at n = 2048, B = 128, T = 20; its backward as many again). Fresh memory
costs a page fault per 4 KB page on first touch, and the kernel zeroes every page it hands
out. glibc serves allocations above 32 MB with a fresh mmap each time, and smaller ones from a
heap whose top it returns to the kernel once more than ~64 MB lies free there, which is what a
dense layer's backward leaves behind. So a layer's time came to depend on what ran before it:
F-LSTM r=256 at p=256, n=2048, B=128 (one core, AVX-512 Xeon) took 350 ms called back to back
and 350-610 ms called after a torch.nn.LSTM, the same layer with no fresh pages at all 320-330 ms
either way (benchmarks/layer_speed.py --mode both shows both).

**The pool.** Buffers of at least :data:`POOL_MIN_BYTES` on the CPU come from a per-process pool
of flat byte buffers, as CUDA's caching allocator does for GPU memory: a request takes the
smallest free entry that fits (and wastes at most a quarter of it), else a new entry is
allocated. An entry is free when nothing but the pool refers to its storage: once the views
handed out (outputs, tensors saved for the backward, scratch) are all gone, it is reused without
a single fault. The pool holds at most :func:`capacity` bytes (FACTORLM_BUFFER_POOL_MB, default a
quarter of physical memory); past that, free entries are dropped, largest first, and a request
that still does not fit is allocated outside the pool. :func:`release` empties it.
FACTORLM_BUFFER_POOL_MB=0 turns the pool off.

**Huge pages.** ``madvise(MADV_HUGEPAGE)`` on a new buffer of 32 MB or more makes its first
touch one fault per 2 MB instead of per 4 KB (measured on a 2-core VM: an input-side bmm into a
fresh 84 MB buffer went from 54 ms to 18 ms). FACTORLM_HUGEPAGES=0 turns the hint off; it is a
no-op off Linux, on other devices, and where the kernel has transparent huge pages disabled
(madvise's error is ignored: it is only a hint).

The C++ recurrence (csrc/scan.cpp, ``empty_buffer``) takes its large buffers from :func:`empty`
too, so both time loops share one pool.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Callable

import torch

#: buffers at least this large get the huge-page hint (glibc's largest mmap threshold on 64-bit)
HUGE_BUFFER_BYTES = 32 << 20
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # from <linux/mman.h>
ENV = "FACTORLM_HUGEPAGES"

#: buffers at least this large come from the pool; smaller ones glibc's heap serves without faults
POOL_MIN_BYTES = 1 << 20
POOL_ENV = "FACTORLM_BUFFER_POOL_MB"
#: pool entries are whole multiples of this (a huge page), so that sizes that differ a little
#: (another sequence length, batch) share entries
POOL_GRANULE = 2 << 20

_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(ENV, "1") != "0"


def advise_hugepages(t: torch.Tensor) -> bool:
    """Hint huge pages for a fresh, untouched CPU tensor's memory; True if the hint was given."""
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_BUFFER_BYTES or not t.is_cpu or not enabled():
        return False
    madvise = _libc_madvise()
    if not madvise:
        return False
    first = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    last = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    return last > first and madvise(first, last - first, _MADV_HUGEPAGE) == 0


def _storage_use_count() -> Callable[[torch.Tensor], int] | None:
    """How many references a tensor's storage has (tensors and views sharing it, plus the one
    Python storage object this asks through), or None where this torch has no way to ask."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return lambda t: count(t.untyped_storage()._cdata)


def capacity() -> int:
    """The most bytes the pool keeps: FACTORLM_BUFFER_POOL_MB MiB, default a quarter of physical
    memory. ValueError naming the value when it is not a whole number >= 0."""
    text = os.environ.get(POOL_ENV)
    if text is None or text == "":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a fixed 2 GiB
            return 2 << 30
    try:
        mib = int(text)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"{POOL_ENV} must be a whole number of MiB >= 0 (0 turns the pool off), got {text!r}")
    return mib << 20


class BufferPool:
    """Flat uint8 CPU buffers handed out as typed views and taken back once nothing else refers to
    them (see the module docstring). Thread-safe; one per process (:data:`POOL`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[torch.Tensor] = []
        self._use_count = _storage_use_count()

    @property
    def held_bytes(self) -> int:
        return sum(e.numel() for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _free(self, entry: torch.Tensor) -> bool:
        # the pool's own tensor and the storage object the count is asked through: nothing else
        return self._use_count(entry) <= 2

    def take(self, nbytes: int, limit: int) -> torch.Tensor | None:
        """A free entry of at least ``nbytes`` bytes (a new one if none fits), or None when the
        pool cannot hold one within ``limit`` bytes or cannot tell free entries (old torch)."""
        if self._use_count is None:
            return None
        size = -(-nbytes // POOL_GRANULE) * POOL_GRANULE
        with self._lock:
            best = None
            for entry in self._entries:  # the smallest free entry that fits and wastes at most a quarter
                if size <= entry.numel() <= size + size // 4 and (best is None or entry.numel() < best.numel()) \
                        and self._free(entry):
                    best = entry
            if best is not None:
                return best
            held = self.held_bytes
            if held + size > limit:  # make room: drop free entries, largest first
                for entry in sorted(self._entries, key=lambda e: -e.numel()):
                    if held + size <= limit:
                        break
                    if self._free(entry):  # by identity: list.remove would compare tensors with ==
                        self._entries = [e for e in self._entries if e is not entry]
                        held -= entry.numel()
                if held + size > limit:
                    return None
            entry = torch.empty(size, dtype=torch.uint8)
            advise_hugepages(entry)
            self._entries.append(entry)
            return entry

    def release(self) -> int:
        """Drop every free entry (the kernel gets their memory back); returns the bytes dropped.
        Entries still in use stay, and are reused later."""
        with self._lock:
            free = [e for e in self._entries if self._free(e)]
            self._entries = [e for e in self._entries if not self._free(e)]
            return sum(e.numel() for e in free)


POOL = BufferPool()


def release() -> int:
    """Give the pool's free buffers back to the kernel; returns how many bytes that was."""
    return POOL.release()


def empty(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """torch.empty(shape) with like's dtype and device; on the CPU, from the pool when large and
    otherwise huge-page backed when large (see the module docstring). Contents are undefined:
    a pooled buffer holds whatever its last user wrote."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * like.element_size()
    if nbytes >= POOL_MIN_BYTES and like.device.type == "cpu":
        limit = capacity()
        entry = POOL.take(nbytes, limit) if limit > 0 else None
        if entry is not None:
            return entry[:nbytes].view(like.dtype).view(shape)
    t = like.new_empty(shape)
    advise_hugepages(t)
    return t
