"""The word-level LSTM language model: embedding -> recurrent layers -> softmax.

Data flow for inputs (T, B) of word ids, time-major (dropout d = config.dropout, as the paper's
code: on the embedding output and on every layer's output, the last one included):

    embedding (V, E) -> dropout -> layer 1 -> dropout -> ... -> layer L -> dropout -> hidden (T, B, p)
    hidden -> softmax head (weight (V, p), bias (V,)) -> per-token loss (T, B) or log-probs (T, B, V)

Without residual connections the L layers are ONE multi-layer factorlm.nn module (``self.rnn``)
whose own inter-layer dropout supplies the dropout between layers: one call runs the whole stack.
With ``config.residual`` every layer is its own single-layer module (``self.rnn[l]``) and
``x_{l+1} = x_l + dropout(layer_l(x_l))``: the skip path is not dropped again at every layer.

The recurrent state is ``(h (L, B, p), c (L, B, n))`` in both layouts, as torch.nn.LSTM's; treat
it as opaque and use :func:`detach_state` between truncated-BPTT windows.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from factorlm.models.config import ModelConfig, build_rnn
from factorlm.models.softmax import FullSoftmax, SampledSoftmax
from factorlm.nn.registry import layer_cell_args
from factorlm.validate import is_int as _is_int

#: The recurrent state: (h (L, B, p), c (L, B, n)).
State = tuple[Tensor, Tensor]


def map_state(fn, state):
    """Apply fn to every tensor of a (nested tuple/list) recurrent state; batch is dim 1 of each."""
    if isinstance(state, Tensor):
        return fn(state)
    return type(state)(map_state(fn, s) for s in state)


def detach_state(state):
    """The same state cut from the autograd graph (between truncated-BPTT windows)."""
    return map_state(Tensor.detach, state)


class LanguageModel(nn.Module):
    """Embedding, a stack of LSTM / F-LSTM / G-LSTM layers and a softmax, as ``config`` describes.

    Submodules: ``embedding`` (nn.Embedding (V, E)), ``rnn`` (one factorlm.nn module, or an
    nn.ModuleList of single-layer ones with ``config.residual``), ``drop`` (nn.Dropout) and
    ``softmax`` (:class:`FullSoftmax`, or :class:`SampledSoftmax` when ``config.num_sampled > 0``;
    both have ``weight`` (V, p) and ``bias`` (V,), so their checkpoints are interchangeable).

    ``config.tie_embeddings``: ``softmax.weight`` IS ``embedding.weight`` (one Parameter), which
    needs the last layer's output size p to equal E.

    Initialisation (:meth:`reset_parameters`): with ``config.init_scale = s`` every parameter is
    U(-s, s), as in Zaremba et al. 2014 (biases included; shared gates' scales s stay 1). Otherwise the embedding and the softmax
    weight are N(0, 1/E) and N(0, 1/p) (unit-norm word vectors; unit-scale logits), the softmax bias
    is zero, and the recurrent layers keep torch.nn.LSTM's U(-1/√n, 1/√n) (F-LSTM: per factor).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"LanguageModel expects a ModelConfig, got {type(config).__name__}")
        if not _is_int(config.num_sampled, minimum=0):
            raise ValueError(f"num_sampled must be an integer >= 0 (0: full softmax), got {config.num_sampled!r}")
        dropout = config.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        p, E = config.output_size, config.embedding_size
        if config.tie_embeddings and p != E:
            raise ValueError(
                f"tie_embeddings needs the output size (proj_size or hidden_size) to equal embedding_size, "
                f"got output size {p} and embedding_size {E}"
            )
        if config.residual and p != E:
            # Layers 2..L always map p -> p; only the first layer's input can disagree.
            raise ValueError(
                f"residual needs embedding_size == output size (proj_size or hidden_size) so that every "
                f"layer's input can be added to its output, got embedding_size {E} and output size {p}"
            )
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, E)
        self.drop = nn.Dropout(config.dropout)
        if config.residual:
            self.rnn = nn.ModuleList(self._single_layer(config, layer) for layer in range(config.num_layers))
        else:
            self.rnn = build_rnn(config)
        if config.num_sampled > 0:
            self.softmax = SampledSoftmax(p, config.vocab_size, config.num_sampled)
        else:
            self.softmax = FullSoftmax(p, config.vocab_size)
        if config.tie_embeddings:
            self.softmax.weight = self.embedding.weight  # the same Parameter: one tensor, one gradient
        self.reset_parameters()

    @staticmethod
    def _single_layer(config: ModelConfig, layer: int) -> nn.Module:
        """Layer ``layer`` of the stack as its own one-layer module (its own share of per-layer
        cell arguments: rank=(3, 5) gives layer 1 rank 5)."""
        input_size = config.embedding_size if layer == 0 else config.output_size
        overrides = dict(num_layers=1, dropout=0.0, input_size=input_size)
        overrides.update(layer_cell_args(config.cell, config.cell_args, layer, config.num_layers))
        rank = config.proj_rank
        if isinstance(rank, (tuple, list)) and len(rank) == config.num_layers:  # else the layer names the mistake
            overrides["proj_rank"] = rank[layer]
        return build_rnn(config, **overrides)

    def _layers(self) -> list[nn.Module]:
        return list(self.rnn) if isinstance(self.rnn, nn.ModuleList) else [self.rnn]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter as documented in the class docstring."""
        scale = self.config.init_scale
        for layer in self._layers():
            layer.reset_parameters()
        self.softmax.reset_parameters()
        nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(self.config.embedding_size))
        if scale is not None:
            for name, parameter in self.named_parameters():
                # shared gates' per-gate scales s stay 1: near 0 they would zero every gate's pre-activation
                if ".gate_scale_l" not in name:
                    nn.init.uniform_(parameter, -scale, scale)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """Zero state (h (L, B, p), c (L, B, n)), on the parameters' device and dtype by default."""
        if not _is_int(batch_size, minimum=1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        ref = self.embedding.weight
        kw = dict(device=ref.device if device is None else device, dtype=ref.dtype if dtype is None else dtype)
        L, p, n = self.config.num_layers, self.config.output_size, self.config.hidden_size
        return torch.zeros(L, batch_size, p, **kw), torch.zeros(L, batch_size, n, **kw)

    def _check_state(self, state, batch: int) -> None:
        L, p, n = self.config.num_layers, self.config.output_size, self.config.hidden_size
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise ValueError(f"LanguageModel: state must be a tuple (h, c), got {type(state).__name__}")
        for label, tensor, expected in (("h", state[0], (L, batch, p)), ("c", state[1], (L, batch, n))):
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected:
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"LanguageModel: state {label} must have shape {expected} (L, B, ·), got {got}")

    # ---------------------------------------------------------------- forward
    def forward(self, inputs: Tensor, state: State | None = None, targets: Tensor | None = None) -> tuple[Tensor, State]:
        """inputs (T, B) int64 word ids, time-major; state from :meth:`init_state` or a previous call.

        Without ``targets``: returns hidden (T, B, p), the softmax input (after the last dropout),
        and the final state. With ``targets`` (T, B): returns the per-token loss (T, B) of
        :meth:`loss` (sampled softmax while training with ``num_sampled > 0``, else exact) and
        the final state, so that a wrapper such as DistributedDataParallel sees the whole
        computation in one ``forward`` call.
        """
        hidden, state = self._hidden(inputs, state)
        if targets is None:
            return hidden, state
        if not isinstance(targets, Tensor) or targets.shape != inputs.shape:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"LanguageModel: targets must have the inputs' shape {tuple(inputs.shape)}, got {got}")
        return self.loss(hidden, targets), state

    def _hidden(self, inputs: Tensor, state: State | None) -> tuple[Tensor, State]:
        """Embedding and recurrent layers: inputs (T, B) -> hidden (T, B, p), final state."""
        if not isinstance(inputs, Tensor):
            raise ValueError(f"LanguageModel expects inputs (T, B) of int64 word ids, got a {type(inputs).__name__}")
        if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"LanguageModel expects inputs (T, B) of int64 word ids, got a {inputs.dtype} tensor of shape "
                f"{tuple(inputs.shape)}"
            )
        if inputs.shape[0] == 0 or inputs.shape[1] == 0:
            raise ValueError(f"LanguageModel: inputs must have T >= 1 and B >= 1, got shape {tuple(inputs.shape)}")
        if state is None:
            state = self.init_state(inputs.shape[1])
        else:
            self._check_state(state, inputs.shape[1])
        x = self.drop(self.embedding(inputs))  # (T, B, E)
        if not isinstance(self.rnn, nn.ModuleList):
            output, (h, c) = self.rnn(x, tuple(state))  # dropout between layers happens inside
            return self.drop(output), (h, c)
        h0, c0 = state
        hs, cs = [], []
        for l, layer in enumerate(self.rnn):
            output, (h, c) = layer(x, (h0[l : l + 1], c0[l : l + 1]))
            x = x + self.drop(output)  # (T, B, p): the skip path is not dropped again
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))

    # ------------------------------------------------------------------- loss
    def loss(
        self, hidden: Tensor, targets: Tensor, *, sampled: bool | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-token negative log-likelihood (natural log): hidden (T, B, p), targets (T, B) -> (T, B).

        ``sampled=None``: the sampled softmax while training with ``config.num_sampled > 0``, else
        (evaluation, or no sampling configured) the exact full softmax. ``generator`` seeds the
        candidate sampling (on the weights' device).
        """
        if sampled is None:
            sampled = self.training and isinstance(self.softmax, SampledSoftmax)
        if not sampled:
            return self.softmax.nll(hidden, targets)
        if not isinstance(self.softmax, SampledSoftmax):
            raise ValueError(
                "sampled=True needs a model built with num_sampled > 0; this one has the full softmax only"
            )
        return self.softmax.sampled_nll(hidden, targets, generator=generator)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """Full log-softmax over the vocabulary: hidden (..., p) -> (..., V), for scoring and sampling."""
        return self.softmax.log_probs(hidden)

    def use_sparse_gradients(self, enabled: bool = True) -> "LanguageModel":
        """Give the embedding (and the sampled softmax's weight) sparse gradients of the touched rows.

        With the paper's vocabulary a batch touches a few thousand of 793,470 rows; a dense update of
        the two (V, E) matrices then costs more than the whole recurrent network. The result is
        identical for optimizers whose update of a row with a zero gradient is a no-op: Adagrad and
        SGD without momentum or weight decay (torch.optim.Adagrad / SGD accept sparse gradients).
        The full softmax (evaluation, or num_sampled = 0) still gives a dense softmax gradient.
        """
        self.embedding.sparse = bool(enabled)
        if isinstance(self.softmax, SampledSoftmax):
            self.softmax.sparse_grad = bool(enabled)
        return self

    # ------------------------------------------------------------ accounting
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: ``embedding``, ``rnn`` and ``softmax`` (a tied weight only under embedding).

        The paper clips and averages (EMA) only the recurrent layers' parameters.
        """
        tied = self.embedding.weight
        return {
            "embedding": [tied],
            "rnn": list(self.rnn.parameters()),
            "softmax": [q for q in self.softmax.parameters() if q is not tied],
        }

    def rnn_macs_per_token(self) -> int:
        """Forward multiply-adds per token in the recurrent layers (gate maps and projections)."""
        return sum(layer.macs_per_token() for layer in self._layers())
