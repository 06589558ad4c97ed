"""What a command holds while it runs: the store its ``--url`` names and its output streams."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..config import CLI_DEFAULT_URL, ENV_AUDIT_KEY, ENV_URL
from ..errors import ConfigurationError
from ..manager import StateManager
from ..models import MAX_TIMESTAMP
from .exit_codes import EXIT_CHECK_FAILED, EXIT_NOT_FOUND, CommandError

__all__ = ["Session", "clear_store", "confirm", "open_store", "sqlite_path", "url_flag"]


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names (``None`` for other URLs and in-memory SQLite)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite" or not rest.startswith("/"):
        return None
    raw = unquote(rest[1:].split("?", 1)[0])
    if raw in ("", ":memory:"):
        return None
    return Path(raw)


def _check_url(url: str) -> None:
    if "://" in url:
        return
    hint = ""
    if url.endswith((".db", ".sqlite", ".sqlite3")):
        hint = f"; did you mean sqlite:///{url}?"
    elif url.startswith("localhost") or re.fullmatch(r"[\w.-]+:\d+(/\d+)?", url):
        hint = f"; did you mean redis://{url}?"
    raise ConfigurationError(
        f"{url[:64]!r} is not a store URL (sqlite:///file.db, redis://host:6379/0, memory://){hint}"
    )


def _audit_key(env_name: str) -> str | None:
    key = os.environ.get(env_name) or None
    if key is not None and len(key.encode("utf-8")) < 16:
        raise ConfigurationError(
            f"${env_name} is shorter than 16 bytes; use a long random key, e.g. "
            'python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return key


def open_store(
    url: str,
    *,
    must_exist: bool = True,
    key_env: str = ENV_AUDIT_KEY,
    prices: Mapping[str, Mapping[str, Any]] | None = None,
) -> StateManager:
    """A manager for ``url``; with ``must_exist``, a SQLite file must already hold a store.

    A command that only reads (or changes what a store holds) never creates one: a missing
    file is an error, and so is a file that is empty or holds no store (the SQLite store's
    ``create=False``), which is left as it is. The audit chain's HMAC key, if any, comes from
    the environment variable ``key_env``; ``prices`` is the manager's price table (the demo's).
    """
    _check_url(url)
    path = sqlite_path(url)
    options: dict[str, Any] = {}
    if must_exist and path is not None:
        if not path.exists():
            raise CommandError(
                f"{url}: no such file {str(path)!r} (create a store with `iron-state demo{url_flag(url)}`, "
                "or pass the right --url)",
                EXIT_NOT_FOUND,
            )
        options["create"] = False
    return StateManager.from_url(url, audit_key=_audit_key(key_env), prices=prices, **options)


def url_flag(url: str) -> str:
    """``--url ...`` to repeat in suggested commands, or nothing for the default store."""
    if url == (os.environ.get(ENV_URL) or CLI_DEFAULT_URL):
        return ""
    return f" --url {shlex.quote(url)}"


def clear_store(manager: StateManager) -> tuple[int, int, int]:
    """Remove every agent, every budget scope and every audit record; how many of each."""
    agents = 0
    for agent_id in manager.list_agents():
        agents += manager.remove_agent_state(agent_id)
    scopes = sum(manager.remove_budget(budget.scope) for budget in manager.list_budgets())
    # Last: removing a scope writes an audit event.
    records = manager.prune_audit_log(before=MAX_TIMESTAMP)
    return agents, scopes, records


class Session:
    """One command's output streams and store."""

    def __init__(self, url: str, json_output: bool = False) -> None:
        self.url = url
        self.json = json_output
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    def open(
        self, *, must_exist: bool = True, prices: Mapping[str, Mapping[str, Any]] | None = None
    ) -> StateManager:
        """The manager for ``--url`` (close it, or use it in a ``with``); ``prices``: its price table."""
        return open_store(self.url, must_exist=must_exist, prices=prices)

    def emit(self, data: Any) -> None:
        """Write one JSON document to stdout."""
        sys.stdout.write(json.dumps(data, indent=2, allow_nan=False))
        sys.stdout.write("\n")

    def emit_line(self, data: Any) -> None:
        """Write one JSON document on one line of stdout, at once (a reader may be waiting for it)."""
        sys.stdout.write(json.dumps(data, allow_nan=False) + "\n")
        sys.stdout.flush()

    def say(self, message: str) -> None:
        """A line of human output on stdout (plain text: no Rich markup is read in it)."""
        self.out.print(message, markup=False)

    def note(self, message: str) -> None:
        """A message for the person at the terminal (stderr, never mixed into output)."""
        self.err.print(message, markup=False)

    def progress(self) -> Progress:
        """A progress bar on stderr (drawn only when stderr is a terminal)."""
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            disable=not self.err.is_terminal,
        )


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # A pipe or file: do not cut tables at 80 columns (Rich's default width there).
        console = Console(stderr=stderr, highlight=False, width=max(console.width, 200))
    return console


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def confirm(yes: bool, question: str) -> None:
    """Ask ``question`` on the terminal unless ``--yes``; a refusal, or no terminal, stops the command."""
    if yes:
        return
    if not _stdin_is_terminal():
        raise CommandError(f"{question} Pass --yes to confirm (stdin is not a terminal)")
    if not typer.confirm(question, default=False, err=True):
        raise CommandError("cancelled, nothing was changed", EXIT_CHECK_FAILED)
