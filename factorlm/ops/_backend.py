"""The one place that chooses which time loop runs a fast F-LSTM / G-LSTM / G∘F-LSTM layer.

``impl`` values, as the functions of :mod:`factorlm.ops` take them (layers add "reference", the
per-step oracle of factorlm.nn.reference, which needs no time loop):

    "torch"      the PyTorch time loop with the plain-PyTorch cell; any device and dtype.
    "extension"  the C++ time loop (csrc/scan.cpp); CPU float32/float64 only. RuntimeError saying
                 why when the tensors are elsewhere or the extension cannot be built (no compiler,
                 a failed build, or FACTORLM_NO_EXTENSION=1, which forbids building it).
    "triton"     the PyTorch time loop with the fused Triton cell kernels; CUDA tensors, or CPU
                 tensors under TRITON_INTERPRET=1 (Triton's interpreter). RuntimeError saying why
                 when Triton is not installed or the tensors are on the CPU without the interpreter.
    "auto"       the default: "extension" for CPU float32/float64 when it is available, else
                 "triton" for CUDA tensors when Triton is installed, else "torch". Environment
                 variables steer it: FACTORLM_NO_EXTENSION=1 keeps it off the extension;
                 FACTORLM_TRITON=0 keeps it off Triton, FACTORLM_TRITON=1 picks Triton on any device
                 (with TRITON_INTERPRET=1, how the tests run the kernels on a CPU).

"fast", the name "auto" had before there was a choice, is accepted with a DeprecationWarning.
Every loop computes the same function; they differ in speed and in where they run.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from factorlm.ops import _extension, _scan_torch, _triton_cells

#: What factorlm.ops functions accept for ``impl`` (see the module doc).
IMPLEMENTATIONS = ("torch", "extension", "triton", "auto")
#: Old names still accepted, each with a DeprecationWarning, and what they mean now.
DEPRECATED_IMPLEMENTATIONS = {"fast": "auto"}

TRITON_ENV = "FACTORLM_TRITON"
INTERPRET_ENV = "TRITON_INTERPRET"
#: dtypes the C++ recurrence is compiled for; anything else (bf16, half) needs another loop.
EXTENSION_DTYPES = (torch.float32, torch.float64)


class Recurrence(NamedTuple):
    """One time loop: its name ("torch", "extension" or "triton") and its scan functions, with
    the signatures documented in :mod:`factorlm.ops._scan_torch`."""

    name: str
    flstm_forward_scan: Callable
    flstm_backward_scan: Callable
    glstm_forward_scan: Callable
    glstm_backward_scan: Callable
    gflstm_forward_scan: Callable
    gflstm_backward_scan: Callable


def _pytorch_loop(name: str, cell_math: _scan_torch.CellMath) -> Recurrence:
    scans = {f: functools.partial(getattr(_scan_torch, f), cell_math=cell_math) for f in Recurrence._fields[1:]}
    return Recurrence(name, **scans)


#: The fused Triton kernels: one launch a step each way, nothing to prepare for the backward.
TRITON_CELL_MATH = _scan_torch.CellMath(_triton_cells.cell_forward, _triton_cells.cell_backward)
TORCH_LOOP = _pytorch_loop("torch", _scan_torch.TORCH_CELL_MATH)
TRITON_LOOP = _pytorch_loop("triton", TRITON_CELL_MATH)


def check_impl(impl, allowed: tuple[str, ...] = IMPLEMENTATIONS, what: str = "impl", stacklevel: int = 2) -> str:
    """``impl`` if it is one of ``allowed``; "auto" for the deprecated "fast" (with a warning at
    ``stacklevel`` above the caller); else ValueError naming the bad value and the allowed ones."""
    if impl in allowed:  # the common case first: this runs at every layer call
        return impl
    if isinstance(impl, str) and DEPRECATED_IMPLEMENTATIONS.get(impl) in allowed:
        new = DEPRECATED_IMPLEMENTATIONS[impl]
        warnings.warn(f"{what}={impl!r} is deprecated, use {new!r} (the same choice)", DeprecationWarning,
                      stacklevel=stacklevel + 1)
        return new
    if not isinstance(impl, str) or impl not in allowed:
        hint = ""
        if impl == "reference" and "reference" not in allowed:
            hint = ("; 'reference' (the per-step oracle) is chosen on a layer: layer.impl = 'reference' or "
                    "factorlm.nn.set_impl(module, 'reference')")
        raise ValueError(f"{what} must be one of {allowed}, got {impl!r}{hint}")
    return impl


def select(x: Tensor, impl: str = "auto") -> Recurrence:
    """The time loop that runs ``impl`` (see the module doc) for input x (T, B, p_in).

    Raises ValueError for an unknown impl, RuntimeError when the asked-for loop cannot run x.
    """
    impl = check_impl(impl, stacklevel=3)
    if impl == "auto":
        impl = _auto_choice(x)
    if impl == "extension":
        return _extension_loop(x)
    if impl == "triton":
        return _triton_loop(x)
    return TORCH_LOOP


def runs_torch_loop(x: Tensor, impl: str, extension: bool = True) -> bool:
    """Whether ``impl`` (already checked: one of IMPLEMENTATIONS) runs the plain PyTorch loop for
    x, without building anything or raising: what a caller with a cheaper path for that loop asks
    (the layers' single-step path). ``extension``: whether the cell has a C++ loop "auto" may pick."""
    return impl == "torch" or (impl == "auto" and _auto_choice(x, extension) == "torch")


def _auto_choice(x: Tensor, extension: bool = True) -> str:
    # is_available() may build the extension (first use): only ask when it could run x
    if extension and _extension_supports(x) and _extension.is_available():
        return "extension"
    triton_mode = os.environ.get(TRITON_ENV, "auto")
    if _triton_cells.available() and triton_mode != "0" and (triton_mode == "1" or x.device.type == "cuda"):
        return "triton"
    return "torch"


def _extension_supports(x: Tensor) -> bool:
    return x.is_cpu and x.dtype in EXTENSION_DTYPES


def _extension_loop(x: Tensor) -> Recurrence:
    if not _extension_supports(x):
        raise RuntimeError(
            f"impl='extension': the C++ recurrence runs CPU float32/float64 tensors only, got {x.dtype} "
            f"on {x.device}; use impl='auto' or 'torch'"
        )
    module = _extension.load()
    if module is None:
        raise RuntimeError(f"impl='extension': the factorlm C++ extension is not available: {_extension.build_error()}")
    return _extension_recurrence(module)


@functools.lru_cache(maxsize=4)  # one per loaded module (tests reload it)
def _extension_recurrence(module) -> Recurrence:
    return Recurrence("extension", **{f: getattr(module, f) for f in Recurrence._fields[1:]})


def _triton_loop(x: Tensor) -> Recurrence:
    if not _triton_cells.available():
        raise RuntimeError("impl='triton': Triton is not installed (pip install -e \".[gpu]\" adds it); "
                           "use impl='auto' or 'torch'")
    if x.device.type != "cuda" and os.environ.get(INTERPRET_ENV) != "1":
        raise RuntimeError(
            f"impl='triton': the Triton cell kernels run CUDA tensors (or CPU tensors under "
            f"{INTERPRET_ENV}=1, Triton's interpreter), got {x.dtype} on {x.device}; use impl='auto' or 'torch'"
        )
    return TRITON_LOOP
