"""The ``iron-state`` command line: a live demo, inspection, budgets, the audit trail, copies and metrics.

Installed with the ``cli`` extra (``pip install 'iron-runtime-state[cli]'``); built with Typer
and Rich, which only this entry point imports, lazily, so the library itself never needs them.
See ``docs/cli.md`` for the guide. The package, by concern:

==================  ============================================================================
``application.py``  the Typer application, its commands under their headings, and the one place
                    where an error becomes one line and an exit status
``options.py``      the options several commands share, and how times and durations are read
``session.py``      opening the store a command names, its output streams, confirmations
``render.py``       tables, JSON and formatting shared by the commands
``demo.py``         ``demo``
``fleet.py``        ``agents``, ``show``, ``stats``, ``purge``
``budgets.py``      ``budgets``, ``budget set``, ``budget show``, ``budget remove``
``spend.py``        ``spend``
``audit.py``        ``audit``, ``verify``, ``checkpoint``, ``export``, ``prune``
``copy.py``         ``copy``
``migrate.py``      ``migrate``
``metrics.py``      ``metrics``
``exit_codes.py``   the exit statuses below, and :class:`CommandError`, which carries one
==================  ============================================================================

Every command takes ``--url`` (default ``$IRON_STATE_URL``, else ``sqlite:///iron_state.db`` in
the working folder), prints tables, or JSON on stdout with ``--json`` (progress and messages go
to stderr), and ends with one of these exit statuses:

====  ===========================================================================================
0     success
1     a check failed: ``verify`` found a broken chain, ``copy`` could not verify, a refused operation
2     bad input: an unknown option or value, a bad store URL, a bad agent id, a missing extra
3     the store is unreachable or failed (a :class:`~iron_runtime_state.BackendError`)
4     not found: the agent, the budget scope (or the SQLite file) does not exist
130   interrupted (Ctrl-C), except for ``audit --follow`` and ``metrics``, which stop with 0
====  ===========================================================================================

An error is one line on stderr, ``error: <message>``; ``--debug`` (or ``IRON_STATE_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Final

from ..config import CLI_DEFAULT_URL as DEFAULT_URL
from .exit_codes import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

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

MISSING_EXTRA: Final = (
    "error: the iron-state command line needs the 'cli' extra: pip install 'iron-runtime-state[cli]'"
)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``iron-state`` with ``argv`` (default ``sys.argv[1:]``); exits with the status above."""
    try:
        from .application import run
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] not in ("typer", "rich", "click"):
            raise
        print(MISSING_EXTRA, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    run(argv)


def __getattr__(name: str) -> Any:
    # ``iron_runtime_state.cli.app``, the Typer application (for CliRunner and embedding),
    # imported on first use so that importing this package never needs Typer.
    if name == "app":
        from .application import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
