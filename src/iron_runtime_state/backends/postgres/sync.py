"""The sync PostgreSQL driver: :class:`PostgresBackend`, over psycopg 3 and a ``psycopg_pool`` pool.

It runs the operations of :mod:`.ops` and only carries statements and replies: each operation
borrows one autocommit connection for its whole run (its transaction, when it opens one, lives
on that connection), and a streaming operation borrows one per batch, so a slow reader holds no
connection between batches.

Connections. The pool opens them in the background (the first at the first call, none at
construction) and each one is set up with the store's ``timeout`` as its ``lock_timeout``, so a
call never waits longer than that for another client's lock. An idle connection whose server
went away (a restart, ``pg_terminate_backend``) has already been told so by the server: it shows
as pending input on its socket, and is dropped before use (:func:`usable`), so the first call
after a restart does not fail on a dead connection. A server that is down makes calls fail with
``BackendUnavailable`` after ``timeout``; the pool keeps trying to reconnect, and calls succeed
again once it is back.
"""

from __future__ import annotations

import contextlib
import json
import select
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any, Final

import psycopg
from psycopg.pq import ConnStatus, ExecStatus, TransactionStatus
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool

from ...errors import BackendError, StateError
from ..base import OpsBackend
from .errors import DRIVER_ERRORS, map_error
from .listen import Listeners
from .ops import PostgresOps
from .requests import Emit, Listen, Op, Request, Sql
from .url import PostgresConfig

__all__ = ["PostgresBackend", "labels_loads", "pool_options", "session_settings", "usable"]

_TUPLES: Final = ExecStatus.TUPLES_OK
_IDLE: Final = TransactionStatus.IDLE
_UNKNOWN: Final = TransactionStatus.UNKNOWN


def session_settings(config: PostgresConfig) -> tuple[str, tuple[str, str]]:
    """The statement that sets up a new connection, and its parameters: the lock timeout, and a
    limit on a transaction left idle (a client frozen inside one must not hold its locks for ever)."""
    lock_ms = max(1, round(config.timeout * 1000))
    idle_ms = max(30_000, 10 * lock_ms)
    return (
        "SELECT set_config('lock_timeout', %s, false), "
        "set_config('idle_in_transaction_session_timeout', %s, false)",
        (f"{lock_ms}ms", f"{idle_ms}ms"),
    )


def pool_options(config: PostgresConfig) -> dict[str, Any]:
    """How both drivers' pools are built (opened by the caller, which then waits for the first
    connection: a first call that waited in ``getconn`` would make the pool open a second one,
    and a pool hands its idle connections out in turn, so one thread's calls would alternate
    between two server processes)."""
    return {
        "conninfo": config.conninfo,
        "min_size": 1,
        "max_size": config.max_connections,
        "kwargs": {"autocommit": True},
        "timeout": config.timeout,
        # Give up a series of failed reconnections after `timeout` (the next call starts a new
        # one at once) rather than backing off for minutes while the server is back.
        "reconnect_timeout": max(1.0, config.timeout),
        "name": f"iron-state {config.target}",
        "open": False,
    }


def labels_loads(data: bytes | str) -> Any:
    """JSON as psycopg reads it, with the common case of no labels read without the parser."""
    return {} if data == b"{}" else json.loads(data)


def usable(conn: Any) -> bool:
    """Whether an idle connection taken from the pool still works.

    An idle connection receives nothing unless the server has something to say: a server that
    shut down or terminated the session sends an error and closes the socket. Pending input is
    taken as that (a rare notice costs one reconnect), so a dead connection is never used.
    """
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK or pgconn.transaction_status != _IDLE:
        return False
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    return not poller.poll(0)


def rollback_open(conn: Any) -> None:
    """End the connection's failed or unfinished transaction, if it has one and is alive."""
    status = conn.pgconn.transaction_status
    if status != _IDLE and status != _UNKNOWN:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()


def execute(conn: psycopg.Connection[Any], request: Request) -> Any:
    """Run one request on ``conn``: the statement's rows, or its row count."""
    assert type(request) is Sql  # Emit and Listen are run by PostgresBackend._loosely
    cur = conn.execute(request.query, request.params)
    # The result's status, not cur.description: that builds a Column object per column.
    result = cur.pgresult
    return cur.fetchall() if result is not None and result.status == _TUPLES else cur.rowcount


def run(conn: psycopg.Connection[Any], op: Op[Any]) -> Any:
    """Drive ``op`` to its end on ``conn``; its result. A driver error is thrown into the
    operation after any open transaction was rolled back (so the operation may run again)."""
    reply: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                request = op.send(reply) if error is None else op.throw(error)
            except StopIteration as stop:
                return stop.value
            error = None
            try:
                reply = execute(conn, request)
            except psycopg.Error as exc:
                rollback_open(conn)
                reply, error = None, exc
    except BaseException:
        rollback_open(conn)
        raise
    finally:
        op.close()


class PostgresBackend(OpsBackend):
    """A store in one PostgreSQL schema, shared by every process and host that uses it.

    Built by :func:`~iron_runtime_state.backends.postgres.open_postgres`; no connection is made
    until the first call, which also creates or migrates the schema.
    """

    schemes = ("postgresql", "postgres")
    driver_errors = DRIVER_ERRORS

    def __init__(self, config: PostgresConfig) -> None:
        self._config = config
        self.ops = PostgresOps(config.schema)
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        #: The connection the last operation used, kept out of the pool for the next one.
        self._spare: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # opening the pool, preparing the schema, closing
        self._spare_lock = threading.Lock()
        #: The connections wait_audit listens on, apart from the pool (see :mod:`.listen`).
        self._listeners = Listeners(config.conninfo)
        self._prepared = False
        self._closed = False

    @property
    def url(self) -> str:
        """The store's URL, password masked, schema spelled out."""
        return self._config.url

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the store's tables."""
        return self._config.schema

    @property
    def config(self) -> PostgresConfig:
        """The checked configuration (the password stays out of its ``repr``)."""
        return self._config

    def __repr__(self) -> str:
        return f"PostgresBackend({self.url!r})"

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a psycopg exception, naming the server and what to do."""
        return map_error(exc, self._config)

    # -- connections --------------------------------------------------------------------------

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        set_json_loads(labels_loads, conn)
        conn.execute(*session_settings(self._config))

    def _open_pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            if self._closed:
                raise BackendError("this PostgreSQL store was closed; open a new manager")
            if self._pool is None:
                # One connection by hand first: a pool that cannot connect only says that it timed
                # out, this says why (a refused password, a missing database, a server down), at once.
                psycopg.connect(self._config.conninfo, autocommit=True).close()
                pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                    configure=self._configure, **pool_options(self._config)
                )
                pool.open(wait=False)
                # The first connection (see pool_options). On a timeout the pool closes itself,
                # and the next call builds another.
                pool.wait(self._config.timeout)
                self._pool = pool
            return self._pool

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A live connection, for one operation (the schema is ready on it).

        The connection the last operation returned is kept aside for the next one, and only the
        others go back to the pool: handing a connection through the pool costs a tenth of a
        simple read, and calls one after another then meet the same server process.
        """
        pool = self._pool or self._open_pool()
        with self._spare_lock:
            conn = self._spare
            self._spare = None
        if conn is None or not usable(conn):
            if conn is not None:
                conn.close()  # the pool replaces a closed connection
                pool.putconn(conn)
            conn = self._checkout(pool)
        try:
            if not self._prepared:
                self._prepare(conn)
            yield conn
        except BaseException:
            pool.putconn(conn)  # the pool checks it (and replaces a broken one)
            raise
        with self._spare_lock:
            if self._spare is None and not self._closed:
                self._spare, conn = conn, None
        if conn is not None:
            pool.putconn(conn)

    def _checkout(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
        """A live connection from the pool, within the timeout."""
        deadline = time.monotonic() + self._config.timeout
        while True:
            conn = pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            if usable(conn):
                return conn
            conn.close()  # the pool replaces a closed connection
            pool.putconn(conn)

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if not self._prepared:
                run(conn, self.ops.prepare())
                self._prepared = True

    # -- the driver ---------------------------------------------------------------------------

    def _drive(self, op: Op[Any]) -> Any:
        with self._connection() as conn:
            return run(conn, op)

    def _loosely(self, op: Op[Any]) -> Generator[Any, None, Any]:
        """Run ``op`` holding no connection between its statements (each borrows one), yielding
        the items it emits; its result is the generator's return value. For streaming and
        waiting operations: a slow reader or a long wait keeps no connection of the pool."""
        reply: Any = None
        try:
            while True:
                try:
                    request = op.send(reply)
                except StopIteration as stop:
                    return stop.value
                reply = None
                if type(request) is Emit:
                    yield from request.items
                elif type(request) is Listen:
                    reply = self._listen(request)
                else:
                    with self._connection() as conn:
                        reply = execute(conn, request)
        finally:
            op.close()

    def _iterate(self, op: Op[Any]) -> Iterator[Any]:
        return self._loosely(op)

    def _listen(self, request: Listen) -> bool:
        if not self._prepared:  # the schema must exist before the head is read
            with self._connection():
                pass
        elif self._closed:
            raise BackendError("this PostgreSQL store was closed; open a new manager")
        return self._listeners.wait(request)

    def wait_audit(self, after_seq: int, timeout: float) -> bool:
        """See ``Backend.wait_audit``: ``LISTEN/NOTIFY`` on a connection of its own (:mod:`.listen`)."""
        steps = self._loosely(self.ops.wait_audit(after_seq, timeout))
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return bool(stop.value)

    def close(self) -> None:
        """Close the pool's connections; later calls raise ``BackendError``. Idempotent."""
        with self._lock, self._spare_lock:
            self._closed = True
            pool, self._pool = self._pool, None
            spare, self._spare = self._spare, None
        self._listeners.close()
        if pool is not None:
            if spare is not None:
                pool.putconn(spare)
            pool.close()
