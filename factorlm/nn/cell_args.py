"""How a cell type declares the constructor arguments it takes beyond torch.nn.LSTM's.

A layer class lists them in its ``cell_args`` class attribute, e.g. FLSTM's
``(CellArg("rank", ...),)``. Everything outside the class reads that declaration: ModelConfig
checks a config's ``cell_args`` against it, the language model hands each layer its share, the
command line turns each into an option (``--rank``), and the test grid and benchmarks build small
layers from ``example``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from factorlm.nn.base import per_layer

__all__ = ["CellArg", "parse_int_list"]


def parse_int_list(text: str) -> int | tuple[int, ...]:
    """'512' -> 512, '4,8' -> (4, 8): one value, or one per layer (the command-line form)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected an int or comma-separated ints, got {text!r}") from None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class CellArg:
    """One extra constructor argument of a cell type.

    name       the constructor keyword; also its key in ``ModelConfig.cell_args`` and its option
               ``--name`` (underscores as dashes) on the command line
    help       one line for ``--help`` and error messages
    example    a value that suits the small layers of the test grid (input 8, hidden 12, proj 4:
               sizes divisible by 4)
    per_layer_example
               different values for the layers of a stack of up to 3 (the grid's per-layer case)
    symbol     short label in tables ("r" for rank; default: name)
    per_layer  the value is one int for every layer or a sequence of one int per layer (False: one
               value of any kind for the whole stack, given unchanged to every layer)
    parse      command-line text -> value (default: an int, or comma-separated ints per layer)
    required   whether the constructor needs it (an optional one is left to the layer's default)
    """

    name: str
    help: str
    example: Any
    per_layer_example: tuple | None = None
    symbol: str | None = None
    per_layer: bool = True
    parse: Callable[[str], Any] = parse_int_list
    required: bool = True

    @property
    def label(self) -> str:
        return self.symbol or self.name

    def for_layer(self, value, layer: int, num_layers: int):
        """The value layer ``layer`` of a ``num_layers`` stack gets when it is built on its own."""
        if not self.per_layer:
            return value
        return per_layer(self.name, value, num_layers)[layer]
