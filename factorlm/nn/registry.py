"""The table of cell types: the name a config or ``--cell`` uses -> its layer class.

Adding a cell type takes a module with its class (a subclass of LSTMBase that lists its extra
constructor arguments in ``cell_args``, see factorlm.nn.cell_args) and one line in CELLS, or one
``register_cell(name, cls)`` call from outside the package. The class gets ``coupled_gates`` from
LSTMBase, and honours it by sizing its gate tensors, dense weights and MACs with ``self.num_gates``
(4, or 3 when coupled) instead of a literal 4, and by passing ``num_gates`` on to its fast path.
It gets ``shared_gates`` by sizing them with ``self.weight_gates`` (1 when shared) and declaring in
``_shared_gate_layout`` how each gate tensor holds its rows (a class without it refuses the option),
and ``proj_rank`` for nothing: the base class materialises W_hr (LSTMBase.effective_parameters).
Model configs, the language model, the command line (``--cell`` choices and one option per
argument), ``factorlm count``, the benchmarks and the test grid all read this table.
"""

from __future__ import annotations

import inspect
from typing import Mapping

from factorlm.nn.base import LSTMBase
from factorlm.nn.cell_args import CellArg
from factorlm.nn.circulant import CirculantLSTM
from factorlm.nn.diagonal import DiagonalLSTM
from factorlm.nn.flstm import FLSTM
from factorlm.nn.gflstm import GFLSTM
from factorlm.nn.glstm import GLSTM
from factorlm.nn.lstm import LSTM

__all__ = ["CELLS", "register_cell", "cell_class", "cell_arg_declarations", "check_cell_args",
           "layer_cell_args", "example_cell_args"]

CELLS: dict[str, type[LSTMBase]] = {
    "lstm": LSTM,  # the paper's LSTMP baseline
    "flstm": FLSTM,  # F-LSTM: factorized gate matrix (argument rank)
    "glstm": GLSTM,  # G-LSTM: groups (argument groups)
    "gflstm": GFLSTM,  # G∘F-LSTM: groups of low rank (arguments groups, rank)
    "diagonal": DiagonalLSTM,  # IndyLSTM: per-gate diagonal recurrence (no argument)
    "circulant": CirculantLSTM,  # C-LSTM: block-circulant gate matrices (argument block)
}

#: names a cell argument cannot take: LSTMBase's own constructor arguments, and ModelConfig's
#: fields that hold the cell choice
_RESERVED = set(inspect.signature(LSTMBase.__init__).parameters) - {"self"} | {"cell", "cell_args"}


def register_cell(name: str, cls: type[LSTMBase]) -> type[LSTMBase]:
    """Add ``cls`` to CELLS under ``name`` (returns cls). Its ``cell_args`` are checked here: CellArg
    entries with distinct names that are not LSTMBase's own arguments, and that declare an argument
    another cell also takes the same way (one command-line option serves both)."""
    if not isinstance(name, str) or not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"a cell name must be a word such as 'flstm', got {name!r}")
    if name in CELLS:
        raise ValueError(f"cell {name!r} is already registered ({CELLS[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, LSTMBase)):
        raise TypeError(f"cell {name!r}: expected a subclass of factorlm.nn.base.LSTMBase, got {cls!r}")
    args = getattr(cls, "cell_args", ())
    if not isinstance(args, tuple) or not all(isinstance(a, CellArg) for a in args):
        raise TypeError(f"{cls.__name__}.cell_args must be a tuple of factorlm.nn.cell_args.CellArg, got {args!r}")
    names = [a.name for a in args]
    if len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}.cell_args declares an argument twice: {names}")
    declared = cell_arg_declarations()
    for arg in args:
        if arg.name in _RESERVED or not arg.name.isidentifier():
            raise ValueError(f"{cls.__name__}: {arg.name!r} cannot name a cell argument "
                             f"(reserved: {sorted(_RESERVED)})")
        other = declared.get(arg.name)
        if other is not None and (other.parse, other.per_layer) != (arg.parse, arg.per_layer):
            raise ValueError(f"{cls.__name__}: argument {arg.name!r} is already declared by another cell with "
                             f"another form (parse / per_layer); give it another name")
    CELLS[name] = cls
    return cls


def cell_class(name: str) -> type[LSTMBase]:
    """The layer class registered as ``name``."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {tuple(CELLS)}, got {name!r}") from None


def _declared(cell: str) -> tuple[CellArg, ...]:
    return getattr(cell_class(cell), "cell_args", ())


def cell_arg_declarations() -> dict[str, CellArg]:
    """Every registered cell's arguments by name (an argument two cells share appears once)."""
    declared: dict[str, CellArg] = {}
    for cls in CELLS.values():
        for arg in getattr(cls, "cell_args", ()):
            declared.setdefault(arg.name, arg)
    return declared


def check_cell_args(cell: str, args: Mapping) -> dict:
    """``args`` checked against what ``cell`` declares, in declaration order: every required
    argument present, no argument the cell does not take (a None value counts as absent and is
    left out). Lists become tuples (JSON has no tuples). Raises ValueError naming the cell and
    the argument."""
    declared = _declared(cell)
    if not isinstance(args, Mapping):
        raise ValueError(f"cell_args must be a mapping of argument name to value, got {args!r}")
    names = [a.name for a in declared]
    foreign = sorted(name for name, value in args.items() if value is not None and name not in names)
    if foreign:
        takes = f"it takes {', '.join(names)}" if names else "it takes none beyond torch.nn.LSTM's"
        raise ValueError(f"cell {cell!r} takes no argument {', '.join(map(repr, foreign))}; {takes}")
    for arg in declared:
        if arg.required and args.get(arg.name) is None:
            raise ValueError(f"cell {cell!r} needs {arg.name}: {arg.help}")
    return {a.name: _tuples(args[a.name]) for a in declared if args.get(a.name) is not None}


def layer_cell_args(cell: str, args: Mapping, layer: int, num_layers: int) -> dict:
    """The arguments layer ``layer`` of a ``num_layers`` stack takes when built as its own one-layer
    module: per-layer values sliced to that layer's (``rank=(3, 5)`` -> layer 1 gets ``rank=5``)."""
    return {a.name: a.for_layer(args[a.name], layer, num_layers) for a in _declared(cell) if a.name in args}


def example_cell_args(cell: str, num_layers: int = 1, per_layer: bool = False) -> dict:
    """Arguments that suit small test layers (sizes divisible by 4; see CellArg.example); with
    per_layer, different values per layer where the cell allows it."""
    args = {}
    for arg in _declared(cell):
        if per_layer and arg.per_layer_example is not None:
            args[arg.name] = tuple(arg.per_layer_example[:num_layers])
        else:
            args[arg.name] = arg.example
    return args


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
