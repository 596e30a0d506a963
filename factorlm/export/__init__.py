"""Deployment formats for a trained model (``factorlm export``).

streaming: the whole language model as one function of plain PyTorch ops, tokens and state in,
log-probabilities and state out, with each layer's time loop a scan (what exporters can trace);
onnx: that function as an ONNX graph (``to_onnx``) and its check in onnxruntime (``check_onnx``);
cli: the ``factorlm export`` command.
"""

from factorlm.export.onnx import check_onnx, to_onnx
from factorlm.export.streaming import StreamingLM

__all__ = ["StreamingLM", "check_onnx", "to_onnx"]
