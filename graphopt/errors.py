"""Error types of graphopt and the exit code each one maps to.

The CLI contract (DESIGN.md §2): exit 0 done, 1 validation failed, 2 bad input or usage. Anything else that
escapes is a bug in graphopt; the CLI reports it in one line with exit code 3 (``--debug`` shows the traceback).
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_VALIDATION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, as a shell reports a reader that stopped reading (`| head`)


class GraphoptError(Exception):
    """A problem the user can act on; its message is one line and names the problem."""

    exit_code: int = EXIT_USAGE


class UsageError(GraphoptError):
    """Bad command line, pass name, option or option value."""


class InputError(GraphoptError):
    """A model or data file that cannot be read, is invalid, or is unsupported."""


class OutputError(GraphoptError):
    """The output cannot be written where asked (missing folder, not writable, same file as the input)."""


class ValidationFailed(GraphoptError):
    """The rewritten model does not match the original within tolerance; ``report`` holds the evidence."""

    exit_code = EXIT_VALIDATION

    def __init__(self, message: str, model: Any = None, report: Any = None) -> None:
        super().__init__(message)
        self.model = model
        self.report = report


class InternalError(GraphoptError):
    """A bug in graphopt (a pass crashed or produced an invalid model); never the user's fault."""

    exit_code = EXIT_INTERNAL


def one_line(exc: BaseException) -> str:
    """First non-empty line of an exception message, with the type name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
