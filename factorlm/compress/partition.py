"""Balanced k-way partition of the units of several "spaces" to keep the most weight mass inside groups.

The problem (factorlm.compress.blocks builds it from a model): spaces are sets of units (the
embedding's dimensions, a layer's cells, a layer's projection units), and edges are non-negative
mass matrices M (rows of one space x columns of another, or of the same space). Each space's units
are split into k groups of equal size, and the kept mass is

    Σ_edges Σ_{i,j} M[i, j] · [group(i) = group(j)]

(group j of every space belongs together). Maximising it is a balanced graph partitioning problem
(NP-hard in general); the heuristic here:

1. spectral start: the top k eigenvectors of the normalised adjacency D^-½·A·D^-½ of the graph of
   all units, rows normalised, then a k-means whose assignment step is balanced within each space.
   When the graph falls apart into k balanced pieces (a model that is block-diagonal under some
   permutation), every unit of a piece gets the same embedding and the pieces are found exactly;
2. refinement by coordinate ascent: for one space at a time, with every other space's groups
   fixed, a balanced assignment that keeps more mass (greedy, then the best split of every pair of
   groups; exact for k = 2); a move is kept only if the total kept mass grows, so the result never
   loses to its start.

Both the spectral start and the identity order (unit i in group i·k / size) are refined, and the
better result is returned. Spaces marked fixed keep the identity order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Edge", "kept_mass", "identity_groups", "partition"]

#: above this many units in all the spectral start uses an iterative eigensolver, not a dense one
DENSE_EIGEN_LIMIT = 3000


@dataclass
class Edge:
    """Mass between the units of space ``rows`` (M's rows) and space ``cols`` (M's columns)."""

    rows: str
    cols: str
    mass: np.ndarray  # (size of rows, size of cols), >= 0


def identity_groups(size: int, k: int) -> np.ndarray:
    """Unit i in group i // (size / k): the order the weights already have."""
    return np.arange(size) // (size // k)


def kept_mass(edges: list[Edge], groups: dict[str, np.ndarray]) -> float:
    """Σ over edges of the mass between units of the same group."""
    total = 0.0
    for e in edges:
        total += float(e.mass[groups[e.rows][:, None] == groups[e.cols][None, :]].sum())
    return total


def _affinity(space: str, edges: list[Edge], groups: dict[str, np.ndarray], k: int, size: int) -> np.ndarray:
    """(size, k): the mass between each unit of ``space`` and each group of the other ends of its edges
    (a self-edge counts both ways, with the space's current groups)."""
    out = np.zeros((size, k))
    for e in edges:
        if e.rows == space:
            out += e.mass @ np.eye(k)[groups[e.cols]]
        if e.cols == space:
            out += e.mass.T @ np.eye(k)[groups[e.rows]]
    return out


def _balanced_assignment(score: np.ndarray) -> np.ndarray:
    """Groups with exactly size / k units each, by high Σ score[u, group(u)]: the strongest
    (unit, group) preferences first while the group has room, then, for every pair of groups until
    nothing changes, the best split of their units between the two (sorted by the difference of the
    two scores: exact for that pair, and so for k = 2)."""
    size, k = score.shape
    per = size // k
    order = np.argsort(-score, axis=None, kind="stable")
    groups = np.full(size, -1)
    room = np.full(k, per)
    placed = 0
    for flat in order:
        u, g = divmod(int(flat), k)
        if groups[u] < 0 and room[g] > 0:
            groups[u], room[g] = g, room[g] - 1
            placed += 1
            if placed == size:
                break
    tolerance = 1e-12 * (np.abs(score).max() + 1e-300)
    changed = True
    while changed:
        changed = False
        for a in range(k):
            for b in range(a + 1, k):
                units = np.flatnonzero((groups == a) | (groups == b))
                preference = score[units, a] - score[units, b]
                to_a = np.zeros(units.size, dtype=bool)
                to_a[np.argsort(-preference, kind="stable")[:per]] = True
                before = preference[groups[units] == a].sum()
                if preference[to_a].sum() > before + tolerance:
                    groups[units] = np.where(to_a, a, b)
                    changed = True
    return groups


def _top_eigenvectors(times, total: int, k: int, scale: np.ndarray) -> np.ndarray:
    """(total, k): the eigenvectors of the k largest eigenvalues of S = D^-½·A·D^-½, A given by
    ``times`` (x -> A·x). Dense eigh up to DENSE_EIGEN_LIMIT units; above, subspace iteration on
    (S + I) / 2, whose eigenvalues lie in [0, 1] with S's order."""
    if total <= DENSE_EIGEN_LIMIT:
        adjacency = times(np.eye(total)) * scale[:, None] * scale[None, :]
        return np.linalg.eigh(adjacency)[1][:, -k:]
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((total, k)))[0]
    for _ in range(300):
        step = 0.5 * (scale[:, None] * times(scale[:, None] * basis) + basis)
        new = np.linalg.qr(step)[0]
        converged = np.linalg.norm(new @ (new.T @ basis) - basis) < 1e-8
        basis = new
        if converged:
            break
    return basis


def _spectral_start(sizes: dict[str, int], edges: list[Edge], k: int) -> dict[str, np.ndarray]:
    """Balanced k-means on the spectral embedding of the graph of all units (module doc, step 1)."""
    names = list(sizes)
    offsets = dict(zip(names, np.cumsum([0] + [sizes[s] for s in names[:-1]])))
    total = sum(sizes.values())

    def times(x: np.ndarray) -> np.ndarray:  # A @ x for the symmetric adjacency of all units
        y = np.zeros_like(x)
        for e in edges:
            r, c = offsets[e.rows], offsets[e.cols]
            y[r:r + sizes[e.rows]] += e.mass @ x[c:c + sizes[e.cols]]
            y[c:c + sizes[e.cols]] += e.mass.T @ x[r:r + sizes[e.rows]]
        return y

    degree = times(np.ones((total, 1)))[:, 0]
    scale = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))
    vectors = _top_eigenvectors(times, total, k, scale)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    points = vectors / np.where(norms > 0, norms, 1.0)
    # farthest-point centroids, from the unit of largest degree: deterministic and, for k separate
    # pieces, one centroid in each
    centroids = [points[int(np.argmax(degree))]]
    for _ in range(1, k):
        distance = np.min([((points - c) ** 2).sum(1) for c in centroids], axis=0)
        centroids.append(points[int(np.argmax(distance))])
    centroids = np.stack(centroids)
    groups = {}
    for _ in range(20):
        for s in names:
            r = offsets[s]
            d = ((points[r:r + sizes[s], None, :] - centroids[None]) ** 2).sum(-1)  # (size, k)
            groups[s] = _balanced_assignment(-d)
        labels = np.concatenate([groups[s] for s in names])
        new = np.stack([points[labels == g].mean(0) if (labels == g).any() else centroids[g] for g in range(k)])
        if np.allclose(new, centroids):
            break
        centroids = new
    return groups


def _refine(groups: dict[str, np.ndarray], sizes: dict[str, int], edges: list[Edge], k: int,
            fixed: set[str], rounds: int = 30) -> tuple[dict[str, np.ndarray], float]:
    """Coordinate ascent (module doc, step 2): (groups, kept mass); never lower than the start."""
    groups = dict(groups)
    best = kept_mass(edges, groups)
    for _ in range(rounds):
        improved = False
        for s in sizes:
            if s in fixed:
                continue
            trial = dict(groups)
            trial[s] = _balanced_assignment(_affinity(s, edges, groups, k, sizes[s]))
            mass = kept_mass(edges, trial)
            if mass > best * (1 + 1e-12) + 1e-300:
                groups, best, improved = trial, mass, True
        if not improved:
            break
    return groups, best


def partition(sizes: dict[str, int], edges: list[Edge], k: int, *,
              fixed: set[str] = frozenset()) -> tuple[dict[str, np.ndarray], float, float]:
    """Split every space into k equal groups keeping the most mass (module doc).

    sizes: {space: number of units} (each divisible by k); edges: the mass matrices; fixed: spaces
    that keep the identity order. Returns (groups {space: (size,) group of each unit}, kept mass,
    kept mass of the identity order).
    """
    identity = {s: identity_groups(n, k) for s, n in sizes.items()}
    identity_mass = kept_mass(edges, identity)
    candidates = [_refine(identity, sizes, edges, k, set(fixed))]
    if k > 1:
        start = _spectral_start(sizes, edges, k)
        start.update({s: identity[s] for s in fixed})
        candidates.append(_refine(start, sizes, edges, k, set(fixed)))
    groups, mass = max(candidates, key=lambda c: c[1])
    return groups, mass, identity_mass
