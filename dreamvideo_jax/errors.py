"""The errors a user can cause, each printed by the command layer as one `error: ...` line.

Every class here means "the input is wrong, the software is fine": the command-line entry points catch
:class:`UserError` and print ``str(e)`` on one line (exit status 2 for bad arguments, 1 for failed runs); any
other exception is a bug and keeps its traceback (in the log).
"""

from __future__ import annotations

import errno
from typing import Any


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class InputError(UserError, ValueError):
    """A bad argument: ``str(e)`` is one line, ``--{name}={value}: {reason}``."""

    def __init__(self, name: str, value: Any, reason: str):
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"--{name}={show(value)}: {reason}")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint, base or workdir that cannot be used (missing, unreadable, incompatible)."""


class DataError(UserError, RuntimeError):
    """A dataset that cannot be used (e.g. none of its records can be read)."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be created or written."""


class IncompatibleConfigError(UserError, ValueError):
    """The config's architecture differs from the one a checkpoint was written with."""


def show(value: Any) -> str:
    """A value as one short line (for messages)."""
    s = value if isinstance(value, str) else repr(value)
    s = " ".join(str(s).split())
    return s if len(s) <= 120 else s[:117] + "..."


def one_line(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an exception on one line, cut at ``limit`` characters."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}"


# What a full disk looks like: OSError's errno, or the text of libraries that wrap it (TensorStore, which writes
# orbax's arrays: "... No space left on device [os_error_code='28']").
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_DISK_FULL_TEXT = {"no space left on device": "no space left on device", "os_error_code='28'": "no space left on device",
                   "disk quota exceeded": "disk quota exceeded"}


def disk_full(e: BaseException) -> str | None:
    """'no space left on device' (or 'disk quota exceeded') when `e`, an exception it was raised from or during,
    or one it groups is a full disk; else None."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return _DISK_FULL[x.errno]
        text = str(x).lower()
        for needle, reason in _DISK_FULL_TEXT.items():
            if needle in text:
                return reason
        stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None
