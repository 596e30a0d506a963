"""An exported streaming graph in onnxruntime: int8 weights for it, and the calls evaluation makes.

    quantize_onnx(src, dst)              onnxruntime's dynamic int8 quantization of a graph written
                                         by :func:`factorlm.export.to_onnx` (every MatMul, the ones
                                         inside each layer's Scan included)
    model = OnnxLanguageModel(path)      the graph behind the calls factorlm.evaluate makes of a
                                         LanguageModel: init_state(B), model(tokens, state),
                                         loss(...), log_probs(...)
    evaluate_stream(model, stream)       its exact perplexity, as for the PyTorch model

A graph exported with its vocabulary (``factorlm export onnx`` keeps it in the metadata) is also
what factorlm.runs.load_model returns for a ``.onnx`` path, so ``factorlm evaluate``, ``score``
and ``generate`` take ``--checkpoint model.onnx``.

int8 here is onnxruntime's, not factorlm.quant's: weights int8 per output column (``per_channel``),
activations uint8 with one scale per tensor computed at run time (DynamicQuantizeLinear: per
call of a product, so per time step inside a Scan, shared by the batch's rows), products through
MatMulInteger with int32 accumulation and the gate math in float32. factorlm.quant's PyTorch int8
scales activations per token; the two round differently, so a QAT run (trained on factorlm.quant's
rounding) matches factorlm.quant's int8 model, not this one.

Needs the ``onnx`` extra (onnxruntime, and onnx for the quantizer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from factorlm.data import Vocabulary
from factorlm.export.onnx import CHECK_MODULES, EXPORT_MODULES, INPUT_NAMES, OUTPUT_NAMES, VOCAB_KEY, require
from factorlm.models import ModelConfig

__all__ = ["quantize_onnx", "OnnxLanguageModel", "onnx_session"]


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, *, per_channel: bool = True) -> Path:
    """Write ``dst``: the graph at ``src`` (from :func:`factorlm.export.to_onnx`) with every
    matrix product's weight in int8 (per output column with ``per_channel``, else one scale per
    matrix) and its activations quantized dynamically (module doc); the embedding table is stored
    in int8 too. The metadata (model config, input and output layout) is kept. Returns ``dst``.

    The subgraphs are quantized as well (onnxruntime's ``EnableSubgraph``): each layer's time loop
    is a Scan, and its per-step products are where the recurrent weights live."""
    require(EXPORT_MODULES + CHECK_MODULES, "int8 ONNX")
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize_onnx: the int8 graph needs its own file, not the source {src}")
    # the quantizer advises "pre-processing" (shape inference) on every call: our graphs carry their
    # shapes from torch.onnx, and the advice is a root-logger warning, so it is silenced here
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, per_channel=per_channel, weight_type=QuantType.QInt8,
                         extra_options={"EnableSubgraph": True})
    finally:
        root.setLevel(level)
    return dst


def onnx_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU InferenceSession of ``path`` with ``threads`` intra-op threads (None:
    torch's current thread count, so that the two are compared alike)."""
    require(CHECK_MODULES, "running an ONNX graph")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


class OnnxLanguageModel:
    """A streaming graph written by :func:`factorlm.export.to_onnx` (float or int8), run in
    onnxruntime behind the calls that :func:`factorlm.evaluate.evaluate_stream` and a generation
    loop make of a LanguageModel. The "hidden" it returns is already the log-probabilities
    (T, B, V): the graph ends in the log-softmax. onnxruntime runs on the CPU; the outputs are put
    on the device of the tokens given. Inference only (``train(True)`` is refused).

    config: the ModelConfig kept in the graph's metadata; vocab: the Vocabulary kept there, or
    None when it was exported without one.
    """

    training = False

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        require(CHECK_MODULES, "running an ONNX graph")  # before the try: a missing extra is its own error
        try:
            self.session = onnx_session(self.path, threads=threads)
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{self.path} is not an ONNX graph onnxruntime can load ({text})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "factorlm.model_config" not in metadata:
            raise ValueError(f"{self.path} was not written by factorlm export (no factorlm.model_config in its "
                             f"metadata)")
        self.config = ModelConfig.from_dict(json.loads(metadata["factorlm.model_config"]))
        self.vocab = Vocabulary.from_dict(json.loads(metadata[VOCAB_KEY])) if VOCAB_KEY in metadata else None
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if tuple(names[0]) != INPUT_NAMES or tuple(names[1]) != OUTPUT_NAMES:
            raise ValueError(f"{self.path}: inputs {names[0]} and outputs {names[1]}; expected {list(INPUT_NAMES)} "
                             f"and {list(OUTPUT_NAMES)}")

    def eval(self) -> "OnnxLanguageModel":
        return self

    def train(self, mode: bool = True) -> "OnnxLanguageModel":
        if mode:
            raise RuntimeError(f"{self.path} is an onnxruntime graph: inference only")
        return self

    def parameters(self):
        """No trainable parameters; yields one empty CPU tensor, so that callers that find a model's
        device from its first parameter (evaluate, score, generate without a device) find the CPU."""
        yield torch.empty(0)

    def init_state(self, batch_size: int, device=None) -> tuple[Tensor, Tensor]:
        """Zeros: h (L, B, p), c (L, B, n) float32 (on ``device``)."""
        config = self.config
        L = config.num_layers
        return (torch.zeros(L, batch_size, config.output_size, device=device),
                torch.zeros(L, batch_size, config.hidden_size, device=device))

    def __call__(self, tokens: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """tokens (T, B) int64, state (h, c) -> (log_probs (T, B, V), (h_n, c_n)), float32 tensors
        on the device of ``tokens``."""
        h, c = state
        feed = {"tokens": np.ascontiguousarray(tokens.cpu().numpy(), dtype=np.int64),
                "h_0": np.ascontiguousarray(h.detach().float().cpu().numpy()),
                "c_0": np.ascontiguousarray(c.detach().float().cpu().numpy())}
        log_probs, h_n, c_n = (torch.from_numpy(a).to(tokens.device) for a in self.session.run(list(OUTPUT_NAMES), feed))
        return log_probs, (h_n, c_n)

    forward = __call__

    def log_probs(self, hidden: Tensor) -> Tensor:
        return hidden

    def loss(self, hidden: Tensor, targets: Tensor, sampled: bool = False) -> Tensor:
        """Negative log-likelihood (T, B) of ``targets`` (T, B) under ``hidden`` = log_probs (T, B, V)."""
        return -hidden.gather(-1, targets.unsqueeze(-1).to(torch.int64)).squeeze(-1)
