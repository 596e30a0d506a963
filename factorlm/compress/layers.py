"""What every conversion needs: the recurrent layers of a model one by one, a torch.nn.LSTM (or its
state dict) as a factorlm layer, and a new language model that keeps the unchanged parts.

A LanguageModel keeps its L layers either as one multi-layer module (``model.rnn``, layer l's
tensors named ``weight_ih_l{l}``) or, with ``config.residual``, as L one-layer modules
(``model.rnn[l]``, each named ``..._l0``). :func:`model_layers` hides the difference: it gives
(module, index) per layer, and ``module.layer_parameters(index)`` is that layer's tensors by short
name (``weight_ih``, ``weight_hh``, ``bias``, ``weight_hr``, ...), whatever the layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from factorlm.errors import CheckpointError
from factorlm.models import LanguageModel, ModelConfig
from factorlm.nn.base import LSTMBase
from factorlm.nn.lstm import LSTM
from factorlm.nn.registry import CELLS

__all__ = ["model_layers", "layer_views", "require_cell", "as_factorlm_lstm", "nn_lstm_from_state_dict",
           "new_model_like", "rnn_parameter_name", "cell_name", "layer_kwargs"]

#: LSTMBase's constructor arguments, which every cell takes
_BASE_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
              "proj_size", "forget_bias", "coupled_gates", "shared_gates", "proj_rank")


def model_layers(model: LanguageModel) -> list[tuple[LSTMBase, int]]:
    """(module, index in that module) for each of the model's layers, first to last."""
    if isinstance(model.rnn, nn.ModuleList):
        return [(module, 0) for module in model.rnn]
    return [(model.rnn, layer) for layer in range(model.config.num_layers)]


def layer_views(module: LSTMBase) -> list[tuple[LSTMBase, int]]:
    """(module, layer) for each layer of a multi-layer factorlm module (the layer-level twin of model_layers)."""
    return [(module, layer) for layer in range(module.num_layers)]


def rnn_parameter_name(model: LanguageModel, layer: int, name: str) -> str:
    """The state-dict key of short name ``name`` (``weight_hh``) of layer ``layer`` of ``model``."""
    if isinstance(model.rnn, nn.ModuleList):
        return f"rnn.{layer}.{name}_l0"
    return f"rnn.{name}_l{layer}"


def require_cell(config: ModelConfig, cells: tuple[str, ...], what: str, source="the model") -> None:
    """CheckpointError unless ``config.cell`` is one of ``cells`` (a conversion's input architecture)."""
    if config.cell not in cells:
        raise CheckpointError(f"{what} needs a model of cell {' or '.join(map(repr, cells))}, but {source} has "
                              f"cell {config.cell!r}")


def nn_lstm_from_state_dict(state_dict: Mapping[str, Tensor]) -> nn.LSTM:
    """The torch.nn.LSTM whose ``state_dict()`` is ``state_dict`` (sizes read off the shapes:
    ``weight_ih_l0`` (4n, input), ``weight_hh_l0`` (4n, p), ``weight_hr_l0`` (p, n) when projected;
    layers and directions from the keys). ValueError naming what does not fit an nn.LSTM."""
    if not isinstance(state_dict, Mapping) or "weight_ih_l0" not in state_dict or "weight_hh_l0" not in state_dict:
        keys = sorted(state_dict)[:4] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"expected a torch.nn.LSTM state dict (weight_ih_l0, weight_hh_l0, ...), got keys {keys}")
    layers = 1 + max(int(m.group(1)) for key in state_dict if (m := re.fullmatch(r"weight_ih_l(\d+)", key)))
    rows, input_size = state_dict["weight_ih_l0"].shape
    if rows % 4:
        raise ValueError(f"weight_ih_l0 has {rows} rows; a torch.nn.LSTM has 4 x hidden_size")
    hidden = rows // 4
    proj = state_dict["weight_hr_l0"].shape[0] if "weight_hr_l0" in state_dict else 0
    lstm = nn.LSTM(input_size, hidden, num_layers=layers, bias="bias_ih_l0" in state_dict,
                   bidirectional="weight_ih_l0_reverse" in state_dict, proj_size=proj,
                   dtype=state_dict["weight_ih_l0"].dtype)
    try:
        lstm.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"the state dict does not fit the torch.nn.LSTM its shapes describe "
                         f"({str(exc).splitlines()[0]})") from None
    return lstm


def as_factorlm_lstm(layer) -> LSTMBase:
    """A factorlm layer for ``layer``: itself when it is one, LSTM.from_lstm for a torch.nn.LSTM, and a
    torch.nn.LSTM state dict through :func:`nn_lstm_from_state_dict`."""
    if isinstance(layer, LSTMBase):
        return layer
    if isinstance(layer, nn.LSTM):
        return LSTM.from_lstm(layer)
    if isinstance(layer, Mapping):
        return LSTM.from_lstm(nn_lstm_from_state_dict(layer))
    raise TypeError(f"expected a LanguageModel, a factorlm layer, a torch.nn.LSTM or its state dict, "
                    f"got {type(layer).__name__}")


def cell_name(layer: LSTMBase) -> str:
    """The name ``layer``'s class is registered under (factorlm.nn.CELLS)."""
    for name, cls in CELLS.items():
        if type(layer) is cls:
            return name
    raise ValueError(f"{type(layer).__name__} is not a registered cell type (factorlm.nn.CELLS)")


def layer_kwargs(layer: LSTMBase) -> dict:
    """The constructor arguments that build ``layer`` again: LSTMBase's and its cell's own (cell_args)."""
    kwargs = {name: getattr(layer, name) for name in _BASE_ARGS}
    kwargs.update({arg.name: getattr(layer, arg.name) for arg in type(layer).cell_args})
    return kwargs


@torch.no_grad()
def new_model_like(model: LanguageModel, config: ModelConfig) -> LanguageModel:
    """A LanguageModel of ``config`` on ``model``'s device and dtype, in eval mode, whose embedding and
    softmax are copies of ``model``'s (the softmax weight where its size is unchanged); the recurrent layers are left for the caller to fill."""
    ref = model.embedding.weight
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the caller's RNG
        new = LanguageModel(config).to(device=ref.device, dtype=ref.dtype)
    new.embedding.weight.copy_(model.embedding.weight)
    if new.softmax.weight.shape == model.softmax.weight.shape:  # else the caller fills it (fewer output units)
        new.softmax.weight.copy_(model.softmax.weight)
    new.softmax.bias.copy_(model.softmax.bias)
    return new.eval()
