"""Deployment formats for a trained model (``factorlm export``).

streaming: the whole language model as one function of plain PyTorch ops, tokens and state in,
log-probabilities and state out, with each layer's time loop a scan (what exporters can trace);
onnx: that function as an ONNX graph (``to_onnx``) and its check in onnxruntime (``check_onnx``);
runtime: a written graph in onnxruntime: its int8 twin (``quantize_onnx``) and the calls
evaluation makes of a model (``OnnxLanguageModel``);
cli: the ``factorlm export`` command.
"""

from factorlm.export.onnx import check_onnx, to_onnx
from factorlm.export.runtime import OnnxLanguageModel, quantize_onnx
from factorlm.export.streaming import StreamingLM

__all__ = ["OnnxLanguageModel", "StreamingLM", "check_onnx", "quantize_onnx", "to_onnx"]
