"""Errors a user can act on, and how the command-line entry points report them.

Every error the project raises about its input (a config value, a data row, a model directory,
a checkpoint, a retrieval server, an index) derives from `UserError` as well as from the
built-in class it always was (``ConfigError`` is still a ``ValueError``, so existing ``except``
clauses keep working). `run_cli` wraps an entry point's ``main``: a `UserError` becomes

    error: <what went wrong, naming the file, row, field or server>
    hint: <one thing to try>            (when there is one)

and exit status 2, without a traceback; ``--debug`` (or ``DGPO_DEBUG=1``) re-raises it with
the traceback. Any other exception is a bug and keeps its traceback. This module imports
nothing heavy: the entry points use it before JAX loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "UserError",
    "MissingFileError",
    "ModelFormatError",
    "NothingToTrainError",
    "NotReproducedError",
    "OutputExistsError",
    "InvalidArgumentError",
    "debug_requested",
    "report",
    "run_cli",
    "EXIT_USER_ERROR",
]

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "DGPO_DEBUG"


class UserError(Exception):
    """An error in what the user gave (not a bug): its message names the culprit.

    ``hint`` (class default, or per instance via the keyword) is one line suggesting a fix.
    """

    hint: str | None = None

    def __init__(self, *args, hint: str | None = None):
        super().__init__(*args)
        if hint is not None:
            self.hint = hint


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist, or lacks a file it needs."""


class ModelFormatError(UserError, ValueError):
    """A model source (HF directory, checkpoint, preset) is not what its kind requires."""


class OutputExistsError(UserError, FileExistsError):
    """An output path exists and the command was not told to replace it."""

    hint = "pass --overwrite (or overwrite=True) to replace it, or choose another path"


class InvalidArgumentError(UserError, ValueError):
    """An argument of a command or function is out of range or of the wrong kind."""


class NothingToTrainError(UserError, RuntimeError):
    """A step (or a run) would train on no token: refused rather than logged as zeros."""


class NotReproducedError(UserError, RuntimeError):
    """A stage run again (on another machine, say) gave other weights than the recorded run:
    results built on the two would not be comparable, so nothing is built on the new one."""


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` on the command line or ``DGPO_DEBUG`` set to anything but '' or '0'."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(error: BaseException, hint: str | None = None, stream=None) -> None:
    """Print ``error: ...`` (one line: newlines in the message are folded) and ``hint: ...``."""
    stream = sys.stderr if stream is None else stream
    message = " ".join(str(error).split("\n")).strip() or type(error).__name__
    print(f"error: {message}", file=stream)
    hint = hint if hint is not None else getattr(error, "hint", None)
    if hint:
        print(f"hint: {hint}", file=stream)


def run_cli(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    also: tuple[type[BaseException], ...] = (),
) -> None:
    """Run ``main(args)`` (``args`` without ``--debug``) and exit with its status.

    A `UserError` (or one of ``also``: built-in errors that, at this entry point, can only come
    from the user's input, such as ``FileExistsError`` for an output directory) is printed as
    one ``error:`` line plus its ``hint:`` and exits with status 2; ``--debug`` or
    ``DGPO_DEBUG=1`` re-raises it instead. ``argv`` defaults to ``sys.argv[1:]``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        code = main(args)
    except (UserError, *also) as e:
        if debug:
            raise
        hint = getattr(e, "hint", None)
        if hint is None:
            hint = f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback"
        report(e, hint)
        code = EXIT_USER_ERROR
    sys.exit(0 if code is None else code)
