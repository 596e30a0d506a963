"""torchao, imported on demand: the optional extra ``quant`` (``pip install 'factorlm[quant]'``)."""

from __future__ import annotations

import importlib.util
import logging

from torch import Tensor, nn

from factorlm.errors import SetupError

#: the line every command prints when torchao is missing
MISSING = ("the int8 'torchao' backend needs torchao, which is not installed: pip install 'factorlm[quant]' "
           "(or use --backend native)")


def available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def require() -> None:
    """SetupError with the one line to install the extra, unless torchao can be imported."""
    if not available():
        raise SetupError(MISSING)


def quantized_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding ``weight`` (N, K), rewritten by torchao's ``quantize_`` with
    ``Int8DynamicActivationInt8WeightConfig``: per-row int8 weight, per-token dynamic int8 activation.

    The weight given is already on its int8 grid (q·s), so torchao's own quantization of it finds
    the same q and s again (to float rounding of the scale)."""
    require()
    # torchao logs a warning for every optional CUDA kernel library it cannot load on a CPU machine
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    linear.requires_grad_(False)
    quantize_(linear, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return linear
