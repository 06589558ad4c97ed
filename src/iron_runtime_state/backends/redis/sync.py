"""The sync Redis driver: :class:`RedisBackend`, over redis-py's blocking connection pools.

State is shared by every process and host that uses the same server and namespace. What this
module does not do itself is written once for it and for the asyncio driver (:mod:`.aio`):
URLs in :mod:`.url`, keys in :mod:`.keys`, Lua scripts in :mod:`.scripts`, every operation in
:mod:`.ops`, and what a failure means in :mod:`.policy`. Its store operations are not written
here either: :class:`~iron_runtime_state.backends.base.OpsBackend` derives each from the
generator of the same name on :attr:`RedisBackend.ops`. This module only moves bytes: it routes
each command to the server that holds its slot, runs it, and retries what the policy says is
safe to retry.

Faults and retries. redis-py's own retries are off. A call that fails because the server cannot
be reached is tried again, with growing pauses, while its time budget (``timeout``, 5 s by
default) allows another full attempt; then it raises :class:`BackendUnavailable`. A command
that fails before it was sent, or that the server refused without running it (``LOADING``,
``TRYAGAIN``, ``CLUSTERDOWN``, ``MOVED``, ``READONLY``) is always safe to repeat. A command
whose reply was lost may have run: reads and writes that set absolute values are repeated,
but an operation that adds, appends or settles (``record_spend``, ``commit``, ``append_audit``,
...) is never sent twice: it raises :class:`BackendUnavailable` saying the outcome is unknown.
The connection pools reconnect by themselves, so a manager works again once the server is
back.

Durability. With ``durability="replicated"`` or ``"aof"``, a write goes out in one packet with the
``WAIT`` (or ``WAITAOF``) that confirms it, on the same connection, and the call returns only
once that confirmation came (see :mod:`.durability`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, TypeVar

from redis.connection import Connection, ConnectionPool, SSLConnection, UnixDomainSocketConnection

from ...errors import BackendError
from ..base import OpsBackend
from .durability import Durability
from .keys import Routed
from .ops import Batch, Block, Call, Emit, Gather, Op, Pause, RedisStore, Request
from .policy import UNREACHABLE, Attempt, SlotDiscovery, plan_batches, rexc, stale_slot_table
from .url import Node, RedisConfig, address

# hiredis (part of the extra) packs a command in C; redis-py wraps that in a slower loop.
_hiredis_pack: Callable[[tuple[Any, ...]], Any] | None
try:
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is in the 'redis' extra
    _hiredis_pack = None

__all__ = ["RedisBackend"]

_T = TypeVar("_T")
_CONNECTION_CLASSES: Final[dict[str, type[Connection] | type[UnixDomainSocketConnection]]] = {
    "tcp": Connection,
    "ssl": SSLConnection,
    "unix": UnixDomainSocketConnection,
}


class RedisBackend(RedisStore, OpsBackend):
    """A store in Redis, standalone or Cluster; thread-safe and safe to share across processes.

    Build it with :func:`~iron_runtime_state.backends.redis.open_redis` (or
    ``StateManager.with_redis`` / ``from_url``).
    """

    schemes = ("redis", "rediss", "unix", "redis+cluster")

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        super().__init__(config)
        self._lock = threading.Lock()
        self._pools: dict[Node, ConnectionPool] = {}
        self._single: ConnectionPool | None = None
        self._table: Sequence[ConnectionPool | None] | None = None  # cluster: each slot's master
        self._durability = Durability(config)
        if not config.cluster:
            self._single = self._new_pool(config.nodes[0] if config.nodes else None)

    # -- connections and routing ----------------------------------------------------------------

    def _new_pool(self, node: Node | None) -> ConnectionPool:
        config = self._config
        return ConnectionPool(
            connection_class=_CONNECTION_CLASSES[config.connection_kind],
            max_connections=config.max_connections,
            **config.connection_kwargs(node),
        )

    def _pool(self, node: Node) -> ConnectionPool:
        pool = self._pools.get(node)
        if pool is None:
            with self._lock:
                pool = self._pools.get(node)
                if pool is None:
                    pool = self._pools[node] = self._new_pool(node)
        return pool

    def _route(self, slot: int, started: float) -> ConnectionPool:
        """The pool of the cluster master serving ``slot`` (the slot table is loaded lazily)."""
        table = self._table
        if table is None:
            table = self._load_slots(started)
        pool = table[slot]
        if pool is None:
            self._table = None
            raise rexc.ClusterDownError(f"no master serves slot {slot}")
        return pool

    def _load_slots(self, started: float) -> Sequence[ConnectionPool | None]:
        """Ask the known nodes, seeds first, for the slot table (``CLUSTER SLOTS``)."""
        with self._lock:
            table = self._table
            if table is not None:
                return table
            discovery = SlotDiscovery(self._policy, self._config.nodes, list(self._pools), started)
        for node in discovery.nodes():
            try:
                reply = _run_one(self._pool(node), ("CLUSTER", "SLOTS"))
            except UNREACHABLE as exc:
                discovery.unreachable(exc)
                continue
            except rexc.ResponseError as exc:
                raise discovery.not_a_cluster(node, exc) from exc
            self._table = table = discovery.table(reply, node, self._pool)
            return table
        raise discovery.no_answer()

    def _forget_slots(self) -> None:
        if self._single is None:
            self._table = None

    # -- running operations ----------------------------------------------------------------------

    def _drive(self, op: Op[_T], *, check: bool = True) -> _T:
        """Run an operation of :class:`RedisOps`: carry each request to Redis and its reply back.

        ``check=False`` skips the one-time namespace check (for the check itself).
        """
        if check and not self._ready:
            self._prepare()
        reply: Any = None
        while True:
            try:
                request = op.send(reply)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            try:
                # A Call is nearly every request: run it without the dispatch's extra frame.
                reply = self._run(request) if type(request) is Call else self._do(request)
            except BaseException:
                op.close()  # lets the operation clean up (see .ops)
                raise

    def _iterate(self, op: Op[None]) -> Iterator[Any]:
        """Run an iterator operation, yielding what it emits."""
        if not self._ready:
            self._prepare()
        reply: Any = None
        while True:
            try:
                request = op.send(reply)
            except StopIteration:
                return
            if type(request) is Emit:
                yield from request.items
                reply = None
                continue
            try:
                reply = self._do(request)
            except BaseException:
                op.close()
                raise

    def _do(self, request: Request) -> Any:
        if type(request) is Call:
            return self._run(request)
        if type(request) is Batch:
            return self._batch(request.items, request.what)
        if type(request) is Gather:
            return self._gather(request.items)
        if type(request) is Block:
            # A pooled connection, held for at most request.seconds (a second at most), which is
            # well within its socket timeout; other calls take other connections meanwhile.
            return self._run(Call(request.slot, request.command, True, request.what))
        if type(request) is Pause:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"unexpected request {request!r:.80}")  # pragma: no cover - an Emit in an op

    def _prepare(self) -> None:
        """Check, once, the namespace's key layout and each master's settings (:mod:`.durability`)."""
        with self._lock:
            if self._closed:
                raise self._policy.closed_error()
        self._drive(self.ops.prepare(), check=False)
        self._check_servers()
        self._ready = True

    def _check_servers(self) -> None:
        """Ask each master the store uses the checks of :mod:`.durability` (once per store)."""
        if self._single is not None:
            targets = [(self.url, self._single)]
        else:
            served = {id(pool) for pool in self._table or self._load_slots(time.monotonic())}
            pools = list(self._pools.items())
            targets = [(address(node), pool) for node, pool in pools if id(pool) in served]
        probes = self._durability.probes
        for where, pool in targets:
            try:
                replies = _run_many(pool, probes)
            except UNREACHABLE as exc:
                replies = [exc]
            self._durability.judge(where, replies)

    def _run(self, call: Call) -> Any:
        """Run one command on the server of its slot; see the module docstring for retries."""
        started = time.monotonic()
        command = call.command
        confirm = self._durability.command if self._durability.waits(command) else None
        asking: Node | None = None
        attempt: Attempt | None = None
        while True:
            sent = False
            try:
                if asking is not None:
                    pool = self._pool(asking)
                elif self._single is not None:
                    pool = self._single
                else:
                    pool = self._route(call.slot, started)
                conn: Any = pool.get_connection()
                try:
                    if asking is None and confirm is None and _hiredis_pack is not None:
                        conn.send_packed_command((_hiredis_pack(command),))
                        sent = True
                        return conn.read_response()
                    before = [("ASKING",)] if asking is not None else []
                    after = [confirm] if confirm is not None else []
                    conn.send_packed_command(conn.pack_commands([*before, command, *after]))
                    sent = True
                    if asking is not None:
                        conn.read_response()
                    return conn.read_response() if confirm is None else self._confirmed(conn)
                finally:
                    pool.release(conn)
            except rexc.RedisError as exc:
                if attempt is None:
                    attempt = self._policy.attempt(call, started)
                if stale_slot_table(exc):
                    self._forget_slots()
                pause = attempt.failed(exc, sent)  # raises when it must not, or cannot, go on
                command, asking = attempt.command, attempt.asking
                if pause:
                    time.sleep(pause)

    def _gather(self, items: Sequence[Routed]) -> list[Any]:
        """Reads pipelined per server and sent once; a server that fails gives its error as its
        commands' replies (see :class:`~.ops.Gather`)."""
        out: list[Any] = [None] * len(items)
        started = time.monotonic()
        servers: dict[int, tuple[ConnectionPool, list[int]]] = {}
        for i, (slot, _) in enumerate(items):
            try:
                pool = self._single or self._route(slot, started)
            except rexc.RedisError as exc:
                out[i] = exc
                continue
            servers.setdefault(id(pool), (pool, []))[1].append(i)
        for pool, indices in servers.values():
            try:
                replies = self._pipeline(pool, [items[i][1] for i in indices])
            except rexc.RedisError as exc:
                if stale_slot_table(exc):
                    self._forget_slots()
                replies = [exc] * len(indices)
            for i, reply in zip(indices, replies, strict=True):
                out[i] = reply
        return out

    def _batch(self, items: Sequence[Routed], what: str) -> list[Any]:
        """Run commands that are safe to repeat, pipelined per server; replies in order."""
        out: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        started = time.monotonic()
        attempt: Attempt | None = None
        while todo:
            try:
                if self._single is not None:
                    groups = [(self._single, todo)]
                else:
                    groups = plan_batches(todo, lambda i: self._route(items[i][0], started))
                done: set[int] = set()
                try:
                    for pool, indices in groups:
                        replies = self._pipeline(pool, [items[i][1] for i in indices])
                        for i, reply in zip(indices, replies, strict=True):
                            out[i] = reply
                        done.update(indices)
                finally:
                    todo = [i for i in todo if i not in done]
                continue
            except rexc.RedisError as exc:
                if attempt is None:
                    # The pipeline as a whole: its commands are all safe to repeat.
                    attempt = self._policy.attempt(Call(-1, (), True, what), started)
                if stale_slot_table(exc):
                    self._forget_slots()
                pause = attempt.failed(exc, True)
                if attempt.asking is not None:
                    # ASK: a slot is migrating. Send the rest one by one; each follows its redirect.
                    for i in todo:
                        out[i] = self._run(Call(items[i][0], items[i][1], True, what))
                    return out
                time.sleep(pause)
        return out

    def _confirmed(self, conn: Any) -> Any:
        """A write's reply, once the command sent after it confirms it; else raise ``NotConfirmed``."""
        try:
            reply = conn.read_response()
        except rexc.RedisError:
            with contextlib.suppress(rexc.RedisError):
                conn.read_response()  # the confirmation's own reply: the connection stays in step
            raise
        problem = self._durability.verdict(_reply(conn))
        if problem is not None:
            raise problem
        return reply

    def _pipeline(self, pool: ConnectionPool, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write and read every reply; raise the first error reply.

        Scripts missing from the server's cache are loaded and the whole pipeline sent again
        (callers only pipeline commands that are safe to repeat). Writes that must be confirmed
        are followed by one confirming command for them all.
        """
        durability = self._durability
        confirm = durability.command if any(durability.waits(c) for c in commands) else None
        for _ in range(2):
            replies = _run_many(pool, commands if confirm is None else [*commands, confirm])
            ack = replies.pop() if confirm is not None else None
            missing = {
                c[1] for c, r in zip(commands, replies, strict=True) if isinstance(r, rexc.NoScriptError)
            }
            if missing:
                _run_many(pool, [("SCRIPT", "LOAD", self._policy.sources[sha]) for sha in missing])
                continue
            for reply in replies:
                if isinstance(reply, rexc.ResponseError):
                    raise reply
            problem = None if confirm is None else durability.verdict(ack)
            if problem is not None:
                raise problem
            return replies
        raise BackendError(f"Redis at {self.url} keeps forgetting the scripts just loaded")

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection; calling it twice is harmless."""
        with self._lock:
            self._closed = True
            self._ready = False
            pools = list(self._pools.values())
            if self._single is not None:
                pools.append(self._single)
        for pool in pools:
            pool.disconnect()


def _run_one(pool: ConnectionPool, command: tuple[Any, ...]) -> Any:
    conn: Any = pool.get_connection()
    try:
        conn.send_command(*command)
        return conn.read_response()
    finally:
        pool.release(conn)


def _reply(conn: Any) -> Any:
    """The next reply on ``conn``, or the redis-py error that stands for it."""
    try:
        return conn.read_response()
    except rexc.RedisError as exc:
        return exc


def _run_many(pool: ConnectionPool, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Pipeline commands on one connection; error replies come back as exception objects."""
    conn: Any = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except rexc.ResponseError as exc:
                replies.append(exc)
        return replies
    finally:
        pool.release(conn)
