"""``wait_audit`` on PostgreSQL: the listening connections of both drivers (``LISTEN/NOTIFY``).

Every append notifies the schema's channel with the new head seq, in its own transaction (see
:mod:`.trail`). A wait runs a :class:`~.requests.Listen` on a connection kept for listening,
apart from the pool: a wait holds its connection for up to a second (``FEED_WAIT``), and the
pool's connections serve the calls. There is one such connection per waiter waiting at the same
time (a thread on the sync driver, a task on the asyncio one), opened at its first wait and kept
for the next (up to :data:`KEEP` idle ones per store object): a store object that one consumer
watches uses one. Each wait:

1. ``LISTEN`` and reads the head in one round trip. ``LISTEN`` takes effect before the read, so
   a record appended before it is seen by the read and one appended after it is notified: no
   wake-up is lost. A kept connection stays listening between waits; notifications sent
   meanwhile wait in its socket and are weighed against the new wait's ``after_seq``.
2. If the head is not past ``after_seq``, waits for a notification whose payload (the new head)
   is, until the timeout.

A server restart: a kept connection whose server went away fails at step 1 of the next wait,
which then opens a new connection once, so the first wait after a restart simply works. A server
that goes away during step 2 (or cannot be reached) makes the wait fail with
``BackendUnavailable`` (the driver's wrapper maps the psycopg error); the next wait reconnects.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

import psycopg

from .requests import Listen

__all__ = ["KEEP", "AsyncListeners", "Listeners"]

#: Idle listening connections a store object keeps for later waits (more are closed).
KEEP: Final = 4


def _look(request: Listen) -> str:
    """``LISTEN`` and the head read, as one query (no parameters, so two statements may go in one)."""
    return f'LISTEN "{request.channel}"; {request.head}'


def _past(note: psycopg.Notify, request: Listen) -> bool:
    """Whether a notification says the head passed the wait's ``after_seq``."""
    if note.channel != request.channel:
        return False
    try:
        return int(note.payload) > request.after_seq
    except ValueError:  # a NOTIFY sent by hand: have a look
        return True


class Listeners:
    """The sync driver's listening connections (thread-safe; one per concurrent waiter)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, autocommit=True)

    def _head(self, conn: psycopg.Connection[Any], request: Listen) -> int:
        cur = conn.execute(_look(request).encode())
        cur.nextset()
        row = cur.fetchone()
        assert row is not None  # the head row always exists
        return int(row[0])

    def wait(self, request: Listen) -> bool:
        """Run ``request`` (see the module docstring): whether the head passed ``after_seq``."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._open()
                head = self._head(conn, request)
            else:
                try:
                    head = self._head(conn, request)
                except psycopg.OperationalError:  # its server went away while it was idle
                    conn.close()
                    conn = self._open()
                    head = self._head(conn, request)
            found = head > request.after_seq or self._notified(conn, request)
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._keep(conn)
        return found

    def _notified(self, conn: psycopg.Connection[Any], request: Listen) -> bool:
        deadline = time.monotonic() + request.timeout
        while (left := deadline - time.monotonic()) > 0:
            for note in conn.notifies(timeout=left, stop_after=1):
                if _past(note, request):
                    return True
        return False

    def _keep(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < KEEP:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections; one in use is closed when its wait ends. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AsyncListeners:
    """The asyncio driver's listening connections (one event loop; one per concurrent waiting task)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._closed = False

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)

    async def _head(self, conn: psycopg.AsyncConnection[Any], request: Listen) -> int:
        cur = await conn.execute(_look(request).encode())
        cur.nextset()
        row = await cur.fetchone()
        assert row is not None  # the head row always exists
        return int(row[0])

    async def wait(self, request: Listen) -> bool:
        """Run ``request`` (see the module docstring): whether the head passed ``after_seq``."""
        conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = await self._open()
                head = await self._head(conn, request)
            else:
                try:
                    head = await self._head(conn, request)
                except psycopg.OperationalError:  # its server went away while it was idle
                    await conn.close()
                    conn = await self._open()
                    head = await self._head(conn, request)
            found = head > request.after_seq or await self._notified(conn, request)
        except BaseException:  # a cancelled wait too: the connection may be mid-read
            if conn is not None:
                await conn.close()
            raise
        if not self._closed and len(self._idle) < KEEP:
            self._idle.append(conn)
        else:
            await conn.close()
        return found

    async def _notified(self, conn: psycopg.AsyncConnection[Any], request: Listen) -> bool:
        deadline = time.monotonic() + request.timeout
        while (left := deadline - time.monotonic()) > 0:
            async for note in conn.notifies(timeout=left, stop_after=1):
                if _past(note, request):
                    return True
        return False

    async def close(self) -> None:
        """Close the idle connections; one in use is closed when its wait ends. Idempotent."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
