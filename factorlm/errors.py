"""The errors a user can fix, all under one base: ``factorlm`` prints them as one line, no traceback.

Each also derives from the built-in exception it has always been (ValueError, RuntimeError, ...),
so ``except ValueError`` in existing code still catches it. Besides the errors: Interrupted (a
clean stop on a signal, with the exit status the shell expects) and ConfigWarning. This module
imports nothing from factorlm: every other module may raise these.
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


class SetupError(FactorlmError, RuntimeError):
    """A run that cannot start on this machine or process layout (CUDA missing, a rank count that
    does not fit the data or the checkpoint)."""


class OutputError(FactorlmError, OSError):
    """A file or directory factorlm must write cannot be written: a full disk, a read-only
    filesystem, a parent that is missing or is a file. ``path``: what could not be written."""

    def __init__(self, message: str, path=None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # OSError's own __str__ would add an errno prefix when there is one
        return self.args[0]


class RunStoppedError(FactorlmError, RuntimeError):
    """Training stopped on an error after it had started; the message says what was saved."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal after finishing cleanly (training: after saving a checkpoint).

    A KeyboardInterrupt, as Ctrl-C has always been; ``factorlm`` exits with ``exit_status``, the
    shell's convention 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + int(signum)


class ConfigWarning(UserWarning):
    """A setting that works but is very likely not what was meant (e.g. an F-LSTM rank so large
    that the factorization has more parameters than the dense matrix it replaces)."""


class InputShapeError(FactorlmError, ValueError, RuntimeError):
    """A layer's input or initial state of the wrong shape. A RuntimeError, as torch.nn.LSTM raises
    for the same mistakes (code written for it catches it unchanged), and a ValueError, as factorlm's
    layers have always raised."""
