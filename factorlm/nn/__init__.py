"""Drop-in replacements for torch.nn.LSTM: the LSTMP baseline, F-LSTM and G-LSTM."""

from factorlm.nn.base import count_parameters, set_impl
from factorlm.nn.flstm import FLSTM
from factorlm.nn.glstm import GLSTM
from factorlm.nn.lstm import LSTM

__all__ = ["LSTM", "FLSTM", "GLSTM", "count_parameters", "set_impl"]
