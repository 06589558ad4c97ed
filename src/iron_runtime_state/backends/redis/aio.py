"""The asyncio Redis driver, on ``redis.asyncio``, with automatic pipelining.

The same keys, Lua scripts, operations and retry policy as the sync driver (:mod:`.sync`):
every operation is a generator of :mod:`.ops`, run by name through :meth:`AsyncRedisBackend.call`
and :meth:`~AsyncRedisBackend.stream`, every failure is judged by :mod:`.policy`, and this
module only carries commands to Redis and replies back.

Automatic pipelining. Commands that concurrent tasks issue in one turn of the event loop are
written together, one write per server, on one ``redis.asyncio`` connection per server; a reader
task hands each reply, in order, to the task that awaits it. A hundred tasks calling
``record_spend`` cost a few writes and reads per turn instead of a round trip each, which is
what lets one event loop outrun the sync backend on a thread several times over. Each command
keeps its own fate: an error reply (``NOSCRIPT``, ``MOVED``, ...) concerns that command only,
and a lost connection fails the commands in flight on it, each as the policy says (resent when
safe, else ``BackendUnavailable`` "outcome unknown"). A command whose caller was cancelled
before it was written is never sent.

Timeouts. redis-py's per-read timeout would arm a timer for every reply; instead each connection
has one watchdog that gives up on it when commands are in flight and no reply came for
``socket_timeout``, and opening a connection is bounded by ``socket_connect_timeout +
socket_timeout``. So a call still ends within ``timeout`` (5 s by default). A reader is always
waiting on each connection, so a server that hangs up (a restart) is noticed at once and the
next command goes out on a new connection.

Durability. With ``durability="replicated"`` or ``"aof"``, each write of the store carries a mark,
and a batch written to a server that holds a marked write ends with one ``WAIT`` (or ``WAITAOF``),
on the same connection, after the batch: WAIT confirms the writes of its own connection up to
that point. The reader keeps each marked write's reply until that confirmation comes, then hands
it over, or hands over :class:`~.durability.NotConfirmed` when it falls short (see
:mod:`.durability`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, TypeVar

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from ...errors import BackendError
from ..async_base import AsyncBackend
from .durability import Durability
from .keys import Routed
from .ops import Batch, Call, Emit, Gather, Op, Pause, RedisStore, Request
from .policy import SlotDiscovery, plan_batches, rexc, stale_slot_table
from .url import Node, RedisConfig, address

_pack: Callable[[tuple[Any, ...]], bytes]
try:
    import hiredis

    _pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is in the 'redis' extra
    _packer = Connection()

    def _pack(command: tuple[Any, ...]) -> bytes:
        return b"".join(_packer.pack_command(*command))


__all__ = ["AsyncRedisBackend"]

_T = TypeVar("_T")
_CONNECTION_CLASSES: Final[dict[str, type[AbstractConnection]]] = {
    "tcp": Connection,
    "ssl": SSLConnection,
    "unix": UnixDomainSocketConnection,
}
_ASKING: Final = _pack(("ASKING",))
#: Error replies that concern one command; the connection stays in step (redis-py raises
#: these ConnectionError subclasses for replies, not only for a broken socket).
_REPLY_ERRORS: Final = (rexc.ResponseError, rexc.BusyLoadingError, rexc.AuthenticationError)


def _failure(error: BaseException) -> rexc.RedisError:
    """``error`` as a redis-py error: what a caller finds in place of the reply it lost."""
    if isinstance(error, rexc.RedisError):
        return error
    failure = rexc.ConnectionError(f"the connection to Redis broke: {type(error).__name__}: {error}")
    failure.__cause__ = error
    return failure


class _Entry:
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
        self.wait: _Entry | None = None
        #: This write's reply, kept until :attr:`wait` answers.
        self.held: Any = None

    def fail(self, error: rexc.RedisError) -> None:
        """Hand a failure to the caller in place of the reply, unless it stopped waiting."""
        if not self.future.done():
            self.future.set_result(error)


class _Session:
    """One connection to one server and the commands in flight on it, answered in order."""

    def __init__(self, conn: AbstractConnection, socket_timeout: float) -> None:
        self.conn = conn
        self.alive = True
        self._timeout = socket_timeout
        self._inflight: collections.deque[_Entry | None] = collections.deque()  # None: an ASKING
        self._last = 0.0  # when the last reply came, or the first command after a quiet spell left
        self._watchdog: asyncio.TimerHandle | None = None
        self._silent = False  # the watchdog gave up on the server
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def write(self, entries: Sequence[_Entry]) -> None:
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
        failure = _failure(error)
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


class _Pipe:
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
        self._confirm = None if durability.command is None else _pack(durability.command)
        self._connect_time, self._socket_timeout = timeouts
        self._closed_error = closed
        self._outbox: list[_Entry] = []
        self._session: _Session | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._closed = False

    def submit(self, command: tuple[Any, ...], asking: bool = False, durable: bool = False) -> _Entry:
        """Queue a command for this turn's write; await ``.future`` for its reply.

        ``durable``: a write whose reply comes only once ``durability=`` confirmed it.
        """
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        entry = _Entry(_pack(command), loop.create_future(), asking, durable)
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

    def _add_confirmation(self, batch: list[_Entry]) -> None:
        """End the batch with one command that confirms all its writes (see :mod:`.durability`)."""
        writes = [entry for entry in batch if entry.durable]
        if not writes or self._confirm is None:
            return
        confirm = _Entry(self._confirm, asyncio.get_running_loop().create_future(), False)
        for entry in writes:
            entry.wait = confirm
        confirm.future.add_done_callback(functools.partial(self._confirmed, writes))
        batch.append(confirm)

    def _confirmed(self, writes: list[_Entry], confirm: asyncio.Future[Any]) -> None:
        """Hand each write its reply, or ``NotConfirmed`` when the confirmation fell short."""
        problem = self._durability.verdict(confirm.result())
        for entry in writes:
            if not entry.future.done():  # else it failed, or its caller stopped waiting
                entry.future.set_result(entry.held if problem is None else problem)

    async def _connect(self) -> _Session:
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
        return _Session(conn, self._socket_timeout)

    def _fail_outbox(self, error: BaseException) -> None:
        failure = _failure(error)
        batch, self._outbox = self._outbox, []
        for entry in batch:
            entry.fail(failure)

    async def close(self) -> None:
        """Fail what is queued or in flight, stop the writer and close the connection."""
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
        self._fail_outbox(rexc.ConnectionError("the store was closed"))
        if self._session is not None:
            await self._session.close()


class AsyncRedisBackend(RedisStore, AsyncBackend):
    """A store in Redis, standalone or Cluster, for asyncio; shares its data with the sync backend.

    Build it with :func:`~iron_runtime_state.backends.redis.open_redis_async` (or
    ``AsyncStateManager.with_redis`` / ``from_url``). Use it from one event loop at a time.
    """

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        super().__init__(config)
        self._durability = Durability(config)
        self._pipes: dict[Node, _Pipe] = {}
        self._single: _Pipe | None = None
        self._table: Sequence[_Pipe | None] | None = None  # cluster: each slot's master
        self._loading: asyncio.Future[Sequence[_Pipe | None]] | None = None
        if not config.cluster:
            self._single = self._new_pipe(config.nodes[0] if config.nodes else None)

    # -- connections and routing ----------------------------------------------------------------

    def _new_pipe(self, node: Node | None) -> _Pipe:
        config = self._config
        kwargs = config.connection_kwargs(node)
        kwargs["socket_timeout"] = None  # replies are timed by each connection's watchdog
        connection_class = _CONNECTION_CLASSES[config.connection_kind]
        timeouts = (config.socket_connect_timeout + config.socket_timeout, config.socket_timeout)
        return _Pipe(
            lambda: connection_class(**kwargs), timeouts, self._policy.closed_error, self._durability
        )

    def _pipe(self, node: Node) -> _Pipe:
        pipe = self._pipes.get(node)
        if pipe is None:
            pipe = self._pipes[node] = self._new_pipe(node)
        return pipe

    async def _route(self, slot: int) -> _Pipe:
        """The pipe to the server of ``slot`` (a cluster's slot table is loaded lazily)."""
        if self._single is not None:
            return self._single
        table = self._table
        if table is None:
            table = await self._load_slots()
        pipe = table[slot]
        if pipe is None:
            self._table = None
            raise rexc.ClusterDownError(f"no master serves slot {slot}")
        return pipe

    async def _load_slots(self) -> Sequence[_Pipe | None]:
        """The slot table, read once however many tasks need it at the same moment."""
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.ensure_future(self._discover())
            loading.add_done_callback(self._loaded)
        return await asyncio.shield(loading)

    def _loaded(self, loading: asyncio.Future[Sequence[_Pipe | None]]) -> None:
        self._loading = None
        if not loading.cancelled():
            loading.exception()  # delivered to the callers; never logged as unretrieved

    async def _discover(self) -> Sequence[_Pipe | None]:
        """Ask the known nodes, seeds first, for the slot table (``CLUSTER SLOTS``)."""
        discovery = SlotDiscovery(self._policy, self._config.nodes, list(self._pipes), time.monotonic())
        for node in discovery.nodes():
            reply = await self._pipe(node).submit(("CLUSTER", "SLOTS")).future
            if isinstance(reply, rexc.ResponseError):
                raise discovery.not_a_cluster(node, reply) from reply
            if isinstance(reply, rexc.RedisError):
                discovery.unreachable(reply)
                continue
            self._table = table = discovery.table(reply, node, self._pipe)
            return table
        raise discovery.no_answer()

    def _forget_slots(self) -> None:
        if self._single is None:
            self._table = None

    # -- running operations ----------------------------------------------------------------------

    async def _drive(self, op: Op[_T], *, check: bool = True) -> _T:
        """Run an operation of :class:`RedisOps`: carry each request to Redis and its reply back.

        ``check=False`` skips the one-time namespace check (for the check itself).
        """
        if check and not self._ready:
            await self._prepare()
        reply: Any = None
        while True:
            try:
                request = op.send(reply)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            try:
                # A Call is nearly every request: run it without the dispatch's extra frame.
                reply = await (self._run(request) if type(request) is Call else self._do(request))
            except BaseException:
                op.close()  # lets the operation clean up (see .ops)
                raise

    async def _iterate(self, op: Op[None]) -> AsyncIterator[Any]:
        """Run an iterator operation, yielding what it emits."""
        if not self._ready:
            await self._prepare()
        reply: Any = None
        while True:
            try:
                request = op.send(reply)
            except StopIteration:
                return
            if type(request) is Emit:
                for item in request.items:
                    yield item
                reply = None
                continue
            try:
                reply = await self._do(request)
            except BaseException:
                op.close()
                raise

    async def _do(self, request: Request) -> Any:
        if type(request) is Call:
            return await self._run(request)
        if type(request) is Batch:
            return await self._batch(request.items, request.what)
        if type(request) is Gather:
            return await self._gather(request.items)
        if type(request) is Pause:
            await asyncio.sleep(request.seconds)
            return None
        raise TypeError(f"unexpected request {request!r:.80}")  # pragma: no cover - an Emit in an op

    async def _prepare(self) -> None:
        """Check, once, the namespace's key layout and each master's settings (:mod:`.durability`).

        Tasks that start together may each check; the checks are reads, and all of them are
        pipelined anyway.
        """
        if self._closed:
            raise self._policy.closed_error()
        await self._drive(self.ops.prepare(), check=False)
        await self._check_servers()
        self._ready = True

    async def _check_servers(self) -> None:
        """Ask each master the store uses the checks of :mod:`.durability` (once per store)."""
        if self._single is not None:
            targets = [(self.url, self._single)]
        else:
            served = {id(pipe) for pipe in self._table or await self._load_slots()}
            pipes = list(self._pipes.items())
            targets = [(address(node), pipe) for node, pipe in pipes if id(pipe) in served]
        for where, pipe in targets:
            entries = [pipe.submit(probe) for probe in self._durability.probes]
            self._durability.judge(where, [await entry.future for entry in entries])

    async def _run(self, call: Call) -> Any:
        """Run one command on the server of its slot; see :mod:`.policy` for retries."""
        started = time.monotonic()
        pipe = self._single
        if pipe is None and self._table is not None:
            pipe = self._table[call.slot]
        if pipe is None:
            return await self._retry(call, started, None, False)
        entry = pipe.submit(call.command, durable=self._durability.waits(call.command))
        reply = await entry.future
        if isinstance(reply, rexc.RedisError):
            return await self._retry(call, started, reply, entry.sent)
        return reply

    async def _retry(self, call: Call, started: float, failure: BaseException | None, sent: bool) -> Any:
        """The general path: routing, redirects, the ``EVAL`` fallback, pauses, giving up."""
        attempt = self._policy.attempt(call, started)
        durable = self._durability.waits(call.command)
        while True:
            if failure is not None:
                if stale_slot_table(failure):
                    self._forget_slots()
                pause = attempt.failed(failure, sent)  # raises when it must not, or cannot, go on
                if pause:
                    await asyncio.sleep(pause)
            asking = attempt.asking
            try:
                pipe = self._pipe(asking) if asking is not None else await self._route(call.slot)
            except rexc.RedisError as exc:
                failure, sent = exc, False
                continue
            entry = pipe.submit(attempt.command, asking is not None, durable)
            reply = await entry.future
            if not isinstance(reply, rexc.RedisError):
                return reply
            failure, sent = reply, entry.sent

    async def _gather(self, items: Sequence[Routed]) -> list[Any]:
        """Reads pipelined per server and sent once; a server that fails gives its error as its
        commands' replies (see :class:`~.ops.Gather`)."""
        single, table = self._single, self._table
        if single is None and table is None:
            with contextlib.suppress(rexc.RedisError):  # then every read fails, as unroutable
                table = await self._load_slots()
        entries: list[_Entry | None] = []
        for slot, command in items:
            pipe = single or (table[slot] if table is not None else None)
            entries.append(None if pipe is None else pipe.submit(command))
        out: list[Any] = []
        for entry in entries:
            reply = rexc.ClusterDownError("no master serves it") if entry is None else await entry.future
            if isinstance(reply, rexc.RedisError) and stale_slot_table(reply):
                self._forget_slots()
            out.append(reply)
        return out

    async def _batch(self, items: Sequence[Routed], what: str) -> list[Any]:
        """Run commands that are safe to repeat, pipelined per server; replies in order.

        Each command that fails is retried on its own; scripts a server lacks are loaded there
        first (one ``SCRIPT LOAD`` each) and only the commands that missed them are sent again.
        """
        started = time.monotonic()
        single, table = self._single, self._table
        if single is None and table is None:
            with contextlib.suppress(rexc.RedisError):  # then each command retries on its own
                table = await self._load_slots()

        def route(i: int) -> _Pipe | None:
            return single or (table[items[i][0]] if table is not None else None)

        waits = self._durability.waits
        entries: list[_Entry | None] = [None] * len(items)
        for pipe, indices in plan_batches(range(len(items)), route):
            if pipe is not None:
                for i in indices:
                    entries[i] = pipe.submit(items[i][1], durable=waits(items[i][1]))
        out: list[Any] = [None] * len(items)
        failed: list[tuple[int, BaseException | None, bool]] = []
        for i, entry in enumerate(entries):
            reply = None if entry is None else await entry.future
            if entry is None or isinstance(reply, rexc.RedisError):
                failed.append((i, reply, entry is not None and entry.sent))
            else:
                out[i] = reply
        if failed:
            failed = await self._reload_scripts(items, failed, route, out)
        if failed:
            replies = await asyncio.gather(
                *(self._retry(Call(*items[i], True, what), started, exc, sent) for i, exc, sent in failed),
                return_exceptions=True,  # every retry ends before the first error is raised
            )
            for (i, _, _), reply in zip(failed, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                out[i] = reply
        return out

    async def _reload_scripts(
        self,
        items: Sequence[Routed],
        failed: list[tuple[int, BaseException | None, bool]],
        route: Callable[[int], _Pipe | None],
        out: list[Any],
    ) -> list[tuple[int, BaseException | None, bool]]:
        """Load the scripts that commands missed on their servers and send those commands again.

        ``SCRIPT LOAD`` goes first on the same connection, so the commands after it find it.
        Returns the failures left.
        """
        missing = [(i, route(i)) for i, exc, _ in failed if isinstance(exc, rexc.NoScriptError)]
        if not missing:
            return failed
        loaded: set[tuple[int, str]] = set()
        again: dict[int, _Entry] = {}
        for i, pipe in missing:
            assert pipe is not None  # it answered NOSCRIPT
            sha = items[i][1][1]
            if (id(pipe), sha) not in loaded:
                loaded.add((id(pipe), sha))
                pipe.submit(("SCRIPT", "LOAD", self._policy.sources[sha]))
            again[i] = pipe.submit(items[i][1], durable=self._durability.waits(items[i][1]))
        left: list[tuple[int, BaseException | None, bool]] = []
        for i, exc, sent in failed:
            entry = again.get(i)
            if entry is None:
                left.append((i, exc, sent))
                continue
            reply = await entry.future
            if isinstance(reply, rexc.RedisError):
                left.append((i, reply, entry.sent))
            else:
                out[i] = reply
        return left

    # -- the store contract ----------------------------------------------------------------------

    async def call(self, name: str, *args: Any) -> Any:
        """Run the store operation ``name`` (see :class:`~iron_runtime_state.backends.base.Backend`)."""
        return await self._drive(getattr(self.ops, name)(*args))

    def stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """Run the streaming store operation ``name`` (one of ``ITERATORS``); its items."""
        return self._iterate(getattr(self.ops, name)(*args))

    # -- lifecycle ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Fail what is still queued or in flight and close every connection; twice is harmless."""
        self._closed = True
        self._ready = False
        pipes = list(self._pipes.values())
        if self._single is not None:
            pipes.append(self._single)
        for pipe in pipes:
            await pipe.close()

    def __repr__(self) -> str:
        return f"AsyncRedisBackend({self.url!r})"
