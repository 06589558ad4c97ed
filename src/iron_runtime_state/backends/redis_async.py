"""The Redis store for asyncio, on ``redis.asyncio``, with automatic pipelining.

The same keys, Lua scripts, operations and retry policy as the sync backend (``redis.py``):
every operation is a generator of :mod:`.redis_ops`, every failure is judged by
:mod:`.redis_policy`, and this module only carries commands to Redis and replies back.

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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, MissingDependency, StateError
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from .async_base import AsyncBackend
from .base import AuditQuery, CommitResult, SpendResult, UpdateFn
from .redis_layout import DEFAULT_NAMESPACE, RedisConfig, RedisLayout, Routed, parse_redis_url
from .redis_ops import Batch, Call, Emit, Op, Pause, RedisOps, Request
from .redis_policy import Node, RetryPolicy, SlotDiscovery, plan_batches, rexc, stale_slot_table

try:
    from redis.asyncio.connection import (
        AbstractConnection,
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency(
        f"the Redis store needs the 'redis' extra: pip install 'iron-runtime-state[redis]' ({exc})"
    ) from exc

_pack: Callable[[tuple[Any, ...]], bytes]
try:
    import hiredis

    _pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is in the 'redis' extra
    _packer = Connection()

    def _pack(command: tuple[Any, ...]) -> bytes:
        return b"".join(_packer.pack_command(*command))


__all__ = ["AsyncRedisBackend", "open_redis_async"]

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

    __slots__ = ("asking", "future", "packed", "sent")

    def __init__(self, packed: bytes, future: asyncio.Future[Any], asking: bool) -> None:
        self.packed = packed
        self.future = future
        self.asking = asking
        #: Whether the command was written, so that it may have run.
        self.sent = False

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
    ) -> None:
        self._new_connection = connect
        self._connect_time, self._socket_timeout = timeouts
        self._closed_error = closed
        self._outbox: list[_Entry] = []
        self._session: _Session | None = None
        self._writer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._closed = False

    def submit(self, command: tuple[Any, ...], asking: bool = False) -> _Entry:
        """Queue a command for this turn's write; await ``.future`` for its reply."""
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        entry = _Entry(_pack(command), loop.create_future(), asking)
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
                await session.write([entry for entry in batch if not entry.future.cancelled()])
        finally:
            self._writer = self._wake = None

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


class AsyncRedisBackend(AsyncBackend):
    """A store in Redis, standalone or Cluster, for asyncio; shares its data with the sync backend.

    Build it with :func:`open_redis_async` (or ``AsyncStateManager.with_redis`` / ``from_url``).
    Use it from one event loop at a time.
    """

    driver_errors = (rexc.RedisError,)

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        self._config = config
        self._layout = RedisLayout(config.namespace)
        self._ops = RedisOps(self._layout, config.timeout)
        self._policy = RetryPolicy(config)
        self._pipes: dict[Node, _Pipe] = {}
        self._single: _Pipe | None = None
        self._table: Sequence[_Pipe | None] | None = None  # cluster: each slot's master
        self._loading: asyncio.Future[Sequence[_Pipe | None]] | None = None
        if not config.cluster:
            self._single = self._new_pipe(config.nodes[0] if config.nodes else None)
        self._ready = False  # the namespace's layout was checked; False again after close()
        self._closed = False

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return self._policy.url

    @property
    def layout(self) -> RedisLayout:
        """The namespace's key layout (for tools and tests that read Redis directly)."""
        return self._layout

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a redis-py exception that escaped the retry logic."""
        return self._policy.map_error(exc)

    # -- connections and routing ----------------------------------------------------------------

    def _new_pipe(self, node: Node | None) -> _Pipe:
        config = self._config
        kwargs = config.connection_kwargs(node)
        kwargs["socket_timeout"] = None  # replies are timed by each connection's watchdog
        connection_class = _CONNECTION_CLASSES[config.connection_kind]
        timeouts = (config.socket_connect_timeout + config.socket_timeout, config.socket_timeout)
        return _Pipe(lambda: connection_class(**kwargs), timeouts, self._policy.closed_error)

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
                op.close()  # lets the operation clean up (see redis_ops)
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
        if type(request) is Pause:
            await asyncio.sleep(request.seconds)
            return None
        raise TypeError(f"unexpected request {request!r:.80}")  # pragma: no cover - an Emit in an op

    async def _prepare(self) -> None:
        """Check, once, that the namespace uses this version's key layout.

        Tasks that start together may each check; the check is a read, and all of them are
        pipelined anyway.
        """
        if self._closed:
            raise self._policy.closed_error()
        await self._drive(self._ops.prepare(), check=False)
        self._ready = True

    async def _run(self, call: Call) -> Any:
        """Run one command on the server of its slot; see :mod:`.redis_policy` for retries."""
        started = time.monotonic()
        pipe = self._single
        if pipe is None and self._table is not None:
            pipe = self._table[call.slot]
        if pipe is None:
            return await self._retry(call, started, None, False)
        entry = pipe.submit(call.command)
        reply = await entry.future
        if isinstance(reply, rexc.RedisError):
            return await self._retry(call, started, reply, entry.sent)
        return reply

    async def _retry(self, call: Call, started: float, failure: BaseException | None, sent: bool) -> Any:
        """The general path: routing, redirects, the ``EVAL`` fallback, pauses, giving up."""
        attempt = self._policy.attempt(call, started)
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
            entry = pipe.submit(attempt.command, asking is not None)
            reply = await entry.future
            if not isinstance(reply, rexc.RedisError):
                return reply
            failure, sent = reply, entry.sent

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

        entries: list[_Entry | None] = [None] * len(items)
        for pipe, indices in plan_batches(range(len(items)), route):
            if pipe is not None:
                for i in indices:
                    entries[i] = pipe.submit(items[i][1])
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
            again[i] = pipe.submit(items[i][1])
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

    # -- agent states --------------------------------------------------------------------------

    async def save(self, state: AgentState, now: float) -> None:
        """See :meth:`AsyncBackend.save`."""
        await self._drive(self._ops.save(state, now))

    async def save_many(self, states: Sequence[AgentState], now: float) -> None:
        """See :meth:`AsyncBackend.save_many`."""
        await self._drive(self._ops.save_many(states, now))

    async def get(self, agent_id: AgentId) -> AgentState | None:
        """See :meth:`AsyncBackend.get`."""
        return await self._drive(self._ops.get(agent_id))

    async def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        """See :meth:`AsyncBackend.get_many`."""
        return await self._drive(self._ops.get_many(agent_ids))

    async def remove(self, agent_id: AgentId) -> bool:
        """See :meth:`AsyncBackend.remove`."""
        return await self._drive(self._ops.remove(agent_id))

    async def list_ids(self) -> list[str]:
        """See :meth:`AsyncBackend.list_ids`."""
        return await self._drive(self._ops.list_ids())

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> AsyncIterator[AgentState]:
        """See :meth:`AsyncBackend.iter_states`."""
        return self._iterate(self._ops.iter_states(status, batch_size))

    async def stats(self) -> FleetStats:
        """See :meth:`AsyncBackend.stats`."""
        return await self._drive(self._ops.stats())

    async def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        """See :meth:`AsyncBackend.update` (``fn`` runs on the event loop)."""
        return await self._drive(self._ops.update(agent_id, fn, now))

    # -- atomic counters ------------------------------------------------------------------------

    async def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        """See :meth:`AsyncBackend.record_spend`."""
        return await self._drive(self._ops.record_spend(agent_id, amount, now))

    async def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        """See :meth:`AsyncBackend.record_pii`."""
        return await self._drive(self._ops.record_pii(agent_id, count, now))

    async def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        """See :meth:`AsyncBackend.set_status`."""
        return await self._drive(self._ops.set_status(agent_id, status, now))

    # -- reservations -----------------------------------------------------------------------------

    async def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        """See :meth:`AsyncBackend.reserve`."""
        return await self._drive(self._ops.reserve(agent_id, amount, ttl, reservation_id))

    async def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        """See :meth:`AsyncBackend.commit`."""
        return await self._drive(self._ops.commit(reservation, actual, now))

    async def release(self, reservation: Reservation, now: float) -> None:
        """See :meth:`AsyncBackend.release`."""
        await self._drive(self._ops.release(reservation))

    async def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        """See :meth:`AsyncBackend.reserved`."""
        return await self._drive(self._ops.reserved(agent_id))

    # -- audit trail ------------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        """See :meth:`AsyncBackend.append_audit`."""
        return await self._drive(self._ops.append_audit(events, chain))

    async def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        """See :meth:`AsyncBackend.query_audit`."""
        return await self._drive(self._ops.query_audit(query))

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> AsyncIterator[AuditRow]:
        """See :meth:`AsyncBackend.iter_audit_rows`."""
        return self._iterate(self._ops.iter_audit_rows(after_seq, batch_size))

    async def audit_anchor(self) -> tuple[int, str]:
        """See :meth:`AsyncBackend.audit_anchor`."""
        return await self._drive(self._ops.read_head(anchor=True))

    async def audit_head(self) -> tuple[int, str]:
        """See :meth:`AsyncBackend.audit_head`."""
        return await self._drive(self._ops.read_head())

    async def audit_count(self) -> int:
        """See :meth:`AsyncBackend.audit_count`."""
        return await self._drive(self._ops.audit_count())

    async def prune_audit(self, before: int) -> int:
        """See :meth:`AsyncBackend.prune_audit`."""
        return await self._drive(self._ops.prune_audit(before))

    async def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        """See :meth:`AsyncBackend.purge_agents`."""
        return await self._drive(self._ops.purge_agents(statuses, changed_before))

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


def open_redis_async(url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> AsyncRedisBackend:
    """Build the asyncio Redis store for ``url``; the same URLs and options as ``open_redis``.

    No connection is made until the first call.
    """
    return AsyncRedisBackend(parse_redis_url(url, namespace=namespace, **options))
