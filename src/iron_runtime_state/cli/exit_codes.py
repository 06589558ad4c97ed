"""The exit statuses of ``iron-state`` (the table is in :mod:`iron_runtime_state.cli`).

No Typer or Rich here: the entry point needs these before it knows whether the extra is installed.
"""

from __future__ import annotations

from typing import Final

from ..errors import StateError

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "CommandError",
]

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_INTERRUPTED: Final = 130


class CommandError(StateError):
    """A command that cannot go on (a refused destination, a missing file); carries its exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code
