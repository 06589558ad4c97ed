"""``migrate``: bring a store written by an earlier version to this version's layout."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from ..config import CLI_DEFAULT_URL
from ..manager import StateManager
from .options import DebugOption, JsonOption, UrlOption
from .session import Session, sqlite_path

__all__ = ["migrate", "sqlite_version"]


def sqlite_version(path: Path) -> int | None:
    """The schema version (``PRAGMA user_version``) of a SQLite file, read without changing it;
    ``None`` when it cannot be read (opening the store then says why).

    ``mode=rw``, not ``ro``: it never creates the file, and a read-only connection could not
    read a WAL file whose shared-memory file is gone.
    """
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)) as db,
    ):
        row = db.execute("PRAGMA user_version").fetchone()
        return int(row[0])
    return None


def migrate(
    url: UrlOption = CLI_DEFAULT_URL, json_output: JsonOption = False, debug: DebugOption = False
) -> None:
    """Bring a store written by an earlier version (0.4, 0.5) to this version's layout.

    A SQLite file is migrated in one transaction as it opens (a file from a newer version is
    refused untouched); PostgreSQL migrates its schema at the first operation; a Redis namespace
    is converted by the store itself: run this once every process of an older version using it
    has stopped. Running it again does nothing. Prints what was done.
    """
    session = Session(url, json_output)
    path = sqlite_path(url) if "://" in url else None
    before = sqlite_version(path) if path is not None and path.is_file() else None
    with session.open() as manager:
        report = _migrate(manager, path, before)
        if session.json:
            session.emit({"url": manager.url, **report})
            return
        for line in report["done"]:
            session.say(line)


def _migrate(manager: StateManager, path: Path | None, before: int | None) -> dict[str, Any]:
    """What migrating ``manager``'s store did: ``done`` (lines for a person), ``migrated``
    (whether anything changed; ``None`` when only the store's report can say) and, for a SQLite
    file, its ``schema_version`` before and after."""
    if path is not None:
        # Opening the file migrated it; its schema version says whether there was anything to do.
        after = sqlite_version(path)
        migrated = before is not None and after is not None and after > before
        if migrated:
            line = f"{manager.url}: schema migrated from version {before} to {after}"
        else:
            line = f"{manager.url}: schema already at this version's layout (version {after}); nothing to do"
        return {"migrated": migrated, "done": [line], "schema_version": {"before": before, "after": after}}
    # One operation first: a store that migrates its schema at its first use (PostgreSQL) does
    # it now, and an unreachable one fails here, before anything is converted.
    manager.stats()
    text = manager.backend.migrate()
    return {
        "migrated": None,
        "done": text.splitlines() or [f"{manager.url}: nothing to migrate"],
        "report": text,
    }
