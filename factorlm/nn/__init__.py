"""Drop-in replacements for torch.nn.LSTM: the LSTMP baseline, F-LSTM, G-LSTM, C-LSTM (block-circulant),
G∘F-LSTM (groups of low rank) and the diagonal LSTM (IndyLSTM); and ConvLSTM (convolutional gates:
dense, depthwise-separable, grouped or bottleneck), which takes images, not vectors.

``CELLS`` maps each cell type's name ("lstm", "flstm", "glstm", "gflstm", "diagonal", "circulant") to its
class; ``register_cell`` adds one (factorlm.nn.registry). ``CellArg`` is how a class declares its extra
arguments.
"""

from factorlm.nn.base import count_parameters, set_impl
from factorlm.nn.cell_args import CellArg
from factorlm.nn.circulant import CirculantLSTM
from factorlm.nn.convlstm import ConvLSTM, ConvLSTMCell
from factorlm.nn.diagonal import DiagonalLSTM
from factorlm.nn.flstm import FLSTM
from factorlm.nn.gflstm import GFLSTM
from factorlm.nn.glstm import GLSTM
from factorlm.nn.lstm import LSTM
from factorlm.nn.registry import CELLS, register_cell

__all__ = ["LSTM", "FLSTM", "GLSTM", "CirculantLSTM", "GFLSTM", "DiagonalLSTM", "ConvLSTM", "ConvLSTMCell", "CELLS",
           "CellArg", "register_cell", "count_parameters", "set_impl"]
