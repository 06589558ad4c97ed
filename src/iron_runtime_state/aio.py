"""``AsyncStateManager``: the asyncio form of :class:`~iron_runtime_state.StateManager`.

The same constructors and the same methods, with the same meaning, as coroutines; the two
iterators are async iterators and ``budget()`` is an async context manager::

    async with AsyncStateManager.from_url("sqlite:///state.db") as manager:
        await manager.record_spend(agent_id, 0.25)
        async with manager.budget(agent_id, 0.50) as hold:
            await hold.commit(await call_the_model())

Nothing here checks, builds or encodes anything by itself: validation, audit events, limits and
results are decided by :class:`~iron_runtime_state.core.ManagerCore`, which ``StateManager``
derives from too, and the store is an :class:`~iron_runtime_state.backends.async_base.AsyncBackend`.
This class awaits the store between those steps, and that is all it adds.

Cancellation: every store operation is atomic, so a cancelled call has either happened or not.
The calls that write an audit event besides their change (``record_spend`` and
``reserve_budget`` when refused, ``record_pii_detection``, ``set_status``,
``commit_reservation`` past the limit) are never cut between the two: if the caller is
cancelled mid-way it gets ``CancelledError`` at once, and the call finishes in the background
(``close()`` waits for it). A hold whose ``reserve_budget`` caller was cancelled that way is
released as soon as it is made: nobody holds the reservation to settle it.

Use one manager from one event loop. asyncio is imported on first use, so importing the package
stays cheap for sync programs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from decimal import Decimal
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

from ._aio_support import Completing, drain_in_thread
from .backends import Backend
from .backends.async_base import AsyncBackend, ThreadedAsyncBackend, open_async_backend
from .backends.memory import MemoryBackend
from .config import DEFAULT_NAMESPACE, DEFAULT_SCHEMA, env_config
from .core import (
    BATCH_SIZE,
    DEFAULT_TTL,
    PAGE_SIZE,
    VERIFY_BATCH,
    ManagerCore,
    StoreCall,
    VerifyRows,
    audit_key_bytes,
    available,
    check_timestamp,
    new_reservation_id,
)
from .cursors import AuditFeed, AuditPages
from .errors import StateTypeError
from .export import check_export_format, export_writer
from .holds import AsyncBudgetHold
from .ids import AgentId, coerce, key_of
from .ledger import SpendRow
from .metering import EventHook, metering_options
from .models import (
    AgentState,
    AgentStatus,
    AuditCheckpoint,
    AuditEvent,
    AuditRecord,
    AuditVerification,
    BudgetState,
    FleetStats,
    Reservation,
)
from .pricing import Price, PriceBook, Usage

if TYPE_CHECKING:
    pass

__all__ = ["AsyncBudgetHold", "AsyncStateManager"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T")


def _completes(
    method: Callable[Concatenate[AsyncStateManager, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[AsyncStateManager, _P], Coroutine[Any, Any, _R]]:
    """Run the operation to its end even if its caller is cancelled (see the module docstring)."""

    @functools.wraps(method)
    async def run(self: AsyncStateManager, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        operation = method(self, *args, **kwargs)
        if not self._backend.suspends:  # runs straight through: nothing can cut it
            return await operation
        return await self._complete(operation)

    return run


class AsyncStateManager(Completing, ManagerCore):
    """Live state of a fleet of agents, over any store, for asyncio programs.

    The asyncio twin of :class:`~iron_runtime_state.StateManager`: the same constructors and
    methods, as coroutines. ``AsyncStateManager()`` keeps everything in this process's memory
    (called directly, no thread); SQLite runs in a few worker threads, so the event loop never
    waits on the file; Redis is native (``redis.asyncio``, with automatic pipelining). Use it as
    ``async with`` or call :meth:`close`.
    """

    def __init__(
        self,
        backend: AsyncBackend | Backend | None = None,
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        prices: PriceBook | Mapping[str, Price | Mapping[str, Any]] | None = None,
        default_price: Price | Mapping[str, Any] | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        """Use ``backend`` (in-memory when ``None``); a sync ``Backend`` is served through
        :class:`~iron_runtime_state.backends.async_base.ThreadedAsyncBackend`. ``audit_key``
        makes the chain HMAC-keyed; ``clock``, ``prices``, ``default_price`` and ``on_event``
        are as for ``StateManager`` (``on_event`` is called on the event loop's thread)."""
        super().__init__(audit_key, clock, prices, default_price, on_event)
        if backend is None:
            backend = MemoryBackend()
        if isinstance(backend, Backend):
            backend = ThreadedAsyncBackend(backend)
        elif not isinstance(backend, AsyncBackend):
            raise StateTypeError(
                f"backend must be an AsyncBackend or a Backend, got {type(backend).__name__}"
            )
        self._backend: AsyncBackend = backend
        self._init_background()

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        max_threads: int | None = None,
        **options: Any,
    ) -> AsyncStateManager:
        """The manager for a store URL: ``memory://``, ``sqlite:///state.db``, ``redis://...``,
        ``postgresql://...``.

        ``options`` go to the backend. ``max_threads`` bounds the worker threads of a store
        served through threads (SQLite; default
        :data:`~iron_runtime_state.backends.async_base.DEFAULT_THREADS`).
        """
        key = audit_key_bytes(audit_key)  # a bad key fails before anything is opened
        mine, options = metering_options(options)
        store = open_async_backend(url, max_threads=max_threads, **options)
        return cls(store, audit_key=key, clock=clock, **mine)

    @classmethod
    def with_sqlite(
        cls,
        path: str | os.PathLike[str],
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        max_threads: int | None = None,
        **options: Any,
    ) -> AsyncStateManager:
        """A manager over one SQLite file (created if missing); calls run in worker threads.

        ``options`` go to :class:`~iron_runtime_state.backends.sqlite.SQLiteBackend`.
        """
        from .backends.sqlite import SQLiteBackend

        key = audit_key_bytes(audit_key)
        mine, options = metering_options(options)
        store = ThreadedAsyncBackend(SQLiteBackend(path, **options), max_threads=max_threads)
        return cls(store, audit_key=key, clock=clock, **mine)

    @classmethod
    def with_redis(
        cls,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = DEFAULT_NAMESPACE,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> AsyncStateManager:
        """A manager over Redis: state shared by every process and host using the same namespace.

        Needs the ``redis`` extra. The native asyncio backend, on ``redis.asyncio``, with the
        sync backend's keys and Lua scripts; ``options`` are those of ``StateManager.with_redis``.
        """
        from .backends.redis import open_redis_async

        key = audit_key_bytes(audit_key)
        mine, options = metering_options(options)
        return cls(open_redis_async(url, namespace=namespace, **options), audit_key=key, clock=clock, **mine)

    @classmethod
    def with_postgres(
        cls,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> AsyncStateManager:
        """A manager over PostgreSQL on psycopg's native asyncio connections; see
        :meth:`iron_runtime_state.StateManager.with_postgres`."""
        from .backends.postgres import open_async_postgres

        key = audit_key_bytes(audit_key)
        mine, options = metering_options(options)
        return cls(open_async_postgres(url, schema=schema, **options), audit_key=key, clock=clock, **mine)

    @classmethod
    def from_env(cls, **options: Any) -> AsyncStateManager:
        """``from_url($IRON_STATE_URL)`` (``memory://`` when unset).

        ``$IRON_STATE_AUDIT_KEY``, when set, is the HMAC key of the audit chain.
        """
        url, key = env_config()
        return cls.from_url(url, audit_key=key, **options)

    @property
    def backend(self) -> AsyncBackend:
        """The store this manager delegates to."""
        return self._backend

    @property
    def url(self) -> str:
        """The store's URL, password masked."""
        return self._backend.url

    # -- the seed's operations -------------------------------------------------------------------

    async def save_agent_state(self, state: AgentState) -> None:
        """Insert or replace the agent's state; an invalid state raises and stores nothing."""
        await self._backend.call("save", *self._save_request(state))

    async def get_agent_state(self, agent_id: str | AgentId) -> AgentState | None:
        """An independent copy of the agent's state; ``None`` if absent or not a valid id."""
        key = key_of(agent_id)
        return None if key is None else self._view(await self._backend.call("get", key))

    async def list_agents(self) -> list[str]:
        """Every stored agent's canonical id, in no promised order."""
        return await self._backend.call("list_ids")  # type: ignore[no-any-return]

    async def save_audit_log(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` to the audit trail (and log it at DEBUG); returns the stored record."""
        return (await self._append(self._events_request((event,))))[0]

    # -- beyond the seed -------------------------------------------------------------------------

    async def save_audit_logs(
        self, events: Iterable[AuditEvent], *, ledger: bool = False
    ) -> list[AuditRecord]:
        """Append many events in one atomic batch: all of them are stored, or none.

        ``spend`` and ``budget_threshold`` records are the store's own, written with each
        charge; ``ledger=True`` appends them too, to carry a trail to another store
        (``iron-state copy``): the copied ``spend`` records count in its reports.
        """
        return await self._append(self._events_request(events, ledger))

    async def save_agent_states(self, states: Iterable[AgentState]) -> int:
        """Insert or replace many states in batches; all are validated before any is stored."""
        batches, now = self._states_request(states)
        for batch in batches:
            await self._backend.call("save_many", batch, now)
        return sum(map(len, batches))

    async def get_agent_states(self, agent_ids: Iterable[str | AgentId]) -> list[AgentState | None]:
        """The states of many agents in one batched read, in order; ``None`` where absent or invalid."""
        wanted, keys = self._ids_request(agent_ids)
        found = await self._backend.call("get_many", keys) if keys else []
        return [self._view(state) for state in self._found(wanted, found)]

    async def remove_agent_state(self, agent_id: str | AgentId) -> bool:
        """Remove the agent (and its open reservations); ``True`` when something was removed."""
        return await self._backend.call("remove", coerce(agent_id))  # type: ignore[no-any-return]

    async def update_agent_state(
        self, agent_id: str | AgentId, fn: Callable[[AgentState], AgentState]
    ) -> AgentState:
        """Atomic read-modify-write: ``fn`` gets a copy and returns the new state.

        ``fn`` is a plain (not ``async``) function; it may run more than once, in a worker
        thread (SQLite) or on the event loop (Redis), so it must be pure and quick. Raises
        ``AgentNotFound`` when the agent has no state.
        """
        if inspect.iscoroutinefunction(fn):
            raise StateTypeError("the update function must be a plain function, not async def")
        aid, apply, now = self._update_request(agent_id, fn)
        return self._changed(await self._backend.call("update", aid, apply, now, self._chain))

    async def iter_agent_states(
        self,
        *,
        status: AgentStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> AsyncIterator[AgentState]:
        """Every state, or those with ``status`` and every label in ``labels``, fetched
        ``batch_size`` at a time: ``async for``."""
        request = self._iteration_request(status, labels, batch_size)
        async for state in self._backend.stream("iter_states", *request):
            yield self._view(state)

    async def page_agent_states(
        self,
        *,
        status: AgentStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        order_by: str = "agent_id",
        descending: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> list[AgentState]:
        """One sorted page of agents; see :meth:`iron_runtime_state.StateManager.page_agent_states`."""
        page = self._page_request(status, labels, order_by, descending, offset, limit)
        return [self._view(state) for state in await self._backend.call("page_agents", page)]

    async def stats(self) -> FleetStats:
        """Fleet totals, kept up to date by every change (no agent is read)."""
        return await self._backend.call("stats")  # type: ignore[no-any-return]

    async def audit_log(
        self,
        *,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Audit records in ``seq`` order; ``since``/``until`` bound the timestamp (inclusive)."""
        query = self._audit_query(agent_id, event_type, since, until, after_seq, limit)
        return await self._backend.call("query_audit", query)  # type: ignore[no-any-return]

    async def audit_count(self) -> int:
        """How many records the audit trail holds."""
        return await self._backend.call("audit_count")  # type: ignore[no-any-return]

    @_completes
    async def record_spend(
        self,
        agent_id: str | AgentId,
        amount: float | int | Decimal | str,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Atomically add ``amount`` (> 0) to the agent's spend and to each of its budget scopes.

        See :meth:`iron_runtime_state.StateManager.record_spend`.
        """
        request = self._spend_request(agent_id, amount)
        note = self._note(None, tags)
        result = await self._backend.call("record_spend", *request, self._chain, note)
        return self._spent(request, result)

    @_completes
    async def record_usage(
        self,
        agent_id: str | AgentId,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Price a model call that already happened and record it as a spend; see
        :meth:`iron_runtime_state.StateManager.record_usage`."""
        aid, micros, now, note = self._usage_request(
            agent_id, model, input_tokens, output_tokens, cached_input_tokens, tags
        )
        result = await self._backend.call("record_spend", aid, micros, now, self._chain, note)
        return self._spent((aid, micros, now), result)

    @_completes
    async def record_pii_detection(
        self, agent_id: str | AgentId, count: int = 1, *, details: str = ""
    ) -> AgentState:
        """Atomically add ``count`` (>= 1) PII detections and write a ``pii_detected`` event."""
        aid, n, now, event = self._pii_request(agent_id, count, details)
        return self._changed(await self._backend.call("record_pii", aid, n, now, event, self._chain))

    @_completes
    async def set_status(self, agent_id: str | AgentId, status: AgentStatus | str) -> AgentState:
        """Atomically change the status; a real change writes a ``status_changed`` event."""
        request = self._status_request(agent_id, status)
        return self._changed(await self._backend.call("set_status", *request, self._chain))

    # -- reservations ----------------------------------------------------------------------------

    @_completes
    async def reserve_budget(
        self, agent_id: str | AgentId, amount: float | int | Decimal | str, *, ttl: float = DEFAULT_TTL
    ) -> Reservation:
        """Hold ``amount`` of the agent's budget (and its scopes') before a call whose cost is known
        only after.

        See :meth:`iron_runtime_state.StateManager.reserve_budget`.
        """
        request = self._spend_request(agent_id, amount)
        aid, value, now = request
        result = await self._backend.call(
            "reserve", aid, value, self._ttl(ttl), now, new_reservation_id(), self._chain
        )
        return self._reserved(request, result)

    @_completes
    async def commit_reservation(
        self,
        reservation: Reservation,
        actual: float | int | Decimal | str | None = None,
        *,
        usage: Usage | Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Record what the call really cost (an amount, or ``usage`` the manager prices) and free
        the hold, atomically.

        See :meth:`iron_runtime_state.StateManager.commit_reservation`.
        """
        held, now = self._release_request(reservation)
        micros, note = self._settle_request(actual, usage, None, tags)
        return self._changed(await self._backend.call("commit", held, micros, now, self._chain, note))

    async def release_reservation(self, reservation: Reservation) -> None:
        """Free the hold without spending; ``ReservationError`` if it is not open."""
        await self._backend.call("release", *self._release_request(reservation))

    async def budget_available(self, agent_id: str | AgentId) -> float:
        """What can still be reserved: the least ``limit - spent - open holds`` of the agent and
        its budget scopes (``inf`` without any limit)."""
        now = self._now()
        state, held = await self._backend.call("reserved", coerce(agent_id), now)
        scopes = [await self._backend.call("get_budget", scope, now) for scope in state.budget_scopes]
        return available(
            self._view(state), held, [self._budget(row, now) for row in scopes if row is not None]
        )

    # -- budget scopes -------------------------------------------------------------------------

    @_completes
    async def set_budget(
        self,
        scope: str,
        *,
        limit: float | int | Decimal | str | None,
        period: str | None = None,
        tz: str = "UTC",
        thresholds: Sequence[float] | None = None,
    ) -> BudgetState:
        """Create or change a budget scope; see :meth:`iron_runtime_state.StateManager.set_budget`."""
        request, alerts = self._budget_request(scope, limit, period, tz, thresholds)
        change = await self._backend.call("set_budget", *request, self._chain, alerts)
        return self._budget_set(change, request[-1])

    async def get_budget(self, scope: str) -> BudgetState | None:
        """The scope's limit, period, current period's start, spend, holds and what is available."""
        name, now = self._scope_request(scope)
        row = await self._backend.call("get_budget", name, now)
        return None if row is None else self._budget(row, now)

    async def list_budgets(self) -> list[BudgetState]:
        """Every budget scope, sorted by name."""
        now = self._now()
        return [self._budget(row, now) for row in await self._backend.call("list_budgets", now)]

    @_completes
    async def remove_budget(self, scope: str) -> bool:
        """Remove the scope; see :meth:`iron_runtime_state.StateManager.remove_budget`."""
        name, now = self._scope_request(scope)
        return self._budget_removed(await self._backend.call("remove_budget", name, now, self._chain))

    @contextlib.asynccontextmanager
    async def budget(
        self, agent_id: str | AgentId, estimate: float | int | Decimal | str, *, ttl: float = DEFAULT_TTL
    ) -> AsyncIterator[AsyncBudgetHold]:
        """A hold as an async context manager::

            async with manager.budget(agent_id, 0.50) as hold:
                cost = await call_the_model()
                await hold.commit(cost)

        The hold is taken on entering (``BudgetExceeded`` there), and released if the block
        raises (cancellation included) or ends without ``commit``.
        """
        hold = AsyncBudgetHold(self, await self.reserve_budget(agent_id, estimate, ttl=ttl))
        async with hold:
            yield hold

    # -- metering model calls ----------------------------------------------------------------------

    async def reserve_for_call(
        self,
        agent_id: str | AgentId,
        *,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        ttl: float = DEFAULT_TTL,
        tags: Mapping[str, str] | None = None,
    ) -> AsyncBudgetHold:
        """Hold the worst case of a model call before it is made; ``BudgetExceeded`` when it would
        pass a limit. Use the hold as ``async with`` and settle it with ``commit_usage``; see
        :meth:`iron_runtime_state.StateManager.reserve_for_call`."""
        reservation = await self._reserve_call(agent_id, model, input_tokens, max_output_tokens, ttl)
        return AsyncBudgetHold(self, reservation, model=model, tags=tags)

    @_completes
    async def _reserve_call(
        self, agent_id: str | AgentId, model: str, input_tokens: int, max_output_tokens: int, ttl: float
    ) -> Reservation:
        request = self._call_request(agent_id, model, input_tokens, max_output_tokens)
        aid, value, now = request
        result = await self._backend.call(
            "reserve", aid, value, self._ttl(ttl), now, new_reservation_id(), self._chain
        )
        return self._reserved(request, result)

    async def spend_report(
        self,
        *,
        since: object = None,
        until: object = None,
        group_by: Sequence[str] | str = ("day",),
        tz: str = "UTC",
        agent_id: str | AgentId | None = None,
        scope: str | None = None,
        model: str | None = None,
        labels: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[SpendRow]:
        """Totals of the spend ledger per group; see :meth:`iron_runtime_state.StateManager.spend_report`."""
        request = self._report_request(since, until, group_by, tz, agent_id, scope, model, labels, tags)
        return self._report(await self._backend.call("spend_totals", request[0]), request)

    # -- the audit trail's integrity, export and retention -----------------------------------------

    async def verify_audit_log(self, *, since_checkpoint: AuditCheckpoint | None = None) -> AuditVerification:
        """Check the whole audit trail; see :meth:`iron_runtime_state.StateManager.verify_audit_log`.

        The hashing runs in a worker thread while the loop reads the trail batch by batch.
        """
        return await self._drive(self._verify_steps(self._checkpoint_request(since_checkpoint)))

    async def audit_checkpoint(self) -> AuditCheckpoint:
        """A witness of the trail's head now; see :meth:`iron_runtime_state.StateManager.audit_checkpoint`."""
        return self._checkpoint(await self._backend.call("audit_marks"))

    def iter_audit_log(
        self,
        *,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[AuditRecord]:
        """Like :meth:`audit_log`, but streamed page by page: ``async for``."""
        query = self._audit_query(agent_id, event_type, since, until, after_seq, limit)
        return self._read_pages(self._pages(query, page_size))

    def watch(
        self,
        *,
        after_seq: int | None = None,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[AuditRecord]:
        """Audit records as they are appended, in ``seq`` order: ``async for``.

        See :meth:`iron_runtime_state.StateManager.watch`.
        """
        return self._follow(self._feed(after_seq, agent_id, event_type, idle_timeout))

    async def _follow(self, feed: AuditFeed) -> AsyncIterator[AuditRecord]:
        """Run a feed (arguments already checked, so a bad one fails at the call)."""
        call = self._backend.call
        if feed.last is None:
            feed.last = (await call("audit_marks")).head[0]
        while True:
            head = (await call("audit_marks")).head[0]
            page = await call("query_audit", feed.next_query())
            for record in page:
                yield record
            feed.advance(page, head)
            if feed.behind:
                continue
            wait = feed.wait()
            if wait is None:
                return
            await call("wait_audit", feed.last, wait)

    async def export_audit_log(
        self,
        file: str | os.PathLike[str] | IO[str],
        *,
        format: Literal["jsonl", "csv"] = "jsonl",
        **filters: Any,
    ) -> int:
        """Stream the audit trail (or the part ``filters`` select) to a path or text file.

        Pages are read on the event loop and written by a worker thread, so neither the store
        nor the file blocks the loop. Returns the record count.
        """
        write = export_writer(file, check_export_format(format))
        return await drain_in_thread(self.iter_audit_log(**filters), write)

    async def prune_audit_log(self, *, before: int) -> int:
        """Remove the oldest records with a timestamp before ``before``; the rest still verifies."""
        return await self._backend.call("prune_audit", check_timestamp(before, "before"), self._chain)  # type: ignore[no-any-return]

    async def purge_agents(
        self,
        *,
        older_than: float,
        status: AgentStatus | str | Iterable[AgentStatus | str] = (
            AgentStatus.STOPPED,
            AgentStatus.FAILED,
        ),
    ) -> list[str]:
        """Remove agents with ``status`` whose state has not changed for ``older_than`` seconds."""
        return await self._backend.call("purge_agents", *self._purge_request(status, older_than))  # type: ignore[no-any-return]

    # -- lifecycle --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the calls left running by cancelled callers, then release the store and threads."""
        import asyncio

        while True:  # a call finishing in the background may start one more (a release)
            with self._background_lock:
                pending = list(self._background)
            if not pending:
                break
            await asyncio.wait(pending)
        await self._backend.close()

    async def __aenter__(self) -> AsyncStateManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncStateManager({self.url!r})"

    # -- running the core's outcomes and steps ---------------------------------------------------

    async def _append(self, events: list[AuditEvent] | tuple[AuditEvent, ...]) -> list[AuditRecord]:
        if not events:
            return []
        records: list[AuditRecord] = await self._backend.call("append_audit", events, self._chain)
        self._emit(records)
        return records

    async def _drive(self, steps: Generator[StoreCall | VerifyRows, Any, _T]) -> _T:
        """Run a multi-call operation of the core to its end; the hashing in a worker thread."""
        reply: Any = None
        try:
            while True:
                step = steps.send(reply)
                if isinstance(step, VerifyRows):
                    rows = self._backend.stream("iter_audit_rows", step.after_seq, VERIFY_BATCH)
                    reply = await drain_in_thread(rows, step.verifier.feed)
                else:
                    reply = await self._backend.call(step.name, *step.args)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _read_pages(self, pages: AuditPages) -> AsyncIterator[AuditRecord]:
        while (next_query := pages.next_query()) is not None:
            page = await self._backend.call("query_audit", next_query)
            for record in page:
                yield record
            pages.advance(page)
