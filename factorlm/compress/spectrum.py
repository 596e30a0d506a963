"""Singular-value spectra of gate matrices: the energy rule for a rank, and the per-layer report.

The spectral energy of the first r singular values is ``e(r) = Σ_{i<r} s_i² / Σ_i s_i²``; by
Eckart–Young the best rank-r approximation of W leaves the relative Frobenius error
``‖W − W_r‖_F / ‖W‖_F = √(1 − e(r))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["rank_for_energy", "energy_kept", "check_energy", "LayerSpectrum", "format_spectra", "plot_spectra"]


def check_energy(energy, name: str = "energy") -> float:
    """``energy`` as a float strictly inside (0, 1); ValueError naming the value otherwise."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy < 1:
        raise ValueError(f"{name} must be a fraction of the spectral energy strictly between 0 and 1, got {energy!r}")
    return float(energy)


def energy_kept(singular_values: Tensor, rank: int) -> float:
    """e(rank): the fraction of Σ s_i² that the first ``rank`` singular values hold (1.0 for a zero matrix)."""
    squares = singular_values.double() ** 2
    total = squares.sum()
    return 1.0 if total == 0 else float(squares[:rank].sum() / total)


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest r >= 1 with e(r) >= ``energy`` (``singular_values`` in descending order, as
    torch.linalg.svd gives them). A relative slack of 1e-12 keeps a cut exactly at a boundary from
    being lost to rounding in the cumulative sum."""
    energy = check_energy(energy)
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total == 0:
        return 1
    fractions = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(fractions, torch.tensor(energy - 1e-12, dtype=fractions.dtype))) + 1,
               singular_values.numel())


@dataclass
class LayerSpectrum:
    """One layer's gate matrix [W_ih W_hh] (rows x cols), its singular values and the rank chosen."""

    layer: int
    rows: int
    cols: int
    rank: int
    singular_values: list[float] = field(repr=False)
    direction: int = 0

    @property
    def full_rank(self) -> int:
        return min(self.rows, self.cols)

    @property
    def energy(self) -> float:
        return energy_kept(torch.tensor(self.singular_values, dtype=torch.float64), self.rank)

    @property
    def relative_error(self) -> float:
        """‖W − W_r‖_F / ‖W‖_F of the best rank-r approximation."""
        return math.sqrt(max(0.0, 1.0 - self.energy))

    @property
    def dense_params(self) -> int:
        return self.rows * self.cols

    @property
    def factored_params(self) -> int:
        return self.rank * (self.rows + self.cols)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "direction": self.direction, "rows": self.rows, "cols": self.cols,
                "rank": self.rank, "full_rank": self.full_rank, "energy": self.energy,
                "relative_error": self.relative_error, "dense_params": self.dense_params,
                "factored_params": self.factored_params, "singular_values": list(self.singular_values)}


def format_spectra(spectra: list[LayerSpectrum]) -> str:
    """A text table: per layer the matrix, its full rank, the rank chosen, the energy kept, the
    relative Frobenius error and the gate parameters before and after."""
    lines = [f"{'layer':<7}{'matrix':>13}{'full rank':>11}{'rank':>7}{'energy kept':>13}{'rel. error':>12}"
             f"{'gate params: dense':>20}{'factored':>12}"]
    for s in spectra:
        label = f"{s.layer}" + (" rev" if s.direction else "")
        lines.append(f"{label:<7}{f'{s.rows} x {s.cols}':>13}{s.full_rank:>11}{s.rank:>7}{s.energy:>13.4f}"
                     f"{s.relative_error:>12.4f}{s.dense_params:>20,}{s.factored_params:>12,}")
    dense = sum(s.dense_params for s in spectra)
    factored = sum(s.factored_params for s in spectra)
    lines.append(f"total gate parameters {dense:,} -> {factored:,} ({factored / dense:.1%}); energy kept = "
                 f"sum of the kept squared singular values / all; rel. error = sqrt(1 - energy kept)")
    return "\n".join(lines)


def plot_spectra(spectra: list[LayerSpectrum], png_path: str | Path) -> Path:
    """Two panels as a PNG: each layer's singular values (relative to its largest, log scale) and its
    cumulative energy against the rank, with the chosen rank marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (values, cumulative) = plt.subplots(1, 2, figsize=(11, 4))
    for s in spectra:
        sv = torch.tensor(s.singular_values, dtype=torch.float64)
        label = f"layer {s.layer}" + (" reverse" if s.direction else "")
        ranks = range(1, sv.numel() + 1)
        top = float(sv[0]) if sv.numel() and sv[0] > 0 else 1.0
        line, = values.semilogy(ranks, (sv / top).clamp_min(1e-16).tolist(), label=label)
        squares = sv**2
        energy = (torch.cumsum(squares, 0) / squares.sum().clamp_min(1e-300)).tolist()
        cumulative.plot(ranks, energy, color=line.get_color(), label=f"{label}: rank {s.rank}, {s.energy:.3f}")
        cumulative.axvline(s.rank, color=line.get_color(), linestyle=":")
    values.set(xlabel="index i", ylabel="s_i / s_1", title="singular values of [W_ih W_hh]")
    cumulative.set(xlabel="rank r", ylabel="energy kept", title="cumulative spectral energy", ylim=(0, 1.02))
    values.legend()
    cumulative.legend(loc="lower right")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
