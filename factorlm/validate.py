"""The checks of plain values every part of factorlm shares: integers, real numbers and fractions.

Errors are ValueErrors that name the argument, the accepted range and the value given. This
module imports nothing from factorlm, so layers, data and configs can all use it.
"""

from __future__ import annotations

import math
import numbers


def is_int(value, minimum: int) -> bool:
    """True for an integer >= minimum (Python or NumPy ints; bools are not integers here)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False, note: str = "") -> int | None:
    """``value`` as an int, or a ValueError ``NAME must be an integer >= MINIMUM[ NOTE], got VALUE``.

    optional: None is accepted too (and returned). note: a short explanation added after the
    range, e.g. ``"(0: full softmax)"``.
    """
    if optional and value is None:
        return None
    if not is_int(value, minimum):
        accepted = f"an integer >= {minimum}" + (" or None" if optional else "") + (f" {note}" if note else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return int(value)


def check_real(name: str, value, minimum: float = 0.0, *, strict: bool = True, optional: bool = False,
               allow_inf: bool = False, note: str = "") -> float | None:
    """``value`` as a float > minimum (strict) or >= minimum, else a ValueError
    ``NAME must be a number > MINIMUM[ NOTE], got VALUE``. NaN is always refused (every comparison
    with it is false, so it would slip through a plain ``value <= 0`` check); infinity only with
    allow_inf. optional: None is accepted too (and returned).
    """
    if optional and value is None:
        return None
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and not math.isnan(value)
        and (allow_inf or not math.isinf(value))
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        accepted = (f"a{'' if allow_inf else ' finite'} number {'>' if strict else '>='} {minimum:g}"
                    + (" or None" if optional else "") + (f" {note}" if note else ""))
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, *, include_one: bool) -> float:
    """``value`` as a float in [0, 1] (include_one) or [0, 1), else ``NAME must be a number in [0, 1), got V``.

    The one rule for dropout probabilities and decay rates. Whether 1 is allowed is the caller's
    statement of what 1 would mean: torch.nn.LSTM accepts dropout = 1 between layers, so the layers
    do too; a language model whose embedding dropout is 1 sees only zeros, so its config refuses it.
    """
    upper = "]" if include_one else ")"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0)
    ):
        raise ValueError(f"{name} must be a number in [0, 1{upper}, got {value!r}")
    return float(value)
