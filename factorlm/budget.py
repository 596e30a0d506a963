"""Sizing a model to a recurrent-parameter budget, so that cell types are compared at equal size.

A budget is a number of RNN parameters (every recurrent layer's tensors: gate maps, biases,
projections; not the embedding or softmax, see :func:`factorlm.count.count_model`). ``fit_rnn_params``
changes one size of a model config, by default the cells per layer n, to the largest value whose
RNN fits the budget, and returns the config with its exact count.

How: a config's RNN parameter count grows with n for every cell type (each gate map has n-wide
rows or blocks), and with F-LSTM's rank; it shrinks as G-LSTM's groups or a circulant block
grow. So the search is a bisection over the size, in whichever direction it moves the count.
Not every value is valid (groups must divide n, p < n, ...): a candidate the layer refuses counts as
the nearest valid one below it, which keeps the count monotone. n is searched in multiples of
``HIDDEN_MULTIPLE`` (vector-friendly sizes, and what divides the usual group counts); a cell
argument (``vary="rank"``), or the projection's rank (``vary="proj_rank"``), in steps of 1. Every count
comes from a model built on the meta device, as ``factorlm count`` does: exact, and no memory is
allocated. So the options every cell takes are counted as they are built: coupled gates (3 gate
blocks), shared gates (an n-row gate map, G·n scales and the G·n bias) and a low-rank projection
(r·(n + p), kept at its rank while n varies; a rank the candidate's sizes refuse is a refused candidate).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from factorlm.count import count_model
from factorlm.errors import ConfigError, ConfigWarning
from factorlm.models.config import ModelConfig
from factorlm.nn.registry import cell_class

#: n is searched in multiples of this
HIDDEN_MULTIPLE = 8
#: how far below a refused candidate the nearest valid one is looked for, in search steps
_VALID_SEARCH = 64
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int | float, what: str = "--rnn-params") -> int:
    """A parameter count such as ``20M``, ``1.5m``, ``500k``, ``2e6`` or ``1234567`` -> int (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*", str(text), re.IGNORECASE)
        if match is None:
            raise ValueError(f"{what} must be a count such as 20M, 500k or 1500000, got {text!r}")
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if not value >= 1 or value != value:
        raise ValueError(f"{what} must be at least 1 parameter, got {text!r}")
    return int(round(value))


@dataclass(frozen=True)
class Fit:
    """The result of :func:`fit_rnn_params`: the sized config, its exact RNN parameter count, the
    budget, and which size was varied with its new value."""

    config: ModelConfig
    rnn_params: int
    budget: int
    varied: str
    value: int

    def describe(self) -> str:
        return (f"{self.varied}={self.value}: {self.rnn_params:,} RNN parameters "
                f"({100 * self.rnn_params / self.budget:.1f}% of the {self.budget:,} budget)")


def rnn_params(config: ModelConfig) -> int:
    """The exact RNN parameter count of a model config (meta device)."""
    return count_model(config)["rnn_params"]


def fit_rnn_params(config: ModelConfig, budget: int, vary: str = "hidden_size") -> Fit:
    """``config`` with ``vary`` (``hidden_size``, ``proj_rank`` (with proj_size > 0), or one of its
    cell's integer arguments, set to one value for every layer) changed to the value whose RNN parameter count is largest without
    exceeding ``budget``.

    ConfigError, naming the budget and the smallest count reachable, when no valid value fits;
    ValueError for a ``vary`` the config's cell does not take.
    """
    budget = parse_count(budget, "budget")
    if vary == "hidden_size":
        step, low = HIDDEN_MULTIPLE, config.proj_size + 1
    elif vary == "proj_rank":
        return _fit_proj_rank(config, budget)
    else:
        takes = [arg.name for arg in cell_class(config.cell).cell_args]
        if vary not in takes:
            raise ValueError(f"vary must be 'hidden_size', 'proj_rank' or an argument of cell {config.cell!r} "
                             f"({', '.join(takes) or 'it takes none'}), got {vary!r}")
        step, low = 1, 1
    first = -(-low // step)  # the smallest candidate index: value = index * step

    def with_value(index: int) -> ModelConfig:
        value = index * step
        if vary in ("hidden_size", "proj_rank"):
            return config.replace(**{vary: value})
        return config.replace(cell_args={**config.cell_args, vary: value})

    counts: dict[int, int | None] = {}

    def count(index: int) -> int | None:
        """The RNN count at candidate ``index``, or None where the layer refuses that size."""
        if index not in counts:
            try:
                with warnings.catch_warnings():  # a candidate's size warnings are not the user's
                    warnings.simplefilter("ignore", ConfigWarning)
                    counts[index] = rnn_params(with_value(index))
            except (ValueError, ConfigError):
                counts[index] = None
        return counts[index]

    def valid_at_or_below(index: int) -> int | None:
        for i in range(index, max(first, index - _VALID_SEARCH) - 1, -1):
            if count(i) is not None:
                return i
        return None

    def valid_at_or_above(index: int) -> int | None:
        for i in range(index, index + _VALID_SEARCH + 1):
            if count(i) is not None:
                return i
        return None

    start = valid_at_or_above(first)
    if start is None:
        raise ConfigError(f"no valid {vary} found from {first * step} up for cell {config.cell!r}")
    probe = valid_at_or_above(start + 1)
    growing = probe is None or count(probe) >= count(start)
    if growing:
        if count(start) > budget:
            raise ConfigError(f"the RNN budget of {budget:,} parameters is below the smallest model with this "
                              f"shape: {vary}={start * step} already has {count(start):,}")

        def within(index: int) -> bool:
            # the count at the nearest valid index at or below: monotone in index; a long refused
            # run (None) lies above a valid index within the budget, so it counts as within
            at = valid_at_or_below(index)
            return at is None or count(at) <= budget

        good, high = start, 2 * start + 1  # within(good) holds; double high until it does not
        while within(high):
            good, high = high, 2 * high
            if high > 1 << 40:
                raise ConfigError(f"no {vary} reaches the budget of {budget:,} RNN parameters")
        while high - good > 1:
            middle = (good + high) // 2
            good, high = (middle, high) if within(middle) else (good, middle)
        best = valid_at_or_below(good)
        while best is None:  # a refused run longer than the search window: look further down
            good -= _VALID_SEARCH
            best = valid_at_or_below(good)
    else:  # the count shrinks as the value grows (groups, block): the smallest value within budget
        best = None
        index = start
        while index is not None and index <= (1 << 20):
            if count(index) <= budget:
                best = index
                break
            index = valid_at_or_above(index + 1)
        if best is None:
            raise ConfigError(f"no {vary} of cell {config.cell!r} brings the RNN under {budget:,} parameters")
    chosen = with_value(best)
    rnn_params(chosen)  # once more with warnings on: what the chosen size says (F-LSTM's rank) is the user's
    return Fit(chosen, count(best), budget, vary, best * step)


def _fit_proj_rank(config: ModelConfig, budget: int) -> Fit:
    """fit_rnn_params for vary="proj_rank": every rank 1 .. min(n, p) - 1 is valid and the count grows
    with it, so a bisection over that bounded range (the general search has no upper end)."""
    if not config.proj_size:
        raise ValueError("vary='proj_rank' sizes the projection's factors, which needs proj_size > 0; got 0")
    top = min(config.hidden_size, config.proj_size) - 1
    if top < 1:
        raise ConfigError(f"no proj_rank fits hidden_size={config.hidden_size}, proj_size={config.proj_size}: "
                          f"it must be below both")

    def count(rank: int) -> int:
        return rnn_params(config.replace(proj_rank=rank))

    if count(1) > budget:
        raise ConfigError(f"the RNN budget of {budget:,} parameters is below the smallest model with this shape: "
                          f"proj_rank=1 already has {count(1):,}")
    good, high = 1, top + 1  # count(good) <= budget; high is beyond the valid ranks or over the budget
    while high - good > 1:
        middle = (good + high) // 2
        good, high = (middle, high) if count(middle) <= budget else (good, middle)
    return Fit(config.replace(proj_rank=good), count(good), budget, "proj_rank", good)
