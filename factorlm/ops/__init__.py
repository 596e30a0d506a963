"""Fast paths behind factorlm.nn.FLSTM / GLSTM / GFLSTM / DiagonalLSTM: whole-sequence autograd Functions.

``impl`` picks the time loop ("torch", "extension", "triton" or "auto"); see
:mod:`factorlm.ops._backend` for what each means and where it runs. Every function takes a padded
(T, B, ·) batch or a packed one (``batch_sizes``); :mod:`factorlm.ops._packed` describes the row
layout and ``reversed_rows``, the permutation that runs a packed batch backwards.
``flstm_step`` / ``glstm_step`` / ``gflstm_step`` run one step without autograd, the PyTorch loop's path for
token-by-token generation (:mod:`factorlm.ops._step`); ``diagonal_layer`` / ``diagonal_step`` are the
diagonal LSTM's (:mod:`factorlm.ops.diagonal`). Each takes ``num_gates``: 4, or 3 for coupled input and
forget gates (CIFG: 3n gate rows [i, g, o], f = 1 - i). ``release_buffers()`` gives the CPU buffer
pool's free buffers back (:mod:`factorlm.ops._memory`).
"""

from factorlm.ops._backend import IMPLEMENTATIONS, check_impl, runs_torch_loop
from factorlm.ops._memory import release as release_buffers
from factorlm.ops._packed import reversed_rows
from factorlm.ops._step import flstm_step, gflstm_step, glstm_step
from factorlm.ops.diagonal import diagonal_layer, diagonal_step
from factorlm.ops.flstm import flstm_layer
from factorlm.ops.gflstm import gflstm_layer
from factorlm.ops.glstm import glstm_layer

__all__ = ["flstm_layer", "glstm_layer", "gflstm_layer", "diagonal_layer", "flstm_step", "glstm_step", "gflstm_step",
           "diagonal_step", "reversed_rows", "IMPLEMENTATIONS", "check_impl", "runs_torch_loop", "release_buffers"]
