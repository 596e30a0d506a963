"""Fast paths behind factorlm.nn.FLSTM / GLSTM: whole-sequence autograd Functions."""

from factorlm.ops.flstm import flstm_layer
from factorlm.ops.glstm import glstm_layer

__all__ = ["flstm_layer", "glstm_layer"]
