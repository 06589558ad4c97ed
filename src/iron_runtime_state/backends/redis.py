"""The Redis store: ``redis://``, ``rediss://``, ``unix://`` and ``redis+cluster://``.

State is shared by every process and host that uses the same server and namespace. What this
module does not do itself is written once for it and for the asyncio backend
(``redis_async.py``): the data model, URLs and Lua scripts in :mod:`.redis_layout`, every
operation in :mod:`.redis_ops`, and what a failure means in :mod:`.redis_policy`. This module
only moves bytes: it routes each command to the server that holds its slot over plain
redis-py connection pools, runs it, and retries what the policy says is safe to retry.

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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..audit_chain import AuditChain, AuditRow
from ..errors import BackendError, MissingDependency, StateError
from ..ids import AgentId
from ..models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from .base import AuditQuery, Backend, CommitResult, SpendResult, UpdateFn
from .redis_layout import DEFAULT_NAMESPACE, RedisConfig, RedisLayout, Routed, parse_redis_url
from .redis_ops import Batch, Call, Emit, Op, Pause, RedisOps, Request
from .redis_policy import (
    UNREACHABLE,
    Attempt,
    Node,
    RetryPolicy,
    SlotDiscovery,
    plan_batches,
    rexc,
    stale_slot_table,
)

if TYPE_CHECKING:
    from .async_base import AsyncBackend

try:
    from redis.connection import (
        Connection,
        ConnectionPool,
        SSLConnection,
        UnixDomainSocketConnection,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingDependency(
        f"the Redis store needs the 'redis' extra: pip install 'iron-runtime-state[redis]' ({exc})"
    ) from exc

# hiredis (part of the extra) packs a command in C; redis-py wraps that in a slower loop.
_hiredis_pack: Callable[[tuple[Any, ...]], Any] | None
try:
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is in the 'redis' extra
    _hiredis_pack = None

__all__ = ["RedisBackend", "open_redis", "open_redis_async"]

_T = TypeVar("_T")
_CONNECTION_CLASSES: Final[dict[str, type[Connection] | type[UnixDomainSocketConnection]]] = {
    "tcp": Connection,
    "ssl": SSLConnection,
    "unix": UnixDomainSocketConnection,
}


class RedisBackend(Backend):
    """A store in Redis, standalone or Cluster; thread-safe and safe to share across processes.

    Build it with :func:`open_redis` (or ``StateManager.with_redis`` / ``from_url``).
    """

    schemes = ("redis", "rediss", "unix", "redis+cluster")
    driver_errors = (rexc.RedisError,)

    def __init__(self, config: RedisConfig) -> None:
        self._config = config
        self._layout = RedisLayout(config.namespace)
        self._ops = RedisOps(self._layout, config.timeout)
        self._policy = RetryPolicy(config)
        self._url = config.masked_url
        self._lock = threading.Lock()
        self._pools: dict[Node, ConnectionPool] = {}
        self._single: ConnectionPool | None = None
        self._table: Sequence[ConnectionPool | None] | None = None  # cluster: each slot's master
        if not config.cluster:
            self._single = self._new_pool(config.nodes[0] if config.nodes else None)
        self._ready = False  # the namespace's layout was checked; False again after close()
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def layout(self) -> RedisLayout:
        """The namespace's key layout (for tools and tests that read Redis directly)."""
        return self._layout

    def map_driver_error(self, exc: BaseException) -> StateError:
        """The library error for a redis-py exception that escaped the retry logic."""
        return self._policy.map_error(exc)

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
                op.close()  # lets the operation clean up (see redis_ops)
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
        if type(request) is Pause:
            time.sleep(request.seconds)
            return None
        raise TypeError(f"unexpected request {request!r:.80}")  # pragma: no cover - an Emit in an op

    def _prepare(self) -> None:
        """Check, once, that the namespace uses this version's key layout."""
        with self._lock:
            if self._closed:
                raise self._policy.closed_error()
        self._drive(self._ops.prepare(), check=False)
        self._ready = True

    def _run(self, call: Call) -> Any:
        """Run one command on the server of its slot; see the module docstring for retries."""
        started = time.monotonic()
        command = call.command
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
                    if asking is not None:
                        conn.send_packed_command(conn.pack_commands([("ASKING",), command]))
                        sent = True
                        conn.read_response()
                    elif _hiredis_pack is not None:
                        conn.send_packed_command((_hiredis_pack(command),))
                        sent = True
                    else:  # pragma: no cover - without hiredis
                        conn.send_command(*command)
                        sent = True
                    return conn.read_response()
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

    def _pipeline(self, pool: ConnectionPool, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write and read every reply; raise the first error reply.

        Scripts missing from the server's cache are loaded and the whole pipeline sent again
        (callers only pipeline commands that are safe to repeat).
        """
        for _ in range(2):
            replies = _run_many(pool, commands)
            missing = {
                c[1] for c, r in zip(commands, replies, strict=True) if isinstance(r, rexc.NoScriptError)
            }
            if missing:
                _run_many(pool, [("SCRIPT", "LOAD", self._policy.sources[sha]) for sha in missing])
                continue
            for reply in replies:
                if isinstance(reply, rexc.ResponseError):
                    raise reply
            return replies
        raise BackendError(f"Redis at {self._url} keeps forgetting the scripts just loaded")

    # -- agent states --------------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> None:
        self._drive(self._ops.save(state, now))

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        self._drive(self._ops.save_many(states, now))

    def get(self, agent_id: AgentId) -> AgentState | None:
        return self._drive(self._ops.get(agent_id))

    def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        return self._drive(self._ops.get_many(agent_ids))

    def remove(self, agent_id: AgentId) -> bool:
        return self._drive(self._ops.remove(agent_id))

    def list_ids(self) -> list[str]:
        return self._drive(self._ops.list_ids())

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        return self._iterate(self._ops.iter_states(status, batch_size))

    def stats(self) -> FleetStats:
        return self._drive(self._ops.stats())

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        return self._drive(self._ops.update(agent_id, fn, now))

    # -- atomic counters ------------------------------------------------------------------------

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        return self._drive(self._ops.record_spend(agent_id, amount, now))

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        return self._drive(self._ops.record_pii(agent_id, count, now))

    def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        return self._drive(self._ops.set_status(agent_id, status, now))

    # -- reservations -----------------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        return self._drive(self._ops.reserve(agent_id, amount, ttl, reservation_id))

    def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        return self._drive(self._ops.commit(reservation, actual, now))

    def release(self, reservation: Reservation, now: float) -> None:
        self._drive(self._ops.release(reservation))

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        return self._drive(self._ops.reserved(agent_id))

    # -- audit trail ------------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        return self._drive(self._ops.append_audit(events, chain))

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        return self._drive(self._ops.query_audit(query))

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        return self._iterate(self._ops.iter_audit_rows(after_seq, batch_size))

    def audit_anchor(self) -> tuple[int, str]:
        return self._drive(self._ops.read_head(anchor=True))

    def audit_head(self) -> tuple[int, str]:
        return self._drive(self._ops.read_head())

    def audit_count(self) -> int:
        return self._drive(self._ops.audit_count())

    def prune_audit(self, before: int) -> int:
        return self._drive(self._ops.prune_audit(before))

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        return self._drive(self._ops.purge_agents(statuses, changed_before))

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
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


def open_redis(url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> RedisBackend:
    """Build the Redis store for ``url`` (no connection is made until the first call).

    ``namespace`` prefixes every key (``?namespace=`` in the URL works too). ``options``:
    ``timeout`` (seconds a call may take in all, retries included; default 5),
    ``socket_timeout``, ``socket_connect_timeout``, ``username``, ``password``, ``db``,
    ``max_connections``, ``client_name``, ``ssl`` and the TLS options ``ssl_ca_certs``,
    ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_cert_reqs``,
    ``ssl_check_hostname``. An unknown option raises ``ConfigurationError`` naming them all.
    """
    return RedisBackend(parse_redis_url(url, namespace=namespace, **options))


def open_redis_async(url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> AsyncBackend:
    """The asyncio Redis store for ``url`` (``redis_async.AsyncRedisBackend``); the same options.

    The registry's ``async_factory`` for the Redis schemes. It lives here, where the registry
    points, and imports the asyncio backend only when called, so sync programs never load it.
    """
    from .redis_async import open_redis_async as factory

    return factory(url, namespace=namespace, **options)
