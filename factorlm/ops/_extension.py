"""Builds, caches and loads the C++ recurrence (csrc/scan.cpp, csrc/diagonal_scan.cpp); falls back cleanly without it.

The extension is compiled on first use with torch.utils.cpp_extension (gcc + ninja, ~1 minute on
2 cores) and cached by PyTorch under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
so later processes load it in well under a second. If there is no compiler, the build fails, or
FACTORLM_NO_EXTENSION=1 is set, :func:`load` returns None: impl="auto" then runs the pure-PyTorch
twin (factorlm.ops._scan_torch), which computes the same thing with more per-step overhead, and
impl="extension" raises, saying why (:mod:`factorlm.ops._backend` makes that choice).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from factorlm.machine import cpu_capability
from factorlm.progress import heartbeat

SOURCE = Path(__file__).resolve().parent / "csrc" / "scan.cpp"
#: every source of the module, compiled as ONE translation unit in this order (load_inline joins
#: them): diagonal_scan.cpp uses scan.cpp's includes and vectorisable sigmoid / tanh_
SOURCES = [SOURCE, SOURCE.parent / "diagonal_scan.cpp"]
FUNCTIONS = ["flstm_forward_scan", "flstm_backward_scan", "glstm_forward_scan", "glstm_backward_scan",
             "gflstm_forward_scan", "gflstm_backward_scan", "diagonal_forward_scan", "diagonal_backward_scan"]
DISABLE_ENV = "FACTORLM_NO_EXTENSION"

# SIMD flags per CPU capability as PyTorch detects it; the capability is part of the module
# name, so a cache shared between different machines never loads code built for wider SIMD.
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

# -fopenmp-simd: the gate loops' `omp simd`. -fno-trapping-math: the clamp in fast_exp is a
# conditional, and GCC will not turn a float comparison into a vector blend while comparisons may
# trap; with trapping maths on, the whole gate loop stayed scalar (~25 ns a cell instead of ~1).
# NaNs still propagate (a NaN fails both comparisons) and nothing here reads the FP exception flags.
_BASE_FLAGS = ["-fopenmp-simd", "-fno-trapping-math"]

# at::parallel_for is a header template that only forks when the extension itself is compiled with
# OpenMP; without it the gate loops ran on one thread. The module then needs libgomp.so.1, which
# resolves to the copy the torch wheel has already loaded (same soname), so there is one OpenMP
# runtime and one thread pool. Linux only: Apple's clang has no -fopenmp.
_THREAD_FLAGS = ("-fopenmp",)

_module = None
_error: str | None = None
_tried = False


def _build():
    """The module built with OpenMP threads where the platform has them, else (or if that build
    fails, e.g. a toolchain without libgomp) single-threaded: slower gate loops, same results."""
    if sys.platform.startswith("linux"):
        try:
            return _build_with(_THREAD_FLAGS)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            warnings.warn(f"factorlm: the threaded C++ recurrence could not be built "
                          f"({lines[-1] if lines else type(exc).__name__}); building it single-threaded",
                          RuntimeWarning, stacklevel=3)
    return _build_with([])


def _build_with(threads: tuple[str, ...] | list[str]):
    from torch.utils import cpp_extension

    source = "\n".join(path.read_text() for path in SOURCES)
    capability = cpu_capability()  # "DEFAULT" (the baseline ISA) where torch cannot say
    flags = ["-O3", *_BASE_FLAGS, *_ARCH_FLAGS.get(capability, []), *threads]
    digest = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:10]
    name = f"factorlm_scan_{capability.lower()}_{digest}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    _remove_stale_lock(build_dir / "lock")
    compiling = not list(build_dir.glob(f"{name}*.so"))
    if compiling:  # a silent minute-long pause would look like a hang
        print(f"factorlm: compiling the C++ recurrence for F-LSTM/G-LSTM into {build_dir} "
              f"(first use only, about a minute)", file=sys.stderr, flush=True)
    with heartbeat(lambda s: f"factorlm: still compiling the C++ recurrence, {s:.0f} s (usually about a minute)",
                   enabled=compiling):
        return cpp_extension.load_inline(
            name=name,
            cpp_sources=[source],
            functions=FUNCTIONS,
            # copies: load_inline appends torch's libraries to the lists it is given, and the
            # module-level _THREAD_FLAGS growing on every load changed the digest, so each reload
            # in a process (tests reset the extension) compiled the whole module again (~30 s)
            extra_cflags=list(flags),
            extra_ldflags=list(threads),
            verbose=False,
        )


#: A build lock older than this was left by a build that was killed (PyTorch would wait on it forever).
STALE_LOCK_SECONDS = 600


def _remove_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"factorlm: removing the stale build lock {lock} ({age:.0f} s old, left by an "
                      f"interrupted build)", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


def load():
    """The compiled module, building it on first call; None when it cannot be had (see build_error)."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if disabled():
        _error = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return None
    try:
        _module = _build()
    except Exception as exc:  # no compiler, no ninja, missing headers, compile error: fall back
        lines = str(exc).strip().splitlines()  # compiler errors are long: keep the last line
        _error = f"{type(exc).__name__}: {lines[-1] if lines else repr(exc)}"
        warnings.warn(
            f"factorlm: the C++ recurrence could not be built ({_error}); F-LSTM/G-LSTM fall back to "
            f"the slower pure-PyTorch path (`factorlm doctor` reports what runs where)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def disabled() -> bool:
    """True when FACTORLM_NO_EXTENSION asks not to build or use the extension (any value but "" or "0")."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def is_available() -> bool:
    """True when the C++ recurrence is (or can be) loaded; builds it on the first call."""
    return load() is not None


def module_path() -> str | None:
    """The loaded module's shared library (None when it is not loaded)."""
    return None if _module is None else getattr(_module, "__file__", None)


def build_error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried yet)."""
    return _error


def reset() -> None:
    """Forget the load attempt, so the next :func:`load` tries again (tests use this)."""
    global _module, _error, _tried
    _module, _error, _tried = None, None, False
