"""Post-training compression of a trained model (issue #22): dense LSTM -> F-LSTM by SVD, -> G-LSTM by
permuted blocks, and pruning (unstructured magnitude masks, or whole hidden units removed).

Each conversion returns a new model (the input is left as it was) with its report:
``svd_to_flstm`` -> (model or FLSTM layer, spectra), ``dense_to_glstm`` -> (model, BlockReport),
``prune_units`` -> (model, report), ``magnitude_prune`` -> (model, masks, report).
``factorlm compress svd|blocks|prune RUN --out RUN2`` writes the converted model as an ordinary run
directory that ``factorlm evaluate`` reads (factorlm.compress.runs). Given a bare layer (a
torch.nn.LSTM state dict, or a layer file) they write one layer file instead, which
``load_layer(path)`` builds back into the factorlm layer (factorlm.compress.layer_file).
"""

from factorlm.compress.blocks import dense_to_glstm
from factorlm.compress.layer_file import load_layer
from factorlm.compress.prune import MASKS_KEY, apply_masks, magnitude_prune
from factorlm.compress.svd import low_rank_factors, svd_to_flstm
from factorlm.compress.units import prune_units

__all__ = ["svd_to_flstm", "low_rank_factors", "dense_to_glstm", "magnitude_prune", "apply_masks", "MASKS_KEY",
           "prune_units", "load_layer"]
