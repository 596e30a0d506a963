"""Which recurrence backend runs: the C++ extension when it builds, else plain PyTorch."""

from __future__ import annotations

from torch import Tensor

from factorlm.ops import _scan_torch, _extension

#: dtypes the C++ recurrence is compiled for; anything else (bf16, half) runs the PyTorch twin.
EXTENSION_DTYPES = ("torch.float32", "torch.float64")


def select(x: Tensor, use_extension: bool | None):
    """The module whose ``*_scan`` functions run the recurrence for input x.

    use_extension None: the extension for CPU float32/float64 when it is available, else the
    PyTorch twin. False: always the twin. True: the extension, or RuntimeError saying why not.
    """
    if use_extension is False:
        return _scan_torch
    supported = x.device.type == "cpu" and str(x.dtype) in EXTENSION_DTYPES
    if use_extension is None:
        return _extension.load() if supported and _extension.is_available() else _scan_torch
    if not supported:
        raise RuntimeError(
            f"the C++ recurrence runs CPU float32/float64 tensors only, got {x.dtype} on {x.device}"
        )
    module = _extension.load()
    if module is None:
        raise RuntimeError(f"the factorlm C++ extension is not available: {_extension.build_error()}")
    return module
