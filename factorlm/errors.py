"""The errors a user can fix, all under one base: ``factorlm`` prints them as one line, no traceback.

Each also derives from the built-in exception it has always been (ValueError, RuntimeError, ...),
so ``except ValueError`` in existing code still catches it. This module imports nothing from
factorlm: every other module may raise these.
"""

from __future__ import annotations


class FactorlmError(Exception):
    """Base of factorlm's user-facing errors. ``factorlm`` exits with ``exit_status``."""

    exit_status = 2


class CLIError(FactorlmError):
    """A command-line request that cannot be carried out (a missing file, a split the corpus lacks)."""


class ConfigError(FactorlmError, ValueError):
    """A preset, config file or config dict that does not describe a valid run."""


class CheckpointError(FactorlmError, ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, of another format, or trained
    on another vocabulary than the one given."""


class TrainingError(FactorlmError, RuntimeError):
    """Training stopped on a condition the user must look at (e.g. a non-finite loss)."""

    exit_status = 1


class InputShapeError(FactorlmError, ValueError, RuntimeError):
    """A layer's input or initial state of the wrong shape. A RuntimeError, as torch.nn.LSTM raises
    for the same mistakes (code written for it catches it unchanged), and a ValueError, as factorlm's
    layers have always raised."""
