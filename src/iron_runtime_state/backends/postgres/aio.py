"""The asyncio PostgreSQL driver: :class:`AsyncPostgresBackend`, over psycopg 3's native async
connections and an ``AsyncConnectionPool`` (no threads).

The same operations (:mod:`.ops`), statements, schema, timeouts and connection checks as the sync
driver (:mod:`.sync`); this module only awaits them. Concurrent tasks run on as many connections
as the pool allows (``max_connections``), each operation on one connection for its whole run.
A task cancelled in the middle of an operation leaves no half-applied change: its transaction is
rolled back (or, if the connection is left in doubt, the connection is closed, which rolls it
back in the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from ...errors import BackendError, StateError, StateTypeError
from ..async_base import AsyncBackend
from ..base import ITERATORS, OPERATIONS, WAITING
from .errors import DRIVER_ERRORS, map_error
from .listen import AsyncListeners
from .ops import PostgresOps
from .requests import Emit, Listen, Op, Request, Sql
from .sync import _TUPLES, labels_loads, pool_options, session_settings, usable
from .url import PostgresConfig

__all__ = ["AsyncPostgresBackend"]


async def _rollback_open(conn: psycopg.AsyncConnection[Any]) -> None:
    status = conn.pgconn.transaction_status
    if status == TransactionStatus.ACTIVE:
        # Cancelled while a statement ran: the connection is in doubt. Closing it ends the
        # session, and the server rolls its transaction back.
        await conn.close()
    elif status != TransactionStatus.IDLE and status != TransactionStatus.UNKNOWN:
        with contextlib.suppress(psycopg.Error):
            await conn.rollback()


async def _execute(conn: psycopg.AsyncConnection[Any], request: Request) -> Any:
    assert type(request) is Sql  # Emit and Listen are run by AsyncPostgresBackend._step
    cur = await conn.execute(request.query, request.params)
    result = cur.pgresult
    return await cur.fetchall() if result is not None and result.status == _TUPLES else cur.rowcount


async def _run(conn: psycopg.AsyncConnection[Any], op: Op[Any]) -> Any:
    """Drive ``op`` to its end on ``conn`` (as :func:`.sync.run` does)."""
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
                reply = await _execute(conn, request)
            except psycopg.Error as exc:
                await _rollback_open(conn)
                reply, error = None, exc
    except BaseException:
        await _rollback_open(conn)
        raise
    finally:
        op.close()


class AsyncPostgresBackend(AsyncBackend):
    """A store in one PostgreSQL schema, for asyncio; shares its data with the sync backend.

    Built by :func:`~iron_runtime_state.backends.postgres.open_async_postgres`; no connection is
    made until the first call. Use it from one event loop.
    """

    driver_errors = DRIVER_ERRORS

    def __init__(self, config: PostgresConfig) -> None:
        self._config = config
        self._ops = PostgresOps(config.schema)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        #: The connections wait_audit listens on, apart from the pool: one per waiting task
        #: (see :mod:`.listen`).
        self._listeners = AsyncListeners(config.conninfo)
        self._prepared = False
        self._setup: asyncio.Lock | None = None
        self._closed = False

    @property
    def url(self) -> str:
        """The store's URL, password masked, schema spelled out."""
        return self._config.url

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the store's tables."""
        return self._config.schema

    def __repr__(self) -> str:
        return f"AsyncPostgresBackend({self.url!r})"

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a psycopg exception, naming the server and what to do."""
        return map_error(exc, self._config)

    # -- connections --------------------------------------------------------------------------

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        set_json_loads(labels_loads, conn)
        await conn.execute(*session_settings(self._config))

    def _setup_lock(self) -> asyncio.Lock:
        """The lock of opening the pool and preparing the schema (made on the loop that uses it)."""
        if self._setup is None:
            self._setup = asyncio.Lock()
        return self._setup

    async def _open_pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        async with self._setup_lock():
            if self._closed:
                raise BackendError("this PostgreSQL store was closed; open a new manager")
            if self._pool is None:
                # As the sync driver does: one connection by hand first, to fail at once, saying why.
                await (await psycopg.AsyncConnection.connect(self._config.conninfo, autocommit=True)).close()
                pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
                    configure=self._configure, **pool_options(self._config)
                )
                await pool.open(wait=False)
                await pool.wait(self._config.timeout)  # as the sync driver does
                self._pool = pool
            return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A live connection of the pool, for one operation (the schema is ready on it)."""
        pool = self._pool or await self._open_pool()
        deadline = time.monotonic() + self._config.timeout
        while True:
            conn = await pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
            if usable(conn):
                break
            await conn.close()  # the pool replaces a closed connection
            await pool.putconn(conn)
        try:
            if not self._prepared:
                await self._prepare(conn)
            yield conn
        finally:
            await pool.putconn(conn)

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with self._setup_lock():
            if not self._prepared:
                await _run(conn, self._ops.prepare())
                self._prepared = True

    # -- the contract, by name ----------------------------------------------------------------

    async def call(self, name: str, *args: Any) -> Any:
        """Run the store operation ``name`` (see :class:`~iron_runtime_state.backends.base.Backend`)."""
        if name not in OPERATIONS or name in ITERATORS:
            raise StateTypeError(f"{name!r} is not an operation of the store contract that returns a result")
        op = getattr(self._ops, name)(*args)
        if name in WAITING:  # it may wait for seconds: no connection is held meanwhile
            return await self._loosely(op)
        async with self._connection() as conn:
            return await _run(conn, op)

    def stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """Run the streaming store operation ``name`` (one of ``ITERATORS``); its items, a
        connection borrowed per batch."""
        if name not in ITERATORS:
            raise StateTypeError(f"{name!r} is not a streaming operation of the store contract")
        return self._iterate(getattr(self._ops, name)(*args))

    async def _step(self, request: Request) -> Any:
        """One request of an operation run loosely: on a connection borrowed for it alone."""
        if type(request) is Listen:
            if not self._prepared:  # the schema must exist before the head is read
                async with self._connection():
                    pass
            elif self._closed:
                raise BackendError("this PostgreSQL store was closed; open a new manager")
            return await self._listeners.wait(request)
        async with self._connection() as conn:
            return await _execute(conn, request)

    async def _loosely(self, op: Op[Any]) -> Any:
        """Run a polling operation holding no connection between its statements; its result."""
        reply: Any = None
        try:
            while True:
                try:
                    request = op.send(reply)
                except StopIteration as stop:
                    return stop.value
                reply = await self._step(request)
        finally:
            op.close()

    async def _iterate(self, op: Op[Any]) -> AsyncIterator[Any]:
        reply: Any = None
        try:
            while True:
                try:
                    request = op.send(reply)
                except StopIteration:
                    return
                if type(request) is Emit:
                    reply = None
                    for item in request.items:
                        yield item
                else:
                    reply = await self._step(request)
        finally:
            op.close()

    async def close(self) -> None:
        """Close the pool's connections; later calls raise ``BackendError``. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        await self._listeners.close()
        if pool is not None:
            await pool.close()
