"""int8 inference and quantization-aware training for every factorlm layer type (README, "int8").

    from factorlm.quant import quantize_model, enable_qat
    int8_model = quantize_model(float_model, backend="native")   # or "torchao" (the extra 'quant')
    enable_qat(model)      # fake-quantized forward, straight-through gradients (TrainConfig.qat)

Modules: int8 (the arithmetic), fake (fake quantization), layers (every cell type's int8 and
fake-quantized layer), model (the int8 LanguageModel), qat, checkpoint (saving and loading int8
runs), cli (``factorlm compress quantize``). torchao is imported only when the "torchao" backend runs.
"""

from factorlm.quant.model import QuantizedLanguageModel, quantize_model
from factorlm.quant.qat import disable_qat, enable_qat

__all__ = ["QuantizedLanguageModel", "quantize_model", "enable_qat", "disable_qat"]
