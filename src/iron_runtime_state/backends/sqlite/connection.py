"""Opening a store file, and each thread's connection to it.

- **Files.** A new file is created owner-only (0600) before SQLite sees it; SQLite gives the
  ``-wal`` and ``-shm`` files the same permissions. An existing file is only read until it is
  known to be a store of this or an older schema (:mod:`.schema`), so a stranger's file is never
  modified.
- **Journal.** WAL, so readers never block the writer. ``synchronous=NORMAL`` (the default):
  a commit has reached the operating system when the call returns, so it survives the process
  being killed; ``FULL`` (or ``EXTRA``) also fsyncs every commit, so it survives power loss.
  The -wal file is checkpointed into the database every :data:`WAL_AUTOCHECKPOINT` pages.
- **Connections.** One per thread (``threading.local``), all registered so they can be closed
  together; a connection is never shared between threads, so nothing relies on the GIL.
  Connections inherited across ``fork()`` are abandoned in the child, never used or closed.
- **Transactions.** A write that is one statement runs in autocommit; a :class:`Connection`
  used as a context manager is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock
  before reading, so no two writers interleave and no transaction has to upgrade a read lock
  (the case the busy handler cannot resolve). Waits are bounded by ``busy_timeout``.
- **Read cache.** Each connection caches the agent rows it read or wrote, and drops them all
  whenever ``PRAGMA data_version`` says another connection (any thread or process) committed.
  The same pragma tells a waiting ``watch()`` when the trail may have grown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final

from ...errors import BackendError, BackendUnavailable, ConfigurationError, StateError, StateTypeError
from ..head_watch import HeadWatch
from . import schema

__all__ = [
    "DEFAULT_PAGE_CACHE_MIB",
    "JOURNAL_SIZE_LIMIT",
    "OPTIONS",
    "SYNCHRONOUS_MODES",
    "WAL_AUTOCHECKPOINT",
    "Connection",
    "Connections",
    "Row",
    "Settings",
    "check_settings",
    "map_error",
    "parse_sqlite_url",
    "url_of",
]

#: An agent's row as stored and as the read cache keeps it (amounts in micro-units): status
#: code, spent, pii detections, limit, labels (JSON), budget scopes (JSON), period, time zone,
#: period start, thresholds (text; see schema.py, versions 4 and 5).
Row = tuple[int, int, int, int | None, str | None, str | None, str | None, str, float | None, str | None]

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
JOURNAL_SIZE_LIMIT: Final = 64 * 1024 * 1024  # shrink the -wal file back to this after a checkpoint
# Pages the -wal file may hold before a commit checkpoints it (SQLite's default: 1,000). A
# checkpoint costs two fsyncs; since a settle also writes its spend record and ledger row
# (~10 pages instead of ~2), checkpoints at 1,000 came five times as often per settle (a settle
# measured 1.2x to 2x slower on a virtual disk). At 5,000 (20 MiB) they come about as often per
# settle as before.
WAL_AUTOCHECKPOINT: Final = 5_000
_OLDEST_SQLITE: Final = (3, 24, 0)
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_DATA_VERSION: Final = "PRAGMA data_version"

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


@dataclass(frozen=True, slots=True)
class Settings:
    """A store's file and its checked options (:data:`OPTIONS`)."""

    path: str  # absolute
    synchronous: str
    busy_timeout: float
    read_cache: int
    page_cache_mib: int


def check_settings(
    path: object,
    synchronous: object,
    busy_timeout: object,
    read_cache: object,
    page_cache_mib: object,
    unknown: Mapping[str, object],
) -> Settings:
    """The settings for these options, or a ``ConfigurationError`` that names the accepted ones."""
    if unknown:
        raise ConfigurationError(f"unknown SQLite option(s) {sorted(unknown)[:8]}; {_options_help()}")
    if sqlite3.sqlite_version_info < _OLDEST_SQLITE:
        raise BackendError(
            f"the SQLite library is {sqlite3.sqlite_version}; the SQLite store needs 3.24 or newer "
            "(for UPSERT): use a Python whose sqlite3 module links a newer SQLite"
        )
    if not _has_json():
        raise BackendError(
            f"the SQLite library ({sqlite3.sqlite_version}) was built without its JSON functions, "
            "which the SQLite store's label index and budget holds use; use a Python whose sqlite3 "
            "module links SQLite 3.38 or newer (JSON is built in), or one built with JSON1"
        )
    return Settings(
        path=_check_path(path),
        synchronous=_check_synchronous(synchronous),
        busy_timeout=float(
            _option_number(
                busy_timeout,
                False,
                0.0,
                _MAX_BUSY_TIMEOUT,
                f"busy_timeout must be a number of seconds from 0 to {_MAX_BUSY_TIMEOUT:g} "
                "(it bounds how long a call waits for another writer)",
            )
        ),
        read_cache=int(
            _option_number(
                read_cache,
                True,
                0,
                10_000_000,
                "read_cache must be a whole number of agent states cached per thread (0 turns it off)",
            )
        ),
        page_cache_mib=int(
            _option_number(
                page_cache_mib,
                True,
                1,
                65_536,
                "page_cache_mib must be a whole number of MiB from 1 to 65536 "
                "(SQLite's page cache per connection)",
            )
        ),
    )


@functools.cache
def _has_json() -> bool:
    """Whether the linked SQLite has its JSON functions (built in since 3.38, optional before)."""
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()
    return True


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


def url_of(path: str) -> str:
    """The ``sqlite://`` URL of an absolute path."""
    return "sqlite:///" + urllib.parse.quote(path, safe="/:@+,=")


def _file_uri(path: str, mode: str) -> str:
    return "file:" + urllib.parse.quote(path, safe="/") + f"?mode={mode}"


# -- errors ---------------------------------------------------------------------------------------


def map_error(exc: BaseException, settings: Settings) -> StateError:
    """The library error for a ``sqlite3`` exception, naming the file and what to do."""
    path = settings.path
    name = _error_name(exc)
    detail = f"({type(exc).__name__}: {exc})"
    if _is_busy(exc):
        return BackendUnavailable(
            f"SQLite store {path} stayed locked by another connection for more than "
            f"busy_timeout={settings.busy_timeout:g}s {detail}: a long transaction elsewhere holds "
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
        return _closed(path)
    return BackendError(f"SQLite store {path}: {type(exc).__name__}: {exc}")


def _closed(path: str) -> BackendError:
    return BackendError(f"SQLite store {path} was closed; open a new manager to use it again")


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
    """Whether another connection held the lock (for longer than ``busy_timeout``)."""
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


# -- the file -------------------------------------------------------------------------------------


def _no_store(path: str, why: str) -> BackendError:
    """The error for opening, without creating, a file that holds no store."""
    return BackendError(f"no SQLite store at {path}: {why}; it was left as it is (opened with create=False)")


def _prepare_file(path: str, create: bool) -> None:
    """Create the store file (owner-only) if it is missing; else check it could be ours.

    Only reads an existing file: a directory, a file that is not a SQLite database, and a file
    of another application or of a newer schema are refused before SQLite opens them, so they
    are never modified. SQLite creates the ``-wal`` and ``-shm`` files with the database
    file's permissions, so they are owner-only too. Without ``create`` a missing or empty file
    is refused too: it holds no store.
    """
    flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
    if create:
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
    elif not os.path.exists(path):
        raise _no_store(path, "the file does not exist")
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
        if not create:
            raise _no_store(path, "the file is empty")
        return  # an empty file is an empty database
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise BackendError(
            f"cannot open SQLite store {path}: the file is not a SQLite database (its first bytes "
            "are not the SQLite header); it was left untouched: give the path of a new file or "
            "of an existing store"
        ) from _sqlite_says(path)
    # The header holds user_version at bytes 60-63 and application_id at 68-71.
    version = int.from_bytes(header[60:64], "big")
    application = int.from_bytes(header[68:72], "big")
    schema.check_identity(path, version, application, None)


def _open_schema(db: sqlite3.Connection, path: str, busy_timeout: float, create: bool) -> None:
    """Check the file is ours, switch it to WAL and apply pending migrations.

    Without ``create`` a database that holds no store yet (version 0) is refused untouched.

    Many processes may open a new file at once; a busy database is retried until
    ``busy_timeout`` (switching the journal mode can report busy without waiting).
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        try:
            _migrate(db, path, create)
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _migrate(db: sqlite3.Connection, path: str, create: bool) -> None:
    # One read transaction, so that the version, the application id and the tables come
    # from the same moment: another process may be creating the schema meanwhile, and
    # reads in autocommit could see its tables but not yet its version.
    db.execute("BEGIN")
    try:
        version, _, names = schema.read_identity(db, path)
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        _roll_back(db)  # it only read
    if version == 0 and not create:
        raise _no_store(path, "the file is an empty SQLite database")
    pending = version < len(schema.MIGRATIONS)
    if pending or journal != "wal":
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise BackendError(
                f"SQLite store {path} cannot use write-ahead logging (journal mode stays "
                f"{mode!r}); keep the file on a local file system that supports shared memory"
            )
    if pending:
        db.execute("BEGIN IMMEDIATE")
        try:
            version, application, _ = schema.read_identity(db, path)  # another process may have migrated
            schema.migrate(db, version, application)
            db.execute("COMMIT")
        except BaseException:
            _roll_back(db)
            raise
        names = schema.object_names(db)
    schema.check_complete(path, names)


def _roll_back(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


# -- one thread's connection -------------------------------------------------------------------------


class Connection:
    """One thread's connection, its read cache, and the audit head its transaction appended.

    As a context manager it is one ``BEGIN IMMEDIATE`` transaction: committed when the block
    ends, rolled back when it raises. The head an append left in it reaches the store's
    :class:`HeadWatch` only once it is committed, so the watch never holds a head the store
    does not have.
    """

    __slots__ = ("appended", "cache", "cache_max", "db", "owner", "probe", "version", "watch")

    def __init__(self, db: sqlite3.Connection, cache_max: int, watch: HeadWatch) -> None:
        self.db = db
        #: A cursor kept for the data_version check that precedes every cached read.
        self.probe = db.cursor()
        self.cache_max = cache_max
        #: agent id -> its row, valid while data_version == version.
        self.cache: dict[str, Row] | None = {} if cache_max else None
        self.version = -1
        #: The audit head of the store object (shared by its connections).
        self.watch = watch
        #: (seq, hash) of the head this connection's open transaction appended, if any.
        self.appended: tuple[int, str] | None = None
        self.owner = weakref.ref(threading.current_thread())

    def __enter__(self) -> sqlite3.Connection:
        self.appended = None
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        appended, self.appended = self.appended, None
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:
                _roll_back(self.db)
                raise
            if appended is not None:
                self.watch.wrote(appended)
            return
        _roll_back(self.db)

    def data_version(self) -> int:
        """``PRAGMA data_version``: it changes whenever another connection commits (a few µs)."""
        version: int = self.probe.execute(_DATA_VERSION).fetchone()[0]
        return version

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: its statements all read the same committed state.

        In WAL it takes no lock that a writer waits for; it only reads, so it ends by rolling back.
        """
        self.db.execute("BEGIN")
        try:
            yield self.db
        finally:
            _roll_back(self.db)

    def fresh_cache(self) -> dict[str, Row] | None:
        """The read cache, emptied first if another connection committed since it was filled."""
        cache = self.cache
        if cache is not None:
            version = self.probe.execute(_DATA_VERSION).fetchone()[0]  # inline: every read
            if version != self.version:
                cache.clear()
                self.version = version
        return cache

    def remember(self, key: str, row: Row) -> None:
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
        """Whether the thread that opened this connection still runs."""
        thread = self.owner()
        return thread is not None and thread.is_alive()


# -- every thread's connection -------------------------------------------------------------------


class Connections:
    """Every thread's connection to one store file, opened on first use, closed together.

    Building it prepares the file and brings its schema up to date (:mod:`.schema`); without
    ``create``, only a file that already holds a store is opened.
    """

    def __init__(self, settings: Settings, create: bool = True) -> None:
        self.settings = settings
        self._uri = _file_uri(settings.path, "rw")  # "rw": SQLite must never create the file itself
        self._lock = threading.Lock()
        self._local = threading.local()
        #: Every open connection, for close() (and tests).
        self.open: list[Connection] = []
        #: The highest audit head this store object saw or wrote (an append checks it).
        self.watch = HeadWatch()
        self._closed = False
        _prepare_file(settings.path, create)
        try:
            _open_schema(self.get().db, settings.path, settings.busy_timeout, create)
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise map_error(exc, settings) from exc
            raise
        _LIVE.add(self)

    def get(self) -> Connection:
        """This thread's connection, opened on first use."""
        try:
            conn: Connection = self._local.conn
            return conn
        except AttributeError:
            return self._connect()

    def _connect(self) -> Connection:
        settings = self.settings
        with self._lock:
            if self._closed:
                raise _closed(settings.path)
            db = sqlite3.connect(
                self._uri,
                uri=True,
                timeout=settings.busy_timeout,
                isolation_level=None,  # transactions are explicit: autocommit or BEGIN IMMEDIATE
                check_same_thread=False,  # only close() touches another thread's connection
                cached_statements=256,
            )
            try:
                db.execute(f"PRAGMA synchronous = {settings.synchronous}")
                db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
                db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
                db.execute(f"PRAGMA cache_size = -{settings.page_cache_mib * 1024}")  # negative: KiB
                db.execute("PRAGMA trusted_schema = OFF")
                # Temporary tables in memory: a hold made in one statement (an INSERT ... SELECT
                # that reads iron_holds) goes through a one-row temporary table, which in a
                # temporary file costs up to 3x the statement (11 µs -> 35 µs measured, by how
                # the heap lies). The store's sorts (a page of agents) keep a page's rows only.
                db.execute("PRAGMA temp_store = MEMORY")
            except BaseException:
                db.close()
                raise
            conn = Connection(db, settings.read_cache, self.watch)
            # Connections of threads that ended are closed here: nothing else can use them.
            for old in [c for c in self.open if not c.thread_alive()]:
                self.open.remove(old)
                with contextlib.suppress(sqlite3.Error):
                    old.db.close()
            self.open.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every thread's connection; later calls raise ``BackendError``. Idempotent."""
        with self._lock:
            self._closed = True
            connections, self.open = self.open, []
            self._local = threading.local()
        _LIVE.discard(self)
        for conn in connections:
            conn.db.close()

    def _abandon(self) -> None:
        """In a forked child: set aside the parent's connections without touching them."""
        _ABANDONED.extend(self.open)
        self.open = []
        self._lock = threading.Lock()  # another thread may have held it at fork time
        self._local = threading.local()


# Connections inherited by a forked child. SQLite forbids using them there, and closing them is
# not safe either (rolling back a transaction the parent had open would write to the shared
# WAL index), so they are kept here, never touched, for the child's lifetime; the child's
# threads open connections of their own.
_ABANDONED: list[Connection] = []
_LIVE: weakref.WeakSet[Connections] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for connections in list(_LIVE):
        connections._abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
