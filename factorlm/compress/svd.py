"""Dense LSTM -> F-LSTM by truncated SVD (Eckart–Young).

Each layer's gate matrix W = [W_ih W_hh] (G·n, p_in + p) is replaced by its best rank-r
approximation in the Frobenius (and spectral) norm, W ≈ U_r·S_r·V_rᵀ, stored as the F-LSTM factors

    weight_w2 = U_r·S_r^½   (G·n, r)        weight_w1 = S_r^½·V_rᵀ   (r, p_in + p)

(the singular values split evenly: both factors get the same scale, which suits their training
afterwards). The bias, the projection W_hr, the forget-gate constant, the embedding and the softmax
are kept as they are. At full rank r = min(G·n, p_in + p) the F-LSTM computes the dense model's
function to rounding. The SVD runs in float64 whatever the weights' dtype.

The rank is given directly (one int, or one per layer) or by ``energy``: per layer the smallest r
whose singular values hold that fraction of Σ s_i² (factorlm.compress.spectrum).
"""

from __future__ import annotations

import torch
from torch import Tensor

from factorlm.compress.layers import as_factorlm_lstm, model_layers, new_model_like, require_cell
from factorlm.compress.spectrum import LayerSpectrum, check_energy, rank_for_energy
from factorlm.models import LanguageModel
from factorlm.nn.base import LSTMBase, per_layer
from factorlm.nn.flstm import FLSTM
from factorlm.nn.lstm import LSTM

__all__ = ["svd_to_flstm", "low_rank_factors"]


def low_rank_factors(weight: Tensor, rank: int, svd=None) -> tuple[Tensor, Tensor]:
    """(W2 (rows, r), W1 (r, cols)) with W2·W1 the best rank-r approximation of ``weight`` (rows, cols),
    in ``weight``'s dtype; ``svd``: its (U, S, Vh) from torch.linalg.svd(full_matrices=False) if known."""
    u, s, vh = svd if svd is not None else torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def _ranks(rank, energy, num_layers: int) -> tuple[int, ...] | None:
    """The per-layer ranks asked for (None: chosen by energy); exactly one of the two must be given."""
    if (rank is None) == (energy is None):
        raise ValueError("give either rank (one int, or one per layer) or energy (a fraction in (0, 1)), not "
                         f"{'both' if rank is not None else 'neither'}")
    if energy is not None:
        check_energy(energy)
        return None
    return per_layer("rank", rank, num_layers)


def _plan(dense_layers: list[tuple[LSTMBase, int]], rank, energy) -> tuple[list[LayerSpectrum], list, tuple[int, ...]]:
    """SVD every (layer, direction); (spectra, SVDs, one rank per layer)."""
    wanted = _ranks(rank, energy, len(dense_layers))
    spectra, svds, ranks = [], [], []
    for layer, (module, index) in enumerate(dense_layers):
        chosen = []
        for direction in range(module.num_directions):
            w = module.layer_parameters(index, direction)
            weight = torch.cat([w["weight_ih"], w["weight_hh"]], dim=1).detach()  # (G·n, p_in + p)
            svd = torch.linalg.svd(weight.double(), full_matrices=False)
            rows, cols = weight.shape
            if wanted is not None and wanted[layer] > min(rows, cols):
                raise ValueError(f"rank {wanted[layer]} for layer {layer} exceeds the full rank of its gate matrix "
                                 f"[W_ih W_hh], {rows} x {cols}: give a rank from 1 to {min(rows, cols)}")
            r = wanted[layer] if wanted is not None else rank_for_energy(svd[1], energy)
            chosen.append(r)
            svds.append(svd)
            spectra.append(LayerSpectrum(layer=layer, direction=direction, rows=rows, cols=cols, rank=r,
                                         singular_values=svd[1].tolist()))
        ranks.append(max(chosen))  # both directions of a layer share its rank
    for s in spectra:
        s.rank = ranks[s.layer]
    return spectra, svds, tuple(ranks)


@torch.no_grad()
def _fill(dense_layers, factored_layers, svds, ranks) -> None:
    """Write each dense layer's factors, bias and projection into the matching F-LSTM layer."""
    svds = iter(svds)
    for layer, ((dense, i), (factored, j)) in enumerate(zip(dense_layers, factored_layers)):
        for direction in range(dense.num_directions):
            src, dst = dense.layer_parameters(i, direction), factored.layer_parameters(j, direction)
            w2, w1 = low_rank_factors(torch.cat([src["weight_ih"], src["weight_hh"]], dim=1), ranks[layer],
                                      next(svds))
            dst["weight_w2"].copy_(w2)
            dst["weight_w1"].copy_(w1)
            for name in ("bias", "weight_hr"):
                if src.get(name) is not None:
                    dst[name].copy_(src[name])


def _compact(ranks: tuple[int, ...]):
    return ranks[0] if len(set(ranks)) == 1 else ranks


def svd_to_flstm(source, *, rank=None, energy=None):
    """Convert a dense LSTM to an F-LSTM of the given rank(s): returns ``(converted, spectra)``.

    source: a factorlm LanguageModel of cell "lstm" (-> a LanguageModel of cell "flstm", its
        embedding, softmax and every other setting kept), a factorlm.nn.LSTM, a torch.nn.LSTM or
        a torch.nn.LSTM state dict (-> a factorlm.nn.FLSTM with the same sizes and options).
    rank: one int for every layer, or one per layer, each at most min(G·n, p_in + p).
    energy: instead of rank, per layer the smallest rank keeping this fraction (0 < energy < 1) of
        the spectral energy; both directions of a bidirectional layer take the larger of their two.
    spectra: one :class:`LayerSpectrum` per layer (and direction): singular values and chosen rank.

    The converted model or layer is in eval mode, on the source's device and in its dtype.
    """
    if isinstance(source, LanguageModel):
        require_cell(source.config, ("lstm",), "SVD to F-LSTM")
        dense_layers = model_layers(source)
        spectra, svds, ranks = _plan(dense_layers, rank, energy)
        config = source.config.replace(cell="flstm", cell_args={"rank": _compact(ranks)})
        converted = new_model_like(source, config)
        _fill(dense_layers, model_layers(converted), svds, ranks)
        return converted, spectra
    layer = as_factorlm_lstm(source)
    if type(layer) is not LSTM:
        raise ValueError(f"SVD to F-LSTM converts a dense LSTM, got a {type(layer).__name__}")
    dense_layers = [(layer, k) for k in range(layer.num_layers)]
    spectra, svds, ranks = _plan(dense_layers, rank, energy)
    ref = layer.layer_parameters(0)["weight_ih"]
    with torch.device("meta"):
        factored = FLSTM(layer.input_size, layer.hidden_size, num_layers=layer.num_layers, bias=layer.bias,
                         batch_first=layer.batch_first, dropout=layer.dropout, bidirectional=layer.bidirectional,
                         proj_size=layer.proj_size, forget_bias=layer.forget_bias, coupled_gates=layer.coupled_gates,
                         rank=ranks)
    factored = factored.to_empty(device=ref.device).to(ref.dtype)
    _fill(dense_layers, [(factored, k) for k in range(layer.num_layers)], svds, ranks)
    return factored.eval(), spectra

