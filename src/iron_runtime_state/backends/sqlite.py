"""The SQLite store: ``sqlite:///relative.db`` and ``sqlite:////absolute.db``.

One file holds the agent states, the open budget holds, the fleet aggregates and the
hash-chained audit trail. Every process and thread that opens the same file shares them.

How it stays correct and fast (docs/sqlite.md has the user-facing version):

- **Journal.** WAL, so readers never block the writer. ``synchronous=NORMAL`` (the default):
  a commit has reached the operating system when the call returns, so it survives the process
  being killed; ``FULL`` (or ``EXTRA``) also fsyncs every commit, so it survives power loss.
- **Connections.** One per thread (``threading.local``), all registered so :meth:`close` can
  close them; a connection is never shared between threads, so nothing relies on the GIL.
  Connections inherited across ``fork()`` are abandoned in the child, never used or closed.
- **Atomicity.** A write that is one statement runs in autocommit; every read-modify-write
  runs in ``BEGIN IMMEDIATE``, which takes the write lock before reading, so no two writers
  interleave and no transaction has to upgrade a read lock (the case the busy handler cannot
  resolve). Waits are bounded by ``busy_timeout``.
- **Aggregates.** ``iron_stats`` is kept by triggers on ``iron_agents``, in the same
  transaction as each change, so :meth:`SQLiteBackend.stats` reads one row.
- **Audit chain.** ``iron_audit_chain`` holds the head (newest ``seq`` and hash ever appended)
  and the anchor (left behind by pruning). A trigger refuses any record that does not extend
  the head and moves the head, atomically with the insert. So a single append is one
  statement built from this connection's last known head; when another connection appended
  in between, the database refuses it and the append is redone under ``BEGIN IMMEDIATE``.
- **Read cache.** Each connection caches the agent rows it read or wrote, and drops them all
  whenever ``PRAGMA data_version`` says another connection (any thread or process) committed.
- **Schema.** :data:`MIGRATIONS` is an ordered list; the number applied is stored in
  ``PRAGMA user_version`` and the file is marked with ``PRAGMA application_id``. A file from a
  newer version, from another application, or that is not a database is refused untouched.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Final

from ..audit_chain import GENESIS_HASH, AuditChain, AuditRow
from ..errors import (
    AgentNotFound,
    AgentNotRunning,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    ReservationError,
    SchemaError,
    StateError,
    StateTypeError,
)
from ..ids import AgentId, try_parse
from ..models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    exceeds,
)
from .base import AuditQuery, Backend, CommitResult, SpendResult, UpdateFn

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "OPTIONS",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "SQLiteBackend",
    "audit_select",
    "open_sqlite",
    "parse_sqlite_url",
]

# -- the schema ------------------------------------------------------------------------------

#: ``PRAGMA application_id`` of every store file: "IRON" in ASCII.
APPLICATION_ID: Final = 0x49524F4E

#: Schema migrations, in order: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
#: The version (how many have been applied) is ``PRAGMA user_version``. Append new entries;
#: never edit one that has shipped. Each runs in one transaction with its version bump.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: agents with fleet aggregates, budget holds, and the hash-chained audit trail.
    (
        # status: 0 running, 1 stopped, 2 failed. budget_limit NULL: no limit.
        # changed_at: Unix time of the last change (purge_agents).
        """CREATE TABLE iron_agents (
            agent_id       TEXT    NOT NULL PRIMARY KEY,
            status         INTEGER NOT NULL,
            budget_spent   REAL    NOT NULL,
            pii_detections INTEGER NOT NULL,
            budget_limit   REAL,
            changed_at     REAL    NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE iron_stats (
            id             INTEGER PRIMARY KEY CHECK (id = 0),
            running        INTEGER NOT NULL,
            stopped        INTEGER NOT NULL,
            failed         INTEGER NOT NULL,
            budget_spent   REAL    NOT NULL,
            pii_detections INTEGER NOT NULL
        )""",
        "INSERT INTO iron_stats VALUES (0, 0, 0, 0, 0.0, 0)",
        """CREATE TRIGGER iron_agents_inserted AFTER INSERT ON iron_agents BEGIN
            UPDATE iron_stats SET
                running = running + (NEW.status = 0),
                stopped = stopped + (NEW.status = 1),
                failed = failed + (NEW.status = 2),
                budget_spent = budget_spent + NEW.budget_spent,
                pii_detections = pii_detections + NEW.pii_detections;
        END""",
        """CREATE TRIGGER iron_agents_updated
        AFTER UPDATE OF status, budget_spent, pii_detections ON iron_agents BEGIN
            UPDATE iron_stats SET
                running = running + (NEW.status = 0) - (OLD.status = 0),
                stopped = stopped + (NEW.status = 1) - (OLD.status = 1),
                failed = failed + (NEW.status = 2) - (OLD.status = 2),
                budget_spent = budget_spent + (NEW.budget_spent - OLD.budget_spent),
                pii_detections = pii_detections + (NEW.pii_detections - OLD.pii_detections);
        END""",
        # Removing an agent drops its holds; the last one out resets the float sum to 0 so
        # no rounding drift is left behind in an empty store.
        """CREATE TRIGGER iron_agents_deleted AFTER DELETE ON iron_agents BEGIN
            DELETE FROM iron_holds WHERE agent_id = OLD.agent_id;
            UPDATE iron_stats SET
                running = running - (OLD.status = 0),
                stopped = stopped - (OLD.status = 1),
                failed = failed - (OLD.status = 2),
                budget_spent = CASE WHEN running + stopped + failed = 1 THEN 0.0
                                    ELSE budget_spent - OLD.budget_spent END,
                pii_detections = pii_detections - OLD.pii_detections;
        END""",
        """CREATE TABLE iron_holds (
            agent_id       TEXT NOT NULL,
            reservation_id TEXT NOT NULL,
            amount         REAL NOT NULL,
            expires_at     REAL NOT NULL,
            PRIMARY KEY (agent_id, reservation_id)
        ) WITHOUT ROWID""",
        # seq is the rowid, so each index below also orders by seq within its key.
        """CREATE TABLE iron_audit (
            seq        INTEGER PRIMARY KEY,
            agent_id   TEXT    NOT NULL,
            event_type TEXT    NOT NULL,
            timestamp  INTEGER NOT NULL,
            details    TEXT    NOT NULL,
            prev_hash  TEXT    NOT NULL,
            hash       TEXT    NOT NULL
        )""",
        "CREATE INDEX iron_audit_by_agent ON iron_audit (agent_id)",
        "CREATE INDEX iron_audit_by_type ON iron_audit (event_type)",
        "CREATE INDEX iron_audit_by_time ON iron_audit (timestamp)",
        """CREATE TABLE iron_audit_chain (
            id          INTEGER PRIMARY KEY CHECK (id = 0),
            head_seq    INTEGER NOT NULL,
            head_hash   TEXT    NOT NULL,
            anchor_seq  INTEGER NOT NULL,
            anchor_hash TEXT    NOT NULL
        )""",
        f"INSERT INTO iron_audit_chain VALUES (0, 0, '{GENESIS_HASH}', 0, '{GENESIS_HASH}')",
        # The chain's guard: a record must be seq head+1 and link to the head's hash, so no
        # writer (of any version) can fork, reorder or leave gaps in the trail.
        """CREATE TRIGGER iron_audit_appended AFTER INSERT ON iron_audit BEGIN
            SELECT RAISE(ABORT, 'iron_runtime_state: audit record does not extend the chain head')
            FROM iron_audit_chain
            WHERE NEW.seq IS NOT head_seq + 1 OR NEW.prev_hash IS NOT head_hash;
            UPDATE iron_audit_chain SET head_seq = NEW.seq, head_hash = NEW.hash;
        END""",
    ),
)

#: The schema version this code writes: the number of migrations.
SCHEMA_VERSION: Final = len(MIGRATIONS)

#: Schema objects the current version needs; a file missing one was changed by hand.
_REQUIRED: Final = frozenset(
    {
        "iron_agents",
        "iron_stats",
        "iron_holds",
        "iron_audit",
        "iron_audit_chain",
        "iron_audit_by_agent",
        "iron_audit_by_type",
        "iron_audit_by_time",
        "iron_agents_inserted",
        "iron_agents_updated",
        "iron_agents_deleted",
        "iron_audit_appended",
    }
)

# -- the statements ----------------------------------------------------------------------------

_STATE: Final = "status, budget_spent, pii_detections, budget_limit"
_SQL_GET: Final = f"SELECT {_STATE} FROM iron_agents WHERE agent_id = ?"
_SQL_GET_IN: Final = f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id IN ({{}})"
_SQL_UPSERT: Final = (
    "INSERT INTO iron_agents (agent_id, status, budget_spent, pii_detections, budget_limit, changed_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent_id) DO UPDATE SET status = excluded.status, "
    "budget_spent = excluded.budget_spent, pii_detections = excluded.pii_detections, "
    "budget_limit = excluded.budget_limit, changed_at = excluded.changed_at"
)
_SQL_REPLACE: Final = (
    "UPDATE iron_agents SET status = ?, budget_spent = ?, pii_detections = ?, budget_limit = ?, "
    "changed_at = ? WHERE agent_id = ?"
)
_SQL_SET_SPENT: Final = "UPDATE iron_agents SET budget_spent = ?, changed_at = ? WHERE agent_id = ?"
_SQL_SET_PII: Final = "UPDATE iron_agents SET pii_detections = ?, changed_at = ? WHERE agent_id = ?"
_SQL_SET_STATUS: Final = "UPDATE iron_agents SET status = ?, changed_at = ? WHERE agent_id = ?"
_SQL_REMOVE: Final = "DELETE FROM iron_agents WHERE agent_id = ?"
_SQL_IDS: Final = "SELECT agent_id FROM iron_agents"
_SQL_PAGE: Final = f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id > ? ORDER BY agent_id LIMIT ?"
_SQL_PAGE_STATUS: Final = (
    f"SELECT agent_id, {_STATE} FROM iron_agents WHERE agent_id > ? AND status = ? ORDER BY agent_id LIMIT ?"
)
_SQL_STATS: Final = "SELECT running, stopped, failed, budget_spent, pii_detections FROM iron_stats"
_SQL_PURGEABLE: Final = "SELECT agent_id FROM iron_agents WHERE status IN ({}) AND changed_at < ?"
_SQL_PURGE: Final = "DELETE FROM iron_agents WHERE status IN ({}) AND changed_at < ?"
_SQL_DATA_VERSION: Final = "PRAGMA data_version"

# An agent with each of its holds (one row per hold; hold columns NULL when it has none).
_SQL_WITH_HOLDS: Final = (
    "SELECT a.status, a.budget_spent, a.pii_detections, a.budget_limit, h.amount, h.expires_at "
    "FROM iron_agents AS a LEFT JOIN iron_holds AS h ON h.agent_id = a.agent_id "
    "WHERE a.agent_id = ?"
)
# The same with only the holds still open at a time.
_SQL_WITH_OPEN_HOLDS: Final = (
    "SELECT a.status, a.budget_spent, a.pii_detections, a.budget_limit, h.amount "
    "FROM iron_agents AS a LEFT JOIN iron_holds AS h ON h.agent_id = a.agent_id AND h.expires_at > ? "
    "WHERE a.agent_id = ?"
)
_SQL_DROP_EXPIRED: Final = "DELETE FROM iron_holds WHERE agent_id = ? AND expires_at <= ?"
_SQL_HOLD: Final = "INSERT INTO iron_holds (agent_id, reservation_id, amount, expires_at) VALUES (?, ?, ?, ?)"
_SQL_TAKE_HOLD: Final = "DELETE FROM iron_holds WHERE agent_id = ? AND reservation_id = ? AND expires_at > ?"

_AUDIT_COLUMNS: Final = "seq, agent_id, event_type, timestamp, details, prev_hash, hash"
_SQL_APPEND: Final = f"INSERT INTO iron_audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_SQL_HEAD: Final = "SELECT head_seq, head_hash FROM iron_audit_chain"
_SQL_ANCHOR: Final = "SELECT anchor_seq, anchor_hash FROM iron_audit_chain"
_SQL_SET_ANCHOR: Final = "UPDATE iron_audit_chain SET anchor_seq = ?, anchor_hash = ?"
_SQL_COUNT: Final = "SELECT count(*) FROM iron_audit"
_SQL_ROWS: Final = f"SELECT {_AUDIT_COLUMNS} FROM iron_audit WHERE seq > ? ORDER BY seq LIMIT ?"
# NOT INDEXED: walk seq order from the oldest record and stop at the first recent one, instead
# of sorting every recent record by seq (the time index would find them all first).
_SQL_FIRST_KEPT: Final = "SELECT seq FROM iron_audit NOT INDEXED WHERE timestamp >= ? ORDER BY seq LIMIT 1"
_SQL_LAST: Final = "SELECT seq, hash FROM iron_audit ORDER BY seq DESC LIMIT 1"
_SQL_LAST_BEFORE: Final = "SELECT seq, hash FROM iron_audit WHERE seq < ? ORDER BY seq DESC LIMIT 1"
_SQL_PRUNE: Final = "DELETE FROM iron_audit WHERE seq <= ?"

_SQL_OBJECTS: Final = "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"


def audit_select(query: AuditQuery) -> tuple[str, list[object]]:
    """The SELECT and parameters for an audit query (``query.limit`` of 0 is the caller's case).

    Every filter is a plain comparison on an indexed column. SQLite answers by agent or by event
    type from that column's index, in ``seq`` order for free. A time window alone is read from
    the time index: left to itself, SQLite would walk the whole trail in ``seq`` order to find
    a recent window. With ``after_seq`` (the next page), walking ``seq`` order from there is
    cheaper, and SQLite does that.
    """
    where: list[str] = []
    params: list[object] = []
    if query.agent_id is not None:
        where.append("agent_id = ?")
        params.append(query.agent_id.as_str())
    if query.event_type is not None:
        where.append("event_type = ?")
        params.append(query.event_type)
    if query.since is not None:
        where.append("timestamp >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("timestamp <= ?")
        params.append(query.until)
    if query.after_seq is not None:
        where.append("seq > ?")
        params.append(query.after_seq)
    sql = f"SELECT {_AUDIT_COLUMNS} FROM iron_audit"
    by_time_only = query.agent_id is None and query.event_type is None and query.after_seq is None
    if by_time_only and (query.since is not None or query.until is not None):
        sql += " INDEXED BY iron_audit_by_time"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq"
    if query.limit is not None:
        sql += " LIMIT ?"
        params.append(query.limit)
    return sql, params


# -- options -----------------------------------------------------------------------------------

#: Accepted values of ``synchronous``, weakest first. ``OFF`` is not offered: it can lose
#: acknowledged writes.
SYNCHRONOUS_MODES: Final = ("normal", "full", "extra")

DEFAULT_SYNCHRONOUS: Final = "normal"
DEFAULT_BUSY_TIMEOUT: Final = 30.0  # seconds
DEFAULT_READ_CACHE: Final = 4096  # agent states per thread
# SQLite's own default (2 MiB) cannot hold the index pages that appends to a trail of a large
# fleet touch (one leaf per agent), and appends then get ~2x slower as the trail grows.
DEFAULT_PAGE_CACHE_MIB: Final = 16  # per connection, filled only as pages are read

#: Every option of the store and its default (also accepted as URL query parameters).
OPTIONS: Final[Mapping[str, object]] = MappingProxyType(
    {
        "synchronous": DEFAULT_SYNCHRONOUS,
        "busy_timeout": DEFAULT_BUSY_TIMEOUT,
        "read_cache": DEFAULT_READ_CACHE,
        "page_cache_mib": DEFAULT_PAGE_CACHE_MIB,
    }
)

_MAX_BUSY_TIMEOUT: Final = 86_400.0  # one day; SQLite keeps the timeout in int milliseconds
_JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024  # shrink the -wal file back to this after a checkpoint
_STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
_CODE: Final = {status._value_: code for code, status in enumerate(_STATUSES)}
_RUNNING: Final = 0
_IN_CHUNK: Final = 500  # ids per "IN (...)" read
_ROWS_PER_READ: Final = 256  # audit rows per read while iterating the trail
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_new_state = object.__new__
_OLDEST_SQLITE: Final = (3, 24, 0)

# Error names for Python < 3.11, whose sqlite3 exceptions lack ``sqlite_errorname``.
_MESSAGE_NAMES: Final = (
    ("database is locked", "SQLITE_BUSY"),
    ("database table is locked", "SQLITE_LOCKED"),
    ("malformed", "SQLITE_CORRUPT"),
    ("file is not a database", "SQLITE_NOTADB"),
    ("readonly database", "SQLITE_READONLY"),
    ("unable to open database file", "SQLITE_CANTOPEN"),
    ("disk i/o error", "SQLITE_IOERR"),
    ("database or disk is full", "SQLITE_FULL"),
)


def _options_help() -> str:
    return "accepted options: " + ", ".join(f"{name} (default {value!r})" for name, value in OPTIONS.items())


def _check_synchronous(value: object) -> str:
    if isinstance(value, str) and value.lower() in SYNCHRONOUS_MODES:
        return value.lower()
    if isinstance(value, str) and value.lower() in ("off", "0"):
        raise ConfigurationError(
            "synchronous='off' is not offered: it can lose writes that were acknowledged; "
            f"use one of {SYNCHRONOUS_MODES} ('normal' survives a crashed process, 'full' also "
            "a power loss)"
        )
    raise ConfigurationError(
        f"synchronous must be one of {SYNCHRONOUS_MODES}, got {str(value)[:32]!r}; "
        "'normal' survives a crashed process, 'full' also a power loss or OS crash"
    )


def _option_number(value: object, whole: bool, low: float, high: float, problem: str) -> float:
    """An option's number (URL query values arrive as text); ``problem`` says what is expected."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value) if whole else float(value)
    kinds = (int,) if whole else (int, float)
    if isinstance(value, kinds) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise ConfigurationError(f"{problem}, got {str(value)[:32]!r}")


def _check_busy_timeout(value: object) -> float:
    return float(
        _option_number(
            value,
            False,
            0.0,
            _MAX_BUSY_TIMEOUT,
            f"busy_timeout must be a number of seconds from 0 to {_MAX_BUSY_TIMEOUT:g} "
            "(it bounds how long a call waits for another writer)",
        )
    )


def _check_read_cache(value: object) -> int:
    return int(
        _option_number(
            value,
            True,
            0,
            10_000_000,
            "read_cache must be a whole number of agent states cached per thread (0 turns it off)",
        )
    )


def _check_page_cache(value: object) -> int:
    return int(
        _option_number(
            value,
            True,
            1,
            65_536,
            "page_cache_mib must be a whole number of MiB from 1 to 65536 "
            "(SQLite's page cache per connection)",
        )
    )


def _check_path(path: object) -> str:
    """The store's absolute path (relative ones are resolved against the current folder now)."""
    if not isinstance(path, (str, os.PathLike)):
        raise StateTypeError(f"the SQLite path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise StateTypeError("the SQLite path must be text, not bytes; decode it with os.fsdecode()")
    if not text:
        raise ConfigurationError("the SQLite path is empty; give a file such as 'iron_state.db'")
    if text == ":memory:" or text.startswith("file:"):
        raise ConfigurationError(
            f"{text[:64]!r} is not a file path: a per-connection in-memory SQLite database cannot "
            "be shared by threads; use memory:// for an in-memory store, or a file path"
        )
    if "\x00" in text:
        raise ConfigurationError("the SQLite path contains a NUL character")
    return os.path.abspath(text)


# -- URLs ----------------------------------------------------------------------------------------


def open_sqlite(url: str, **options: object) -> SQLiteBackend:
    """Build the store for ``sqlite:///relative.db`` or ``sqlite:////absolute.db``.

    Options (:data:`OPTIONS`) may be keywords or URL query parameters (``?synchronous=full``);
    a keyword wins over the same option in the URL. Percent-escapes in the path are decoded.
    """
    path, from_url = parse_sqlite_url(url)
    merged: dict[str, Any] = {**from_url, **options}  # checked by SQLiteBackend
    return SQLiteBackend(path, **merged)


def parse_sqlite_url(url: str) -> tuple[str, dict[str, object]]:
    """The file path and the query options of a ``sqlite://`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "sqlite":
        raise ConfigurationError(f"{url[:64]!r} is not a sqlite:// URL; e.g. sqlite:///iron_state.db")
    location, _, query = rest.partition("?")
    if not location.startswith("/"):
        raise ConfigurationError(
            f"{url[:64]!r}: a sqlite URL names no host; use sqlite:///relative.db (three slashes) "
            "or sqlite:////absolute/path.db (four)"
        )
    path = urllib.parse.unquote(location[1:])
    if not path:
        raise ConfigurationError(f"{url[:64]!r} names no file; e.g. sqlite:///iron_state.db")
    options: dict[str, object] = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in OPTIONS:
            raise ConfigurationError(f"unknown sqlite URL option {name[:32]!r}; {_options_help()}")
        if name in options:
            raise ConfigurationError(f"sqlite URL option {name!r} is given twice")
        options[name] = value
    return path, options


def _url_of(path: str) -> str:
    return "sqlite:///" + urllib.parse.quote(path, safe="/:@+,=")


# -- errors ---------------------------------------------------------------------------------------


def _error_name(exc: BaseException) -> str:
    """SQLite's name for the error, such as ``SQLITE_BUSY_SNAPSHOT`` (``""`` if not known)."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name
    text = str(exc).lower()
    for needle, found in _MESSAGE_NAMES:
        if needle in text:
            return found
    return ""


def _is_busy(exc: BaseException) -> bool:
    return _error_name(exc).startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _file_error(path: str, exc: OSError) -> BackendError:
    """The error for a store file the operating system will not open."""
    folder = os.path.dirname(path)
    code = exc.errno
    if code == errno.EISDIR:
        why = f"it is a directory; give the path of a file, e.g. {os.path.join(path, 'iron_state.db')}"
    elif code == errno.ENOENT:
        why = f"its folder {folder} does not exist; create it first"
    elif code == errno.ENOTDIR:
        why = "a part of the path is a file, not a folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = (
            f"the location is read-only or not ours ({exc.strerror}); the store needs to read and "
            f"write the file and to create {os.path.basename(path)}-wal and -shm in {folder}"
        )
    elif code == errno.ELOOP:
        why = "the path is a symbolic link loop"
    else:
        why = exc.strerror or str(exc)
    return BackendError(f"cannot open SQLite store {path}: {why}")


def _sqlite_says(path: str) -> BaseException | None:
    """What SQLite itself reports when reading ``path`` read-only (the cause to chain)."""
    try:
        probe = sqlite3.connect(_file_uri(path, "ro"), uri=True)
    except sqlite3.Error as exc:
        return exc
    try:
        probe.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as exc:
        return exc
    finally:
        probe.close()
    return None


def _file_uri(path: str, mode: str) -> str:
    return "file:" + urllib.parse.quote(path, safe="/") + f"?mode={mode}"


# -- the file, before SQLite sees it ----------------------------------------------------------------


def _prepare_file(path: str) -> None:
    """Create the store file (owner-only) if it is missing; else check it could be ours.

    Only reads an existing file: a directory, a file that is not a SQLite database, and a file
    of another application or of a newer schema are refused before SQLite opens them, so they
    are never modified. SQLite creates the ``-wal`` and ``-shm`` files with the database
    file's permissions, so they are owner-only too.
    """
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _file_error(path, exc) from exc
    else:
        try:
            os.fchmod(fd, 0o600)  # exactly owner-only, whatever the umask
        finally:
            os.close(fd)
        return
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _file_error(path, exc) from exc
    try:
        header = os.pread(fd, 100, 0)
    except OSError as exc:
        raise _file_error(path, exc) from exc
    finally:
        os.close(fd)
    if not header:
        return  # an empty file is an empty database
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise BackendError(
            f"cannot open SQLite store {path}: the file is not a SQLite database (its first bytes "
            "are not the SQLite header); it was left untouched: give the path of a new file or "
            "of an existing store"
        ) from _sqlite_says(path)
    version = int.from_bytes(header[60:64], "big")
    application = int.from_bytes(header[68:72], "big")
    _check_identity(path, version, application, None)


def _check_identity(path: str, version: int, application: int, names: set[str] | None) -> None:
    """Refuse a file that is not ours or is newer than this code (``names``: its tables, if known)."""
    if application not in (0, APPLICATION_ID):
        raise SchemaError(
            f"SQLite store {path} belongs to another application (application_id "
            f"{application:#x}); it was left untouched: give iron-runtime-state its own file"
        )
    known = len(MIGRATIONS)
    if application == APPLICATION_ID and version > known:
        raise SchemaError(
            f"SQLite store {path} has schema version {version}, written by a newer "
            f"iron-runtime-state (this one knows versions up to {known}); it was left "
            "untouched: upgrade iron-runtime-state to open it"
        )
    if application == 0 and (version != 0 or names):
        shown = f" (it holds {sorted(names)[:5]})" if names else ""
        raise SchemaError(
            f"SQLite store {path} is a SQLite database that iron-runtime-state did not create{shown}; "
            "it was left untouched: give the store a file of its own"
        )


# -- one thread's connection -------------------------------------------------------------------------


class _Connection:
    """One thread's connection, its read cache, and its last known audit head.

    As a context manager it is one ``BEGIN IMMEDIATE`` transaction: committed when the block
    ends, rolled back when it raises.
    """

    __slots__ = ("cache", "cache_max", "db", "head", "owner", "probe", "version")

    def __init__(self, db: sqlite3.Connection, cache_max: int) -> None:
        self.db = db
        #: A cursor kept for the data_version check that precedes every cached read.
        self.probe = db.cursor()
        self.cache_max = cache_max
        #: agent id -> (status code, spent, pii, limit), valid while data_version == version.
        self.cache: dict[str, tuple[int, float, int, float | None]] | None = {} if cache_max else None
        self.version = -1
        #: (seq, hash) of the newest record this connection saw appended: a hint, checked by
        #: the database on every append.
        self.head: tuple[int, str] | None = None
        self.owner = weakref.ref(threading.current_thread())

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except BaseException:
                self._roll_back()
                raise
        self._roll_back()

    def _roll_back(self) -> None:
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    def fresh_cache(self) -> dict[str, tuple[int, float, int, float | None]] | None:
        """The read cache, emptied first if another connection committed since it was filled."""
        cache = self.cache
        if cache is not None:
            version = self.probe.execute(_SQL_DATA_VERSION).fetchone()[0]
            if version != self.version:
                cache.clear()
                self.version = version
        return cache

    def remember(self, key: str, row: tuple[int, float, int, float | None]) -> None:
        """Cache the row this connection just read or committed for ``key``."""
        cache = self.cache
        if cache is not None:
            if len(cache) >= self.cache_max and key not in cache:
                del cache[next(iter(cache))]  # the oldest entry
            cache[key] = row

    def forget(self, key: str) -> None:
        """Drop ``key`` before this connection writes it (so an interrupted write leaves no stale row)."""
        if self.cache is not None:
            self.cache.pop(key, None)

    def thread_alive(self) -> bool:
        thread = self.owner()
        return thread is not None and thread.is_alive()


# Connections inherited by a forked child. SQLite forbids using them there, and closing them is
# not safe either (rolling back a transaction the parent had open would write to the shared
# WAL index), so they are kept here, never touched, for the child's lifetime; the child's
# threads open connections of their own.
_ABANDONED: list[_Connection] = []
_LIVE: weakref.WeakSet[SQLiteBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_LIVE):
        backend._abandon_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _state(agent_id: AgentId, row: tuple[Any, ...]) -> AgentState:
    return AgentState._trusted(agent_id, _STATUSES[row[0]], row[1], row[2], row[3])


def _row_of(state: AgentState) -> tuple[int, float, int, float | None]:
    return (_CODE[state.status._value_], state.budget_spent, state.pii_detections, state.budget_limit)


def _stored_id(text: str) -> AgentId:
    agent_id = try_parse(text)
    if agent_id is None:
        raise SchemaError(
            f"the store holds an invalid agent id {text[:64]!r}: it was edited outside "
            "iron-runtime-state; remove that row or restore the file from a backup"
        )
    return agent_id


class SQLiteBackend(Backend):
    """A store in one SQLite file, shared by every thread and process that opens it.

    ``synchronous``: ``"normal"`` (default; every acknowledged write survives the process being
    killed), ``"full"`` (also survives power loss or an OS crash: each commit is fsynced) or
    ``"extra"``. ``busy_timeout``: seconds a call waits for another writer before raising
    :class:`~iron_runtime_state.BackendUnavailable`. ``read_cache``: agent states each thread
    keeps to answer reads, revalidated against other writers on every read (0 turns it off).
    ``page_cache_mib``: the most SQLite caches of the file per connection (thread).
    Any other keyword raises :class:`~iron_runtime_state.ConfigurationError`.

    The file is created owner-only (0600) if it does not exist. An existing file that is not a
    store of this or an older schema is refused with an error naming it, and never modified.
    """

    schemes = ("sqlite",)
    driver_errors = (sqlite3.Error,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        read_cache: int = DEFAULT_READ_CACHE,
        page_cache_mib: int = DEFAULT_PAGE_CACHE_MIB,
        **unknown: object,
    ) -> None:
        if unknown:
            raise ConfigurationError(f"unknown SQLite option(s) {sorted(unknown)[:8]}; {_options_help()}")
        if sqlite3.sqlite_version_info < _OLDEST_SQLITE:
            raise BackendError(
                f"the SQLite library is {sqlite3.sqlite_version}; the SQLite store needs 3.24 or newer "
                "(for UPSERT): use a Python whose sqlite3 module links a newer SQLite"
            )
        self._path = _check_path(path)
        self._synchronous = _check_synchronous(synchronous)
        self._busy_timeout = _check_busy_timeout(busy_timeout)
        self._read_cache = _check_read_cache(read_cache)
        self._page_cache_kib = _check_page_cache(page_cache_mib) * 1024
        self._uri = _file_uri(self._path, "rw")  # "rw": SQLite must never create the file itself
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._closed = False
        _prepare_file(self._path)
        try:
            self._open_schema(self._connection().db)
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise self.map_driver_error(exc) from exc
            raise
        _LIVE.add(self)

    @property
    def url(self) -> str:
        """``sqlite:////absolute/path.db`` (the path is absolute, so any process can use it)."""
        return _url_of(self._path)

    @property
    def path(self) -> str:
        """The absolute path of the database file."""
        return self._path

    @property
    def synchronous(self) -> str:
        """The durability setting: ``"normal"``, ``"full"`` or ``"extra"``."""
        return self._synchronous

    def __repr__(self) -> str:
        return f"SQLiteBackend({self._path!r}, synchronous={self._synchronous!r})"

    # -- errors ------------------------------------------------------------------------------

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a ``sqlite3`` exception, naming the file and what to do."""
        path = self._path
        name = _error_name(exc)
        detail = f"({type(exc).__name__}: {exc})"
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return BackendUnavailable(
                f"SQLite store {path} stayed locked by another connection for more than "
                f"busy_timeout={self._busy_timeout:g}s {detail}: a long transaction elsewhere holds "
                "the write lock; keep transactions short or raise busy_timeout"
            )
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return BackendError(
                f"SQLite store {path} is corrupted {detail}; it was not modified: restore it from "
                "a backup (sqlite3 .recover may save what is readable)"
            )
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
            return BackendError(
                f"cannot write SQLite store {path} {detail}: the file and its folder must be "
                f"writable by this process (SQLite keeps {os.path.basename(path)}-wal and -shm "
                "beside the file)"
            )
        if name.startswith("SQLITE_FULL"):
            return BackendError(f"SQLite store {path}: the disk is full {detail}; free some space")
        if name.startswith("SQLITE_IOERR"):
            return BackendError(f"SQLite store {path}: the operating system failed a read or write {detail}")
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc).lower():
            return BackendError(f"SQLite store {path} was closed; open a new manager to use it again")
        return BackendError(f"SQLite store {path}: {type(exc).__name__}: {exc}")

    # -- connections -------------------------------------------------------------------------

    def _connection(self) -> _Connection:
        """This thread's connection, opened on first use."""
        try:
            conn: _Connection = self._local.conn
            return conn
        except AttributeError:
            return self._connect()

    def _connect(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise BackendError(
                    f"SQLite store {self._path} was closed; open a new manager to use it again"
                )
            db = sqlite3.connect(
                self._uri,
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,  # transactions are explicit: autocommit or BEGIN IMMEDIATE
                check_same_thread=False,  # only close() touches another thread's connection
                cached_statements=256,
            )
            try:
                db.execute(f"PRAGMA synchronous = {self._synchronous}")
                db.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
                db.execute(f"PRAGMA cache_size = -{self._page_cache_kib}")  # negative: KiB
                db.execute("PRAGMA trusted_schema = OFF")
            except BaseException:
                db.close()
                raise
            conn = _Connection(db, self._read_cache)
            # Connections of threads that ended are closed here: nothing else can use them.
            for old in [c for c in self._connections if not c.thread_alive()]:
                self._connections.remove(old)
                with contextlib.suppress(sqlite3.Error):
                    old.db.close()
            self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _abandon_connections(self) -> None:
        """In a forked child: set aside the parent's connections without touching them."""
        _ABANDONED.extend(self._connections)
        self._connections = []
        self._lock = threading.Lock()  # another thread may have held it at fork time
        self._local = threading.local()

    def _open_schema(self, db: sqlite3.Connection) -> None:
        """Check the file is ours, switch it to WAL and apply pending migrations.

        Many processes may open a new file at once; a busy database is retried until
        ``busy_timeout`` (switching the journal mode can report busy without waiting).
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.005
        while True:
            try:
                self._migrate(db)
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _read_identity(self, db: sqlite3.Connection) -> tuple[int, int, set[str]]:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        application = db.execute("PRAGMA application_id").fetchone()[0]
        names = {name for _, name in db.execute(_SQL_OBJECTS).fetchall()}
        _check_identity(self._path, version, application, names)
        return version, application, names

    def _migrate(self, db: sqlite3.Connection) -> None:
        migrations = MIGRATIONS  # read now, not at import: tests extend it
        # One read transaction, so that the version, the application id and the tables come
        # from the same moment: another process may be creating the schema meanwhile, and
        # reads in autocommit could see its tables but not yet its version.
        db.execute("BEGIN")
        try:
            version, _, names = self._read_identity(db)
            journal = db.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            _roll_back_if_open(db)  # it only read
        if version < len(migrations) or journal != "wal":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise BackendError(
                    f"SQLite store {self._path} cannot use write-ahead logging (journal mode stays "
                    f"{mode!r}); keep the file on a local file system that supports shared memory"
                )
        if version < len(migrations):
            db.execute("BEGIN IMMEDIATE")
            try:
                version, application, _ = self._read_identity(db)  # another process may have migrated
                for target in range(version + 1, len(migrations) + 1):
                    for statement in migrations[target - 1]:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {target}")
                if application == 0:
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute("COMMIT")
            except BaseException:
                _roll_back_if_open(db)
                raise
            names = {name for _, name in db.execute(_SQL_OBJECTS).fetchall()}
        missing = sorted(_REQUIRED - names)
        if missing:
            raise SchemaError(
                f"SQLite store {self._path} lacks {missing}: it was changed outside "
                "iron-runtime-state; restore it from a backup"
            )

    # -- agent states -------------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> None:
        conn = self._connection()
        key = state.agent_id._value
        row = _row_of(state)
        conn.forget(key)
        conn.db.execute(_SQL_UPSERT, (key, *row, now))
        conn.remember(key, row)

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        conn = self._connection()
        rows = [(state.agent_id._value, _row_of(state)) for state in states]
        for key, _ in rows:
            conn.forget(key)
        with conn as db:
            db.executemany(_SQL_UPSERT, [(key, *row, now) for key, row in rows])
        for key, row in rows:
            conn.remember(key, row)

    def get(self, key: str) -> AgentState | None:
        conn = self._connection()
        cache = conn.fresh_cache()
        row = None if cache is None else cache.get(key)
        if row is None:
            row = conn.db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:
                return None
            conn.remember(key, row)
        return _state(AgentId._trusted(key), row)

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        conn = self._connection()
        found = dict(conn.fresh_cache() or {})
        missing = [key for key in keys if key not in found]
        for start in range(0, len(missing), _IN_CHUNK):
            chunk = missing[start : start + _IN_CHUNK]
            sql = _SQL_GET_IN.format(", ".join("?" * len(chunk)))
            for key, *row in conn.db.execute(sql, chunk).fetchall():
                found[key] = stored = (row[0], row[1], row[2], row[3])
                conn.remember(key, stored)
        out: list[AgentState | None] = []
        for key in keys:
            row = found.get(key)
            out.append(None if row is None else _state(AgentId._trusted(key), row))
        return out

    def remove(self, agent_id: AgentId) -> bool:
        conn = self._connection()
        key = agent_id._value
        conn.forget(key)
        removed: int = conn.db.execute(_SQL_REMOVE, (key,)).rowcount
        return removed > 0

    def list_ids(self) -> list[str]:
        return [key for (key,) in self._connection().db.execute(_SQL_IDS).fetchall()]

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        after = ""
        while True:
            db = self._connection().db  # per batch: the caller may move between threads
            if status is None:
                rows = db.execute(_SQL_PAGE, (after, batch_size)).fetchall()
            else:
                rows = db.execute(_SQL_PAGE_STATUS, (after, _CODE[status._value_], batch_size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield from [_state(_stored_id(row[0]), row[1:]) for row in rows]
            if len(rows) < batch_size:
                return

    def stats(self) -> FleetStats:
        running, stopped, failed, spent, pii = self._connection().db.execute(_SQL_STATS).fetchone()
        return FleetStats(
            total=running + stopped + failed,
            running=running,
            stopped=stopped,
            failed=failed,
            budget_spent=spent,
            pii_detections=pii,
        )

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        conn = self._connection()
        key = agent_id._value
        conn.forget(key)
        with conn as db:
            row = db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:
                raise AgentNotFound(key)
            new = fn(_state(agent_id, row))  # runs holding the write lock: fn must be quick
            stored = _row_of(new)
            db.execute(_SQL_REPLACE, (*stored, now, key))
        conn.remember(key, stored)
        return new.copy()

    # -- atomic counters ----------------------------------------------------------------------

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        conn = self._connection()
        key = agent_id._value
        conn.forget(key)
        with conn as db:
            rows = db.execute(_SQL_WITH_OPEN_HOLDS, (now, key)).fetchall()
            if not rows:
                raise AgentNotFound(key)
            status, spent, pii, limit, held = rows[0]
            if status != _RUNNING:
                raise AgentNotRunning(key, _STATUSES[status].value, "record spend")
            reserved = 0.0 if held is None else math.fsum(row[4] for row in rows)
            if limit is not None and exceeds(spent + reserved + amount, limit):
                stored = (status, spent, pii, limit)
                result = SpendResult(_state(agent_id, stored), exceeded=True, reserved=reserved)
            else:
                stored = (status, spent + amount, pii, limit)
                db.execute(_SQL_SET_SPENT, (stored[1], now, key))
                result = SpendResult(_state(agent_id, stored), reserved=reserved)
        conn.remember(key, stored)
        return result

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        conn = self._connection()
        key = agent_id._value
        conn.forget(key)
        with conn as db:
            row = db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:
                raise AgentNotFound(key)
            stored = (row[0], row[1], row[2] + count, row[3])
            db.execute(_SQL_SET_PII, (stored[2], now, key))
        conn.remember(key, stored)
        return _state(agent_id, stored)

    def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        conn = self._connection()
        key = agent_id._value
        code = _CODE[status._value_]
        conn.forget(key)
        with conn as db:
            row = db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:
                raise AgentNotFound(key)
            stored = (code, row[1], row[2], row[3])
            db.execute(_SQL_SET_STATUS, (code, now, key))
        conn.remember(key, stored)
        return _STATUSES[row[0]], _state(agent_id, stored)

    # -- reservations -------------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        conn = self._connection()
        key = agent_id._value
        with conn as db:
            rows = db.execute(_SQL_WITH_HOLDS, (key,)).fetchall()
            if not rows:
                raise AgentNotFound(key)
            status, spent, pii, limit = rows[0][:4]
            if status != _RUNNING:
                raise AgentNotRunning(key, _STATUSES[status].value, "reserve budget")
            holds = [(row[4], row[5]) for row in rows if row[4] is not None]
            if any(expires_at <= now for _, expires_at in holds):
                db.execute(_SQL_DROP_EXPIRED, (key, now))  # lapsed holds go before the check
            reserved = math.fsum(held for held, expires_at in holds if expires_at > now)
            stored = (status, spent, pii, limit)
            if limit is not None and exceeds(spent + reserved + amount, limit):
                result: Reservation | SpendResult = SpendResult(
                    _state(agent_id, stored), exceeded=True, reserved=reserved
                )
            else:
                expires_at = now + ttl
                db.execute(_SQL_HOLD, (key, reservation_id, amount, expires_at))
                result = Reservation(reservation_id, agent_id, amount, expires_at)
        conn.remember(key, stored)
        return result

    def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        conn = self._connection()
        agent_id = reservation.agent_id
        key = agent_id._value
        conn.forget(key)
        with conn as db:
            if db.execute(_SQL_TAKE_HOLD, (key, reservation.reservation_id, now)).rowcount == 0:
                raise _not_open(reservation, "commit")
            row = db.execute(_SQL_GET, (key,)).fetchone()
            if row is None:  # pragma: no cover - removing an agent removes its holds
                raise _not_open(reservation, "commit")
            stored = (row[0], row[1] + actual, row[2], row[3])
            db.execute(_SQL_SET_SPENT, (stored[1], now, key))
        conn.remember(key, stored)
        limit = stored[3]
        return CommitResult(
            _state(agent_id, stored), exceeded=limit is not None and exceeds(stored[1], limit)
        )

    def release(self, reservation: Reservation, now: float) -> None:
        db = self._connection().db
        params = (reservation.agent_id._value, reservation.reservation_id, now)
        if db.execute(_SQL_TAKE_HOLD, params).rowcount == 0:
            raise _not_open(reservation, "release")

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        key = agent_id._value
        rows = self._connection().db.execute(_SQL_WITH_OPEN_HOLDS, (now, key)).fetchall()
        if not rows:
            raise AgentNotFound(key)
        held = 0.0 if rows[0][4] is None else math.fsum(row[4] for row in rows)
        return _state(agent_id, rows[0][:4]), held

    # -- audit trail --------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        conn = self._connection()
        if len(events) == 1 and conn.head is not None:
            # One statement in autocommit, linked to the last head this connection saw; the
            # chain trigger refuses it if another connection appended in between.
            event = events[0]
            prev = conn.head[1]
            seq = conn.head[0] + 1
            agent = event.agent_id._value
            digest = chain.seal(prev, seq, agent, event.event_type, event.timestamp, event.details)
            try:
                conn.db.execute(
                    _SQL_APPEND, (seq, agent, event.event_type, event.timestamp, event.details, prev, digest)
                )
            except sqlite3.IntegrityError:
                # The seq is taken or the head moved: another connection appended first. (The
                # chain's primary key and trigger are the only constraints on the table.)
                pass
            else:
                conn.head = (seq, digest)
                return [AuditRecord(seq, event, digest, prev)]
        return self._append_locked(conn, events, chain)

    def _append_locked(
        self, conn: _Connection, events: Sequence[AuditEvent], chain: AuditChain
    ) -> list[AuditRecord]:
        """Append under the write lock, reading the head in the same transaction."""
        if not events:
            return []
        seal = chain.seal
        records: list[AuditRecord] = []
        rows: list[tuple[int, str, str, int, str, str, str]] = []
        with conn as db:
            seq, prev = db.execute(_SQL_HEAD).fetchone()
            for event in events:
                seq += 1
                agent, kind, at, details = (
                    event.agent_id._value,
                    event.event_type,
                    event.timestamp,
                    event.details,
                )
                digest = seal(prev, seq, agent, kind, at, details)
                rows.append((seq, agent, kind, at, details, prev, digest))
                records.append(AuditRecord(seq, event, digest, prev))
                prev = digest
            db.executemany(_SQL_APPEND, rows)
        conn.head = (seq, prev)
        return records

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        if query.limit == 0:
            return []
        sql, params = audit_select(query)
        rows = self._connection().db.execute(sql, params).fetchall()
        ids: dict[str, AgentId] = {}
        out: list[AuditRecord] = []
        for seq, agent, event_type, timestamp, details, prev_hash, digest in rows:
            agent_id = ids.get(agent)
            if agent_id is None:
                agent_id = ids[agent] = _stored_id(agent)
            event = AuditEvent._trusted(agent_id, event_type, timestamp, details)
            out.append(AuditRecord(seq, event, digest, prev_hash))
        return out

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        # Verifying a trail goes through here once per record: the batches are flattened in C,
        # and kept small enough that their rows are still in the CPU's caches when checked
        # (5,000 rows at a time verify ~40% slower than 256).
        size = min(batch_size, _ROWS_PER_READ)
        return itertools.chain.from_iterable(self._audit_batches(after_seq, size))

    def _audit_batches(self, after_seq: int, batch_size: int) -> Iterator[list[AuditRow]]:
        """Rows after ``after_seq`` in lists of ``batch_size``, each read whole (no cursor stays open)."""
        after = after_seq
        while True:
            rows: list[AuditRow] = self._connection().db.execute(_SQL_ROWS, (after, batch_size)).fetchall()
            if rows:
                yield rows
            if len(rows) < batch_size:
                return
            after = rows[-1][0]

    def audit_anchor(self) -> tuple[int, str]:
        seq, digest = self._connection().db.execute(_SQL_ANCHOR).fetchone()
        return seq, digest

    def audit_head(self) -> tuple[int, str]:
        seq, digest = self._connection().db.execute(_SQL_HEAD).fetchone()
        return seq, digest

    def audit_count(self) -> int:
        count: int = self._connection().db.execute(_SQL_COUNT).fetchone()[0]
        return count

    def prune_audit(self, before: int) -> int:
        with self._connection() as db:
            first_kept = db.execute(_SQL_FIRST_KEPT, (before,)).fetchone()
            if first_kept is None:
                last = db.execute(_SQL_LAST).fetchone()
            else:
                last = db.execute(_SQL_LAST_BEFORE, (first_kept[0],)).fetchone()
            if last is None:
                return 0
            removed: int = db.execute(_SQL_PRUNE, (last[0],)).rowcount
            db.execute(_SQL_SET_ANCHOR, (last[0], last[1]))
        return removed

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        codes = sorted({_CODE[status._value_] for status in statuses})
        if not codes:
            return []
        marks = ", ".join("?" * len(codes))
        params = (*codes, changed_before)
        conn = self._connection()
        with conn as db:
            removed = [key for (key,) in db.execute(_SQL_PURGEABLE.format(marks), params).fetchall()]
            for key in removed:
                conn.forget(key)
            if removed:
                db.execute(_SQL_PURGE.format(marks), params)
        return removed

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connection; later calls raise ``BackendError``. Idempotent."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
            self._local = threading.local()
        _LIVE.discard(self)
        for conn in connections:
            conn.db.close()


def _roll_back_if_open(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def _not_open(reservation: Reservation, action: str) -> ReservationError:
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open (already "
        "committed or released, expired after its ttl, or its agent was removed); if money was "
        "spent after the hold expired, record it with record_spend"
    )
