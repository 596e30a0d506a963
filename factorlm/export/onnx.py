"""ONNX export of a whole language model as a streaming graph, and its check in onnxruntime.

The graph (opset 18) is :class:`factorlm.export.streaming.StreamingLM`:

    inputs   tokens (T, B) int64, h_0 (L, B, p) float32, c_0 (L, B, n) float32
    outputs  log_probs (T, B, V) float32 (natural log), h_n (L, B, p), c_n (L, B, n)

T and B are free (each layer's time loop is one ONNX Scan), so a caller feeds a stream in chunks
of any length, each with the h_n, c_n of the chunk before (zeros at the start), and gets what one
pass over the stream gives. The model is exported in eval mode (no dropout) in float32.

Needs the ``onnx`` extra (onnx and onnxscript for the export, onnxruntime for the check):
without it the functions raise :class:`factorlm.errors.SetupError` saying which to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from factorlm.data import Vocabulary
from factorlm.errors import SetupError
from factorlm.export.streaming import StreamingLM
from factorlm.models.lm import LanguageModel
from factorlm.validate import check_int

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "OPSET", "to_onnx", "check_onnx", "require"]

INPUT_NAMES = ("tokens", "h_0", "c_0")
OUTPUT_NAMES = ("log_probs", "h_n", "c_n")
#: the opset written: torch.onnx's own (torch 2.13). No other is offered: its conversion to opset 17
#: gave a Scan that onnxruntime refused, and older ones failed to convert (onnx 1.23)
OPSET = 18
#: the metadata key of the vocabulary (Vocabulary.to_dict as JSON), when the export was given one
VOCAB_KEY = "factorlm.vocab"
#: what ``pip install 'factorlm[onnx]'`` installs: the modules the export and the check import
EXPORT_MODULES = ("onnx", "onnxscript")
CHECK_MODULES = ("onnxruntime",)


def require(modules: Sequence[str], purpose: str) -> None:
    """SetupError naming the extra unless every module in ``modules`` can be imported."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SetupError(f"{purpose} needs {' and '.join(missing)}: install the extra with "
                         f"pip install 'factorlm[onnx]'")


def to_onnx(model: LanguageModel, path: str | os.PathLike, *, vocab: Vocabulary | None = None,
            verbose: bool = False) -> Path:
    """Write ``model`` (a factorlm LanguageModel, any registered cell type) to ``path`` as a streaming
    ONNX graph (module doc); returns the path.

    The model is traced in eval mode and float32 on the CPU (a copy where it is elsewhere or in
    another dtype; otherwise the model itself, its impl and training mode given back afterwards).
    Weights of more than 2 GB go to a data file beside ``path``, as ONNX requires.
    ``verbose`` shows torch.onnx's progress lines. The ONNX model's metadata holds the
    model config (``factorlm.model_config``, JSON), the input and output layout and, when given,
    the ``vocab`` (``factorlm.vocab``, JSON), so that ``factorlm evaluate``, ``score`` and
    ``generate`` can read the file like a run (factorlm.runs.load_model).
    """
    require(EXPORT_MODULES, "ONNX export")
    if not isinstance(model, LanguageModel):
        raise TypeError(f"to_onnx expects a factorlm LanguageModel, got {type(model).__name__}")
    path = Path(path)
    weight = model.embedding.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        model = _cpu_float_copy(model)
    config = model.config
    L, p, n = config.num_layers, config.output_size, config.hidden_size
    T, B = _example_sizes(model)
    tokens = torch.zeros(T, B, dtype=torch.int64)
    h0, c0 = torch.zeros(L, B, p), torch.zeros(L, B, n)
    time, batch = torch.export.Dim("time"), torch.export.Dim("batch")
    dynamic = {"tokens": {0: time, 1: batch}, "h0": {1: batch}, "c0": {1: batch}}
    was_training = model.training
    try:
        # no_grad: with autograd on, torch.onnx's type-promotion pass runs the scan through its
        # autograd rule, which fails on a symbolic T
        with _quiet(verbose), torch.no_grad():
            program = torch.onnx.export(StreamingLM(model).eval(), (tokens, h0, c0), dynamo=True,
                                        dynamic_shapes=dynamic, input_names=list(INPUT_NAMES),
                                        output_names=list(OUTPUT_NAMES), opset_version=OPSET, optimize=True,
                                        verbose=verbose)
    finally:
        model.train(was_training)
    _check_free_sizes(program.model, path)
    program.model.metadata_props.update(_metadata(model, vocab))
    program.save(path)
    return path


def _check_free_sizes(graph, path) -> None:
    """RuntimeError unless T and B are free in the written graph's inputs (a tracer that fixed one
    would give a graph that refuses every other chunk length or batch size, and a check at the
    example's own sizes would not see it)."""
    free = {"tokens": (0, 1), "h_0": (1,), "c_0": (1,)}
    for value in graph.graph.inputs:  # an onnx_ir model: a fixed axis is an int, a free one a symbol
        dims = list(value.shape)
        fixed = [axis for axis in free.get(value.name, ()) if isinstance(dims[axis], int)]
        if fixed:
            raise RuntimeError(f"to_onnx: the export fixed axis {fixed[0]} of {value.name} to {dims[fixed[0]]}, "
                               f"so {path} would refuse other sizes; please report it")


def _example_sizes(model: LanguageModel) -> tuple[int, int]:
    """(T, B) of the example inputs the export traces: each 2 or more (0 and 1 specialise) and
    unlike every fixed size of the model and each other. An example B equal to the layer count
    (h_0 is (L, B, p)) or another size let the tracer fix B in the graph (seen with L = B = 2
    and a projection: a graph that refused any other batch size)."""
    config = model.config
    fixed = {config.num_layers, config.output_size, config.hidden_size, config.embedding_size, config.vocab_size}
    fixed |= {int(s) for p in model.parameters() for s in p.shape}
    sizes = [size for size in range(2, 10_000) if size not in fixed]
    return sizes[1], sizes[0]


def check_onnx(model: LanguageModel, path: str | os.PathLike, *, chunks: Sequence[int] = (4, 1, 3),
               batch_size: int = 2, seed: int = 0) -> float:
    """The largest |log p| difference between onnxruntime running the graph at ``path`` and ``model``
    in PyTorch, over one stream of random word ids fed in ``chunks`` (their lengths), each chunk
    starting from the state the one before returned (from a random state at the start, so that
    h_0 and c_0 are read). Every output counts: log_probs, h_n and c_n of every chunk."""
    require(CHECK_MODULES, "checking an ONNX export")
    import onnxruntime

    check_int("batch_size", batch_size)
    chunks = [check_int("chunk length", t) for t in chunks]
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    ref = model.embedding.weight
    h, c = (torch.randn(*state.shape, generator=generator).to(ref) for state in model.init_state(batch_size))
    state = {"h_0": h.float().cpu().numpy(), "c_0": c.float().cpu().numpy()}
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for length in chunks:
                tokens = torch.randint(0, config.vocab_size, (length, batch_size), generator=generator)
                hidden, (h, c) = model(tokens.to(ref.device), (h, c))
                expected = (model.log_probs(hidden), h, c)
                got = session.run(list(OUTPUT_NAMES), {"tokens": tokens.numpy(), **state})
                for mine, theirs in zip(expected, got):
                    worst = max(worst, (mine.float().cpu() - torch.from_numpy(theirs)).abs().max().item())
                state = {"h_0": got[1], "c_0": got[2]}  # onnxruntime carries its own state
    finally:
        model.train(was_training)
    return worst


def _cpu_float_copy(model: LanguageModel) -> LanguageModel:
    """A float32 CPU copy of ``model`` (same config, same weights)."""
    copy = LanguageModel(model.config)
    copy.load_state_dict({name: t.detach().float().cpu() for name, t in model.state_dict().items()})
    return copy


def _metadata(model: LanguageModel, vocab: Vocabulary | None) -> dict[str, str]:
    config = model.config
    if vocab is not None and len(vocab) != config.vocab_size:
        raise ValueError(f"to_onnx: the vocabulary has {len(vocab):,} words but the model {config.vocab_size:,}")
    extra = {} if vocab is None else {VOCAB_KEY: json.dumps(vocab.to_dict())}
    return {**extra,
        "factorlm.model_config": json.dumps(config.to_dict(), sort_keys=True),
        "factorlm.inputs": "tokens (T, B) int64 word ids; h_0 (L, B, p), c_0 (L, B, n) float32 state (zeros to start)",
        "factorlm.outputs": "log_probs (T, B, V) float32 natural-log softmax; h_n, c_n the state for the next chunk",
        "factorlm.sizes": json.dumps({"V": config.vocab_size, "L": config.num_layers, "p": config.output_size,
                                      "n": config.hidden_size}),
    }


@contextlib.contextmanager
def _quiet(verbose: bool):
    """torch.onnx prints its progress and warns about what it skips (torchvision's ops, ...): silent
    unless ``verbose``."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
