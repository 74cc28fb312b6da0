"""How every command-line tool answers a mistake: one line on stderr, exit status 2, no traceback.

A week-long run must not end in a page of omegaconf or Lightning frames because a path was mistyped, and a
user must not have to read a traceback to find the one line that says what to fix. Every CLI
(``wallaroo.fit``, ``generate``, ``evaluate``, ``convert``, ``demo``, ``datamodules.convert``) runs its
``main`` through :func:`run_cli`, which turns these exceptions into ``PROG: error: MESSAGE``:

- :class:`UsageError` (a ``ValueError``): a missing environment variable, a size outside the model's
  buckets, an option that makes no sense: exit status 2;
- ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError`` and
  ``FileExistsError`` (a path that is missing or unusable): the message names the path, exit status 2;
- ``SystemExit`` with a message (our code's ``raise SystemExit("...")`` refusals): exit status 2;
- :class:`RunStopped` (a run that stopped on purpose, e.g. after ``max_bad_steps`` non-finite steps in a
  row): exit status 1.

Anything else is a programming error and keeps its traceback. ``--debug`` anywhere on the command line (it
is taken out before the tool parses its arguments) or ``WALLAROO_DEBUG=1`` shows the traceback of the
errors above too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_STOPPED = 1
DEBUG_FLAG = "--debug"
DEBUG_ENV = "WALLAROO_DEBUG"
FILE_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


class UsageError(ValueError):
    """A mistake in what the user asked for; shown as one line with exit status 2 by :func:`run_cli`.

    A ``ValueError``, so code (and tests) that catch the ``ValueError`` a bad value used to raise still do.
    """


class RunStopped(RuntimeError):
    """A run that stopped on purpose with a message saying why and where to resume; exit status 1."""


def require_path(path: str | os.PathLike[str], option: str, kind: str = "any") -> Path:
    """``path`` as a ``Path`` when it exists, is a ``kind`` (``"file"``, ``"dir"`` or ``"any"``) and is readable;
    else a :class:`UsageError` naming the option and the path. For a tool to check its inputs before it loads
    a model, instead of failing on them minutes later."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such {'file or directory' if kind == 'any' else kind}")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{option} {path}: not a file")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{option} {path}: not a directory")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise UsageError(f"{option} {path}: permission denied")
    return p


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the arguments or ``WALLAROO_DEBUG`` set to anything but ``""``/``0``."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """``(message, exit status)`` when ``exc`` is one of the user-facing errors above, else ``None``."""
    if isinstance(exc, UsageError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, RunStopped):
        return str(exc), EXIT_STOPPED
    if isinstance(exc, SystemExit):
        return (exc.code, EXIT_USAGE) if isinstance(exc.code, str) else None
    if isinstance(exc, FILE_ERRORS):
        if exc.filename is not None:
            what = exc.strerror or type(exc).__name__
            target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
            return f"{what}: {exc.filename}{target}", EXIT_USAGE
        return str(exc) or type(exc).__name__, EXIT_USAGE
    return None


def one_line(message: str) -> str:
    """The non-empty lines of ``message`` joined with ``"; "``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *, prog: str) -> int:
    """Run ``main(args)`` (``args``: ``argv`` or the command line, without ``--debug``) and return the exit
    status: ``main``'s own when it returns an int, 0 otherwise, or that of a user-facing error, printed as
    ``PROG: error: MESSAGE`` on stderr. Other exceptions propagate with their traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        result = main(args)
    except BaseException as exc:  # noqa: BLE001 - everything not user-facing is re-raised unchanged
        found = None if debug else user_error(exc)
        if found is None:
            raise
        message, status = found
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
        return status
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
