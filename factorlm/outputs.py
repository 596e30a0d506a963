"""Checking, before the work starts, that a command's outputs can be written.

A command that can only fail at its end (an evaluation whose ``--json`` file lies in a missing
directory, a run directory on a read-only filesystem or below a plain file) is told so before it
spends any time, in one line: an OutputError naming the path and the reason. The checks write and
remove a small probe file, because permission bits do not tell the whole story (a read-only
mount, a full quota, root ignoring the bits).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from factorlm.errors import OutputError

__all__ = ["ensure_directory", "check_writable_file"]


def ensure_directory(path: str | os.PathLike, what: str) -> Path:
    """Create directory ``path`` (and its parents) if needed and check that files can be written
    in it; returns it. ``what`` names it in errors ("run directory")."""
    text = os.fspath(path)
    if not text.strip():  # Path("") is the current directory: never what an empty option meant
        raise OutputError(f"the {what} must be a path, got {text!r}", text)
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file; expected a directory", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the {what} {path}: {_reason(exc, path)}", path) from None
    _probe(path, f"the {what} {path}")
    return path


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check that file ``path`` can be written (created or replaced) without writing it; returns it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; expected a file name", path)
    parent = path.parent
    if not parent.is_dir():
        state = "is a file" if parent.exists() else "does not exist"
        raise OutputError(f"cannot write {what} {path}: the directory {parent} {state}", path)
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as exc:
            raise OutputError(f"cannot write {what} {path}: {_reason(exc, path)}", path) from None
    else:
        _probe(parent, f"{what} {path}")
    return path


def _probe(directory: Path, subject: str) -> None:
    """Create and remove a file in ``directory``; OutputError naming ``subject`` when that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".factorlm-write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"cannot write to {subject}: {_reason(exc, directory)}", directory) from None


def _reason(exc: OSError, path: Path) -> str:
    """The system's reason, or which ancestor of ``path`` is a file when that is the cause."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    return exc.strerror or str(exc)
