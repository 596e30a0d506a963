"""Large CPU buffers backed by transparent huge pages, to cut page-fault time.

The fast paths allocate a few whole-sequence buffers per call (G-LSTM's input-side map is
k × T·B × 4n/k floats: 84 MB at n = 2048, B = 128, T = 20). glibc serves allocations above
32 MB with a fresh mmap each time, and the first touch of each 4 KB page faults: measured on
a 2-core VM, 34 ms to allocate and fill 84 MB against 3 ms to refill a reused one, and an
input-side bmm went from 54 ms to 18 ms with the hint below. ``madvise(MADV_HUGEPAGE)`` on the
buffer's 2 MB-aligned interior makes that one fault per 2 MB. Buffers under 32 MB are reused
from glibc's heap without faults and are allocated normally. The C++ recurrence
(csrc/scan.cpp, ``empty_buffer``) applies the same rule to its own buffers.

FACTORLM_HUGEPAGES=0 turns the hint off; it is a no-op off Linux, on other devices, and where
the kernel has transparent huge pages disabled (madvise's error is ignored: it is only a hint).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

#: buffers at least this large get the hint (glibc's largest mmap threshold on 64-bit)
HUGE_BUFFER_BYTES = 32 << 20
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # from <linux/mman.h>
ENV = "FACTORLM_HUGEPAGES"

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


def empty(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """torch.empty(shape) with like's dtype and device, huge-page backed when large (see module doc)."""
    t = like.new_empty(shape)
    advise_hugepages(t)
    return t
