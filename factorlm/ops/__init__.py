"""Fast paths behind factorlm.nn.FLSTM / GLSTM: whole-sequence autograd Functions.

``impl`` picks the time loop ("torch", "extension", "triton" or "auto"); see
:mod:`factorlm.ops._backend` for what each means and where it runs.
"""

from factorlm.ops._backend import IMPLEMENTATIONS, check_impl
from factorlm.ops.flstm import flstm_layer
from factorlm.ops.glstm import glstm_layer

__all__ = ["flstm_layer", "glstm_layer", "IMPLEMENTATIONS", "check_impl"]
