"""The asyncio Redis driver, on ``redis.asyncio``, with automatic pipelining.

The same keys, Lua scripts, operations and retry policy as the sync driver (:mod:`.sync`):
every operation is a generator of :mod:`.ops`, run by name through :meth:`AsyncRedisBackend.call`
and :meth:`~AsyncRedisBackend.stream`, every failure is judged by :mod:`.policy`, and this
module only carries commands to Redis and replies back: it routes them and retries them, over
the connections of :mod:`.aio_transport`.

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

Blocking reads. ``wait_audit``'s ``XREAD BLOCK`` (a :class:`~.requests.Block`) never goes on the
shared connection, where every command pipelined after it would wait as long: it takes a
connection of its own (:meth:`.aio_transport.Pipe.block`), one per task waiting at the same moment,
kept for the next wait, and is routed, redirected and retried like any read.

Durability. With ``durability="replicated"`` or ``"aof"``, each write of the store carries a mark,
and a batch written to a server that holds a marked write ends with one ``WAIT`` (or ``WAITAOF``),
on the same connection, after the batch: WAIT confirms the writes of its own connection up to
that point. The reader keeps each marked write's reply until that confirmation comes, then hands
it over, or hands over :class:`~.durability.NotConfirmed` when it falls short (see
:mod:`.durability`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, TypeVar

from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from ..async_base import AsyncBackend
from .aio_transport import Entry, Pipe
from .durability import Durability
from .keys import Routed
from .ops import Batch, Block, Call, Emit, Gather, Op, Pause, RedisStore, Request
from .policy import SlotDiscovery, plan_batches, rexc, stale_slot_table
from .url import Node, RedisConfig, address

__all__ = ["AsyncRedisBackend"]

_T = TypeVar("_T")
_CONNECTION_CLASSES: Final[dict[str, type[AbstractConnection]]] = {
    "tcp": Connection,
    "ssl": SSLConnection,
    "unix": UnixDomainSocketConnection,
}


class AsyncRedisBackend(RedisStore, AsyncBackend):
    """A store in Redis, standalone or Cluster, for asyncio; shares its data with the sync backend.

    Build it with :func:`~iron_runtime_state.backends.redis.open_redis_async` (or
    ``AsyncStateManager.with_redis`` / ``from_url``). Use it from one event loop at a time.
    """

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        super().__init__(config)
        self._durability = Durability(config)
        self._pipes: dict[Node, Pipe] = {}
        self._single: Pipe | None = None
        self._table: Sequence[Pipe | None] | None = None  # cluster: each slot's master
        self._loading: asyncio.Future[Sequence[Pipe | None]] | None = None
        if not config.cluster:
            self._single = self._new_pipe(config.nodes[0] if config.nodes else None)

    # -- connections and routing ----------------------------------------------------------------

    def _new_pipe(self, node: Node | None) -> Pipe:
        config = self._config
        kwargs = config.connection_kwargs(node)
        kwargs["socket_timeout"] = None  # replies are timed by each connection's watchdog
        connection_class = _CONNECTION_CLASSES[config.connection_kind]
        timeouts = (config.socket_connect_timeout + config.socket_timeout, config.socket_timeout)
        return Pipe(lambda: connection_class(**kwargs), timeouts, self._policy.closed_error, self._durability)

    def _pipe(self, node: Node) -> Pipe:
        pipe = self._pipes.get(node)
        if pipe is None:
            pipe = self._pipes[node] = self._new_pipe(node)
        return pipe

    async def _route(self, slot: int) -> Pipe:
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

    async def _load_slots(self) -> Sequence[Pipe | None]:
        """The slot table, read once however many tasks need it at the same moment."""
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.ensure_future(self._discover())
            loading.add_done_callback(self._loaded)
        return await asyncio.shield(loading)

    def _loaded(self, loading: asyncio.Future[Sequence[Pipe | None]]) -> None:
        self._loading = None
        if not loading.cancelled():
            loading.exception()  # delivered to the callers; never logged as unretrieved

    async def _discover(self) -> Sequence[Pipe | None]:
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
        if type(request) is Block:
            return await self._block(request)
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

    async def _block(self, request: Block) -> Any:
        """Run a blocking read on a connection of its own (:meth:`Pipe.block`), following
        redirects and retried as any read while the call's time allows."""
        call = Call(request.slot, request.command, True, request.what)
        attempt = self._policy.attempt(call, time.monotonic())
        reply: Any
        while True:
            asking = attempt.asking
            try:
                pipe = self._pipe(asking) if asking is not None else await self._route(call.slot)
            except rexc.RedisError as exc:
                reply, sent = exc, False
            else:
                entry = await pipe.block(attempt.command, asking is not None)
                reply, sent = entry.future.result(), entry.sent
            if not isinstance(reply, rexc.RedisError):
                return reply
            if stale_slot_table(reply):
                self._forget_slots()
            pause = attempt.failed(reply, sent)  # raises when it must not, or cannot, go on
            if pause:
                await asyncio.sleep(pause)

    async def _gather(self, items: Sequence[Routed]) -> list[Any]:
        """Reads pipelined per server and sent once; a server that fails gives its error as its
        commands' replies (see :class:`~.ops.Gather`)."""
        single, table = self._single, self._table
        if single is None and table is None:
            with contextlib.suppress(rexc.RedisError):  # then every read fails, as unroutable
                table = await self._load_slots()
        entries: list[Entry | None] = []
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

        def route(i: int) -> Pipe | None:
            return single or (table[items[i][0]] if table is not None else None)

        waits = self._durability.waits
        entries: list[Entry | None] = [None] * len(items)
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
        route: Callable[[int], Pipe | None],
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
        again: dict[int, Entry] = {}
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
