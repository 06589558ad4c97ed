"""The ``iron-state`` command line: a live demo, inspection, the audit trail, copies and metrics.

Installed with the ``cli`` extra (``pip install 'iron-runtime-state[cli]'``); built with Typer
and Rich, which only this entry point imports, lazily, so the library itself never needs them.
The commands live in :mod:`iron_runtime_state._cli_app`; see ``docs/cli.md`` for the guide.

Every command takes ``--url`` (default ``$IRON_STATE_URL``, else ``sqlite:///iron_state.db`` in
the working folder), prints tables, or JSON on stdout with ``--json`` (progress and messages go
to stderr), and ends with one of these exit statuses:

====  ===========================================================================================
0     success
1     a check failed: ``verify`` found a broken chain, ``copy`` could not verify, a refused operation
2     bad input: an unknown option or value, a bad store URL, a bad agent id, a missing extra
3     the store is unreachable or failed (a :class:`~iron_runtime_state.BackendError`)
4     not found: the agent (or the SQLite file) does not exist
130   interrupted (Ctrl-C), except for ``audit --follow`` and ``metrics``, which stop with 0
====  ===========================================================================================

An error is one line on stderr, ``error: <message>``; ``--debug`` (or ``IRON_STATE_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Final

__all__ = [
    "DEFAULT_URL",
    "EXIT_CHECK_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "main",
]

#: The store the commands use without ``--url`` or ``$IRON_STATE_URL``: a file in this folder.
DEFAULT_URL: Final = "sqlite:///iron_state.db"

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_INTERRUPTED: Final = 130

MISSING_EXTRA: Final = (
    "error: the iron-state command line needs the 'cli' extra: pip install 'iron-runtime-state[cli]'"
)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``iron-state`` with ``argv`` (default ``sys.argv[1:]``); exits with the status above."""
    try:
        from ._cli_app import run
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] not in ("typer", "rich", "click"):
            raise
        print(MISSING_EXTRA, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    run(argv)


def __getattr__(name: str) -> Any:
    # ``iron_runtime_state.cli.app``, the Typer application (for CliRunner and embedding),
    # imported on first use so that importing this module never needs Typer.
    if name == "app":
        from ._cli_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
