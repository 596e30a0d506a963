"""The whole language model as one streaming function of plain PyTorch ops, for graph exporters.

    StreamingLM(model)(tokens (T, B) int64, h_0 (L, B, p), c_0 (L, B, n))
        -> log_probs (T, B, V), h_n (L, B, p), c_n (L, B, n)

the embedding, every recurrent layer and the full log-softmax, with the recurrent state as an input
and an output: feeding a stream in chunks, each with the state the previous chunk returned, gives
what one pass over the whole stream gives (the state a LanguageModel returns, (h, c), per layer).

Why not trace the model itself: its layers run hand-written time loops (a C++ loop, autograd
Functions writing into preallocated buffers, Triton kernels) that no tracer can see into. Here each
layer's time loop is one ``scan`` (torch's higher-order operator, torch._higher_order_ops.scan)
whose body is one time step of the layer's own per-step reference (factorlm.nn.reference): the
step is :func:`factorlm.nn.reference.lstmp_layer` on one step, with the gate map the layer itself
gives its reference (``LSTMBase._gate_fn``: dense, factorized W2·(W1·[x; h]), per-group, the
diagonal recurrence, the circulant matrix materialised). The gate map is built once, outside the
scan, so what a layer derives from its weights (C-LSTM's dense W) is derived once per call, not
once per step. The time dimension stays a dimension: torch.onnx turns each scan into one ONNX Scan
whose length is the input's, so T (and B) are free in the exported graph.

A cell whose recurrence is not a gate map of (x_t, h_{t-1}) says so by raising NotImplementedError
from ``_gate_fn`` (the diagonal LSTM with a projection reads tanh(c_{t-1})); its step is then the
layer's own reference forward on one step (``_layer_forward`` under impl "reference").

Dropout is left out (this is inference: the model's eval-mode function); a LanguageModel with
``residual`` adds each layer's input to its output as it does.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch._higher_order_ops.scan import scan

from factorlm.models.lm import LanguageModel
from factorlm.nn import reference
from factorlm.nn.base import LSTMBase

__all__ = ["StreamingLM", "layer_step", "reference_impl"]


class StreamingLM(nn.Module):
    """``model`` (a LanguageModel) as one function of tokens and state, in plain ops (module doc).

    The parameters are ``model``'s own (a submodule, not a copy): an exporter sees them as the
    graph's weights, and a change to the model is seen by the next call.
    """

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        if not isinstance(model, LanguageModel):
            raise TypeError(f"StreamingLM expects a factorlm LanguageModel, got {type(model).__name__}")
        for layer in model._layers():
            if not isinstance(layer, LSTMBase):
                raise TypeError(f"StreamingLM: the model's recurrent layers must be factorlm.nn layers, got "
                                f"{type(layer).__name__}")
            if layer.bidirectional:
                raise ValueError(f"StreamingLM: a bidirectional layer ({type(layer).__name__}) cannot stream: its "
                                 f"reverse direction reads the future")
        self.model = model

    def forward(self, tokens: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (T, B) int64 word ids, time-major; h0 (L, B, p), c0 (L, B, n) the state from zeros or the
        previous chunk. Returns log_probs (T, B, V) (natural log), h_n (L, B, p), c_n (L, B, n)."""
        model = self.model
        x = model.embedding(tokens)  # (T, B, E)
        hs, cs = [], []
        index = 0  # the layer's row in the state: the stack's layer, counted across residual modules
        with reference_impl(model):
            for module in model._layers():
                out = x
                for layer in range(module.num_layers):
                    out, h, c = _run_layer(module, layer, out, h0[index], c0[index])
                    hs.append(h)
                    cs.append(c)
                    index += 1
                x = x + out if model.config.residual else out  # (T, B, p)
        return model.log_probs(x), torch.stack(hs), torch.stack(cs)


def _run_layer(module: LSTMBase, layer: int, x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer ``layer`` of ``module`` over x (T, B, p_in) from h0 (B, p), c0 (B, n), as one scan over
    time: output (T, B, p), h_T (B, p), c_T (B, n)."""
    step = layer_step(module, layer)

    def body(carry: tuple[Tensor, Tensor], x_t: Tensor):
        h, c = step(x_t, *carry)
        return (h, c), h.clone()  # scan refuses a carry that aliases an output

    (h, c), output = scan(body, (h0, c0), x)
    return output, h, c


def layer_step(module: LSTMBase, layer: int):
    """step(x_t (B, p_in), h (B, p), c (B, n)) -> (h_t (B, p), c_t (B, n)): one time step of layer
    ``layer`` of ``module`` (forward direction) in plain PyTorch ops, the layer's per-step reference.

    What the layer derives from its weights for its gate map (``_gate_fn``) is derived here, once,
    when the step is built. Run it with the module's impl "reference" (:func:`reference_impl`): a
    cell without a gate map of (x_t, h) runs its own reference forward for the step.
    """
    # the tensors the layer's maths take: where the layer has effective_parameters (shared gates, a
    # factored projection), the expanded ones, built once here rather than at every step
    weights = getattr(module, "effective_parameters", module.layer_parameters)(layer)
    try:
        gates = module._gate_fn(layer, weights)
    except NotImplementedError:  # e.g. the diagonal LSTM with a projection (recurrence on tanh(c))
        def own_step(x_t: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
            _, h, c = module._layer_forward(layer, 0, x_t.unsqueeze(0), h, c, None)
            return h, c

        return own_step

    weight_hr, forget_bias, num_gates = weights["weight_hr"], module.forget_bias, module.num_gates

    def gate_step(x_t: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        _, h, c = reference.lstmp_layer(x_t.unsqueeze(0), h, c, gates, weight_hr, forget_bias, num_gates=num_gates)
        return h, c

    return gate_step


@contextlib.contextmanager
def reference_impl(module: nn.Module):
    """Run every factorlm layer inside ``module`` with impl "reference" (the plain per-step ops) for the
    duration, then give each its own impl back."""
    layers = [m for m in module.modules() if isinstance(m, LSTMBase)]
    saved = [layer.impl for layer in layers]
    try:
        for layer in layers:
            layer.impl = "reference"
        yield module
    finally:
        for layer, impl in zip(layers, saved):
            layer.impl = impl
