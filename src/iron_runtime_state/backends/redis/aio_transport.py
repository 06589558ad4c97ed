"""The transport of the asyncio Redis driver (:mod:`.aio`): connections, pipelining, blocking reads.

A :class:`Pipe` carries everything sent to one server: the commands that concurrent tasks issue
in one turn of the event loop leave in one write, on one connection (a :class:`Session`), and a
reader task hands each reply, in order, to the :class:`Entry` of the task that awaits it. Each
session has one watchdog instead of a timer per reply. A blocking read (``XREAD BLOCK``, for
``wait_audit``) goes out on a session of its own (:meth:`Pipe.block`), so the pipelined commands
never queue behind it. What a failure means, and whether to send again, is :mod:`.aio`'s (with
:mod:`.policy`): here a failure is handed over as the reply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.asyncio.connection import AbstractConnection, Connection

from ...errors import BackendError
from .durability import Durability
from .policy import rexc

__all__ = ["Entry", "Pipe", "Session", "as_failure", "pack"]

pack: Callable[[tuple[Any, ...]], bytes]
try:
    import hiredis

    pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is in the 'redis' extra
    _packer = Connection()

    def pack(command: tuple[Any, ...]) -> bytes:
        return b"".join(_packer.pack_command(*command))


_ASKING: Final = pack(("ASKING",))
#: Error replies that concern one command; the connection stays in step (redis-py raises
#: these ConnectionError subclasses for replies, not only for a broken socket).
_REPLY_ERRORS: Final = (rexc.ResponseError, rexc.BusyLoadingError, rexc.AuthenticationError)


def as_failure(error: BaseException) -> rexc.RedisError:
    """``error`` as a redis-py error: what a caller finds in place of the reply it lost."""
    if isinstance(error, rexc.RedisError):
        return error
    lost = rexc.ConnectionError(f"the connection to Redis broke: {type(error).__name__}: {error}")
    lost.__cause__ = error
    return lost


class Entry:
    """One command on its way: its bytes, and the future its caller awaits.

    The future's result is the reply, or the redis-py exception that stands for it (an error
    reply, or the failure that lost it): never an exception set on the future, so one failure
    shared by many commands is not raised, and its traceback grown, once per caller.
    """

    __slots__ = ("asking", "durable", "future", "held", "packed", "sent", "wait")

    def __init__(
        self, packed: bytes, future: asyncio.Future[Any], asking: bool, durable: bool = False
    ) -> None:
        self.packed = packed
        self.future = future
        self.asking = asking
        #: Whether the command is a write that ``durability=`` must confirm.
        self.durable = durable
        #: Whether the command was written, so that it may have run.
        self.sent = False
        #: The command written after this write to confirm it; its reply hands ours over.
        self.wait: Entry | None = None
        #: This write's reply, kept until :attr:`wait` answers.
        self.held: Any = None

    def fail(self, error: rexc.RedisError) -> None:
        """Hand a failure to the caller in place of the reply, unless it stopped waiting."""
        if not self.future.done():
            self.future.set_result(error)


class Session:
    """One connection to one server and the commands in flight on it, answered in order."""

    def __init__(self, conn: AbstractConnection, socket_timeout: float) -> None:
        self.conn = conn
        self.alive = True
        self._timeout = socket_timeout
        self._inflight: collections.deque[Entry | None] = collections.deque()  # None: an ASKING
        self._last = 0.0  # when the last reply came, or the first command after a quiet spell left
        self._watchdog: asyncio.TimerHandle | None = None
        self._silent = False  # the watchdog gave up on the server
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def write(self, entries: Sequence[Entry]) -> None:
        """Send the commands in one write; their replies reach their entries as they come."""
        if not entries:
            return
        inflight = self._inflight
        if not inflight:
            self._last = time.monotonic()
        chunks: list[bytes] = []
        for entry in entries:
            if entry.asking:
                chunks.append(_ASKING)
                inflight.append(None)
            chunks.append(entry.packed)
            entry.sent = True  # from here on it may reach the server, even if the write fails
            inflight.append(entry)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout, self._check)
        try:
            await self.conn.send_packed_command(chunks, check_health=False)
        except Exception as exc:
            self.fail(exc)

    def _check(self) -> None:
        """The watchdog: give up on a server that left commands unanswered for ``socket_timeout``."""
        self._watchdog = None
        if not self.alive or not self._inflight:
            return
        quiet = time.monotonic() - self._last
        if quiet >= self._timeout:
            self._silent = True
            self._reader.cancel()
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self._timeout - quiet, self._check)

    async def _read(self) -> None:
        try:
            await self._dispatch_replies()
        except asyncio.CancelledError:
            if not self._silent:  # closed by the store, or by the loop shutting down
                self.fail(rexc.ConnectionError("the connection was closed"))
                raise
            self.fail(rexc.TimeoutError(f"no reply from Redis in {self._timeout:g} s"))
        except Exception as exc:  # the server hung up, or the stream is garbled
            self.fail(exc)
        finally:  # after fail(): a write meanwhile must not reopen this connection
            with contextlib.suppress(Exception):
                await self.conn.disconnect(nowait=True)

    async def _dispatch_replies(self) -> None:
        """Hand each reply to the oldest command in flight, for as long as the connection lives."""
        read, inflight, clock = self.conn.read_response, self._inflight, time.monotonic
        while True:
            try:
                reply = await read(disconnect_on_error=False)
            except _REPLY_ERRORS as exc:
                reply = exc
            self._last = clock()
            if not inflight:
                raise rexc.InvalidResponse(f"Redis sent a reply nobody asked for: {reply!r:.60}")
            entry = inflight.popleft()
            if entry is not None and not entry.future.done():
                if entry.wait is not None and not isinstance(reply, BaseException):
                    entry.held = reply  # handed over when its confirmation answers
                else:
                    entry.future.set_result(reply)

    def fail(self, error: BaseException) -> None:
        """The connection is lost: every command in flight on it fails with ``error``."""
        if not self.alive:
            return
        self.alive = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        failure = as_failure(error)
        inflight, self._inflight = self._inflight, collections.deque()
        for entry in inflight:
            if entry is not None:
                entry.fail(failure)
        if self._reader is not asyncio.current_task():
            self._reader.cancel()  # it disconnects

    async def close(self) -> None:
        """Fail what is in flight and close the connection."""
        self.fail(rexc.ConnectionError("the store was closed"))
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Pipe:
    """Everything sent to one server: the commands of one event-loop turn leave in one write.

    A writer task takes whatever was queued since it last ran, opens a connection when there is
    none, and writes. A failure to connect fails the queued commands as not sent.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        timeouts: tuple[float, float],
        closed: Callable[[], BackendError],
        durability: Durability,
    ) -> None:
        self._new_connection = connect
        self._durability = durability
        self._confirm = None if durability.command is None else pack(durability.command)
        self._connect_time, self._socket_timeout = timeouts
        self._closed_error = closed
        self._outbox: list[Entry] = []
        self._session: Session | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._closed = False
        #: Connections for blocking reads (:meth:`block`): those free, and those waiting now.
        self._idle: list[Session] = []
        self._blocking: set[Session] = set()

    def submit(self, command: tuple[Any, ...], asking: bool = False, durable: bool = False) -> Entry:
        """Queue a command for this turn's write; await ``.future`` for its reply.

        ``durable``: a write whose reply comes only once ``durability=`` confirmed it.
        """
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        entry = Entry(pack(command), loop.create_future(), asking, durable)
        self._outbox.append(entry)
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)
        elif self._writer is None:
            self._writer = loop.create_task(self._write())
        return entry

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._outbox:
                    self._wake = loop.create_future()
                    await self._wake
                    continue
                session = self._session
                if session is None or not session.alive:
                    try:
                        session = self._session = await self._connect()
                    except Exception as exc:  # nothing was sent: the callers may retry
                        self._fail_outbox(exc)
                        continue
                batch, self._outbox = self._outbox, []
                batch = [entry for entry in batch if not entry.future.cancelled()]
                if self._confirm is not None:
                    self._add_confirmation(batch)
                await session.write(batch)
        finally:
            self._writer = self._wake = None

    def _add_confirmation(self, batch: list[Entry]) -> None:
        """End the batch with one command that confirms all its writes (see :mod:`.durability`)."""
        writes = [entry for entry in batch if entry.durable]
        if not writes or self._confirm is None:
            return
        confirm = Entry(self._confirm, asyncio.get_running_loop().create_future(), False)
        for entry in writes:
            entry.wait = confirm
        confirm.future.add_done_callback(functools.partial(self._confirmed, writes))
        batch.append(confirm)

    def _confirmed(self, writes: list[Entry], confirm: asyncio.Future[Any]) -> None:
        """Hand each write its reply, or ``NotConfirmed`` when the confirmation fell short."""
        problem = self._durability.verdict(confirm.result())
        for entry in writes:
            if not entry.future.done():  # else it failed, or its caller stopped waiting
                entry.future.set_result(entry.held if problem is None else problem)

    async def _connect(self) -> Session:
        conn = self._new_connection()
        opening = conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        try:
            await asyncio.wait_for(opening, self._connect_time)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            if isinstance(exc, asyncio.TimeoutError):
                raise rexc.TimeoutError(
                    f"Redis did not accept a connection in {self._connect_time:g} s"
                ) from None
            raise
        return Session(conn, self._socket_timeout)

    async def block(self, command: tuple[Any, ...], asking: bool = False) -> Entry:
        """Run a command that waits on the server (``XREAD BLOCK``) on a connection of its own,
        never on the shared one, where every command pipelined after it would wait as long.

        One connection per task waiting at the same moment, kept for the next wait. A wait whose
        caller stops waiting (cancelled) closes its connection, whose reply is still to come.
        The entry's future holds the reply, or the redis-py error that stands for it.
        """
        if self._closed:
            raise self._closed_error()
        entry = Entry(pack(command), asyncio.get_running_loop().create_future(), asking)
        session = None
        while self._idle and session is None:
            found = self._idle.pop()
            session = found if found.alive else None
        if session is None:
            try:
                session = await self._connect()
            except Exception as exc:  # nothing was sent: the caller may retry
                entry.fail(as_failure(exc))
                return entry
        self._blocking.add(session)
        try:
            await session.write([entry])
            await entry.future
        except BaseException:
            session.fail(rexc.ConnectionError("the wait was given up"))
            raise
        finally:
            self._blocking.discard(session)
        if session.alive and not self._closed:
            self._idle.append(session)
        return entry

    def _fail_outbox(self, error: BaseException) -> None:
        failure = as_failure(error)
        batch, self._outbox = self._outbox, []
        for entry in batch:
            entry.fail(failure)

    async def close(self) -> None:
        """Fail what is queued or in flight, stop the writer and close the connection."""
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
        self._fail_outbox(rexc.ConnectionError("the store was closed"))
        sessions = [*self._idle, *self._blocking]
        if self._session is not None:
            sessions.append(self._session)
        self._idle, self._blocking = [], set()
        for session in sessions:
            await session.close()
