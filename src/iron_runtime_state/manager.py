"""``StateManager``: the object users hold.

Each method checks its arguments, makes one call to the store, and settles the outcome; the
checks, the audit events an operation writes and what it returns are decided once, in
:class:`~iron_runtime_state.core.ManagerCore`, which the asyncio manager shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

from .backends import Backend, open_backend
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
    available,
    check_timestamp,
    new_reservation_id,
)
from .cursors import AuditFeed, AuditPages
from .errors import StateTypeError
from .export import check_export_format, export_writer
from .holds import BudgetHold
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

__all__ = ["BudgetHold", "StateManager"]

_T = TypeVar("_T")


class StateManager(ManagerCore):
    """Live state of a fleet of agents, over any store.

    ``StateManager()`` keeps everything in this process's memory; :meth:`from_url` picks any
    store by URL. The manager is thread-safe and a context manager; :meth:`close` releases the
    store's connections and files.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        prices: PriceBook | Mapping[str, Price | Mapping[str, Any]] | None = None,
        default_price: Price | Mapping[str, Any] | None = None,
        on_event: EventHook | None = None,
    ):
        """Use ``backend`` (in-memory when ``None``); ``audit_key`` makes the chain HMAC-keyed.

        ``clock`` (Unix seconds, ``time.time`` by default) is the time budget periods and audit
        events are read with: tests pass one to cross a period boundary. ``prices`` maps model
        names to prices per million tokens (``{"my-model": {"input": 0.5, "output": 1.5}}``),
        over the genai-prices catalogue when the ``prices`` extra is installed;
        ``default_price`` prices any other model (see :mod:`iron_runtime_state.pricing`).
        ``on_event`` is called with every audit record this manager's operations append
        (``spend``, ``budget_threshold``, ...), in the calling thread, after the change is
        stored: keep it quick; an exception it raises is logged, not raised.
        """
        if backend is not None and not isinstance(backend, Backend):
            raise StateTypeError(f"backend must be a Backend, got {type(backend).__name__}")
        super().__init__(audit_key, clock, prices, default_price, on_event)
        self._backend: Backend = backend if backend is not None else MemoryBackend()

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> StateManager:
        """The manager for a store URL: ``memory://``, ``sqlite:///state.db``, ``redis://...``,
        ``postgresql://...``.

        ``options`` go to the backend (see the README for each backend's options).
        """
        mine, options = metering_options(options)
        return cls(open_backend(url, **options), audit_key=audit_key, clock=clock, **mine)

    @classmethod
    def with_sqlite(
        cls,
        path: str | os.PathLike[str],
        *,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> StateManager:
        """A manager over one SQLite file (created if missing); state and audit trail persist.

        ``options`` go to :class:`~iron_runtime_state.backends.sqlite.SQLiteBackend`.
        """
        from .backends.sqlite import SQLiteBackend

        mine, options = metering_options(options)
        return cls(SQLiteBackend(path, **options), audit_key=audit_key, clock=clock, **mine)

    @classmethod
    def with_redis(
        cls,
        url: str = "redis://localhost:6379/0",
        *,
        namespace: str = DEFAULT_NAMESPACE,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> StateManager:
        """A manager over Redis: state shared by every process and host using the same namespace.

        Needs the ``redis`` extra. ``options`` go to the Redis backend.
        """
        from .backends.redis import open_redis

        mine, options = metering_options(options)
        return cls(open_redis(url, namespace=namespace, **options), audit_key=audit_key, clock=clock, **mine)

    @classmethod
    def with_postgres(
        cls,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        audit_key: bytes | str | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> StateManager:
        """A manager over PostgreSQL (``postgresql://user:password@host:5432/db``), in ``schema``.

        Needs the ``postgres`` extra. ``options`` go to the PostgreSQL backend (see docs/postgres.md).
        """
        from .backends.postgres import open_postgres

        mine, options = metering_options(options)
        return cls(open_postgres(url, schema=schema, **options), audit_key=audit_key, clock=clock, **mine)

    @classmethod
    def from_env(cls, **options: Any) -> StateManager:
        """``from_url($IRON_STATE_URL)`` (``memory://`` when unset).

        ``$IRON_STATE_AUDIT_KEY``, when set, is the HMAC key of the audit chain.
        """
        url, key = env_config()
        return cls.from_url(url, audit_key=key, **options)

    @property
    def backend(self) -> Backend:
        """The store this manager delegates to."""
        return self._backend

    @property
    def url(self) -> str:
        """The store's URL, password masked."""
        return self._backend.url

    # -- the seed's operations -------------------------------------------------------------------

    def save_agent_state(self, state: AgentState) -> None:
        """Insert or replace the agent's state; an invalid state raises and stores nothing."""
        self._backend.save(*self._save_request(state))

    def get_agent_state(self, agent_id: str | AgentId) -> AgentState | None:
        """An independent copy of the agent's state; ``None`` if absent or not a valid id."""
        key = key_of(agent_id)
        return None if key is None else self._view(self._backend.get(key))

    def list_agents(self) -> list[str]:
        """Every stored agent's canonical id, in no promised order."""
        return self._backend.list_ids()

    def save_audit_log(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` to the audit trail (and log it at DEBUG); returns the stored record."""
        return self._append(self._events_request((event,)))[0]

    # -- beyond the seed -------------------------------------------------------------------------

    def save_audit_logs(self, events: Iterable[AuditEvent], *, ledger: bool = False) -> list[AuditRecord]:
        """Append many events in one atomic batch: all of them are stored, or none.

        ``spend`` and ``budget_threshold`` records are the store's own, written with each
        charge; ``ledger=True`` appends them too, to carry a trail to another store
        (``iron-state copy``): the copied ``spend`` records count in its reports.
        """
        return self._append(self._events_request(events, ledger))

    def save_agent_states(self, states: Iterable[AgentState]) -> int:
        """Insert or replace many states in batches; all are validated before any is stored.

        Returns how many were saved. Used for imports and ``iron-state copy``.
        """
        batches, now = self._states_request(states)
        for batch in batches:
            self._backend.save_many(batch, now)
        return sum(map(len, batches))

    def get_agent_states(self, agent_ids: Iterable[str | AgentId]) -> list[AgentState | None]:
        """The states of many agents in one batched read, in order; ``None`` where absent or invalid."""
        wanted, keys = self._ids_request(agent_ids)
        return [self._view(s) for s in self._found(wanted, self._backend.get_many(keys) if keys else [])]

    def remove_agent_state(self, agent_id: str | AgentId) -> bool:
        """Remove the agent (and its open reservations); ``True`` when something was removed."""
        return self._backend.remove(coerce(agent_id))

    def update_agent_state(
        self, agent_id: str | AgentId, fn: Callable[[AgentState], AgentState]
    ) -> AgentState:
        """Atomic read-modify-write: ``fn`` gets a copy and returns the new state.

        No concurrent update is lost. ``fn`` may run more than once, so it must be pure (and must
        not call this manager). Raises ``AgentNotFound`` when the agent has no state.
        """
        aid, apply, now = self._update_request(agent_id, fn)
        return self._changed(self._backend.update(aid, apply, now, self._chain))

    def iter_agent_states(
        self,
        *,
        status: AgentStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> Iterator[AgentState]:
        """Every state, or those with ``status`` and every label in ``labels``, ``batch_size`` at a time."""
        for state in self._backend.iter_states(*self._iteration_request(status, labels, batch_size)):
            yield self._view(state)

    def page_agent_states(
        self,
        *,
        status: AgentStatus | str | None = None,
        labels: Mapping[str, str] | None = None,
        order_by: str = "agent_id",
        descending: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> list[AgentState]:
        """One page of agents, filtered by ``status`` and ``labels`` and sorted by ``order_by``
        (``agent_id``, ``status``, ``budget_spent`` or ``pii_detections``; ties by id).

        For tables that page through a large fleet; stores answer from their indexes where
        they keep them. ``limit`` is at most 1,000.
        """
        page = self._page_request(status, labels, order_by, descending, offset, limit)
        return [self._view(state) for state in self._backend.page_agents(page)]

    def stats(self) -> FleetStats:
        """Fleet totals, kept up to date by every change (no agent is read)."""
        return self._backend.stats()

    def audit_log(
        self,
        *,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Audit records in ``seq`` order; ``since``/``until`` bound the timestamp (inclusive).

        Page with ``after_seq`` (the last ``seq`` you saw) and ``limit``.
        """
        query = self._audit_query(agent_id, event_type, since, until, after_seq, limit)
        return self._backend.query_audit(query)

    def audit_count(self) -> int:
        """How many records the audit trail holds."""
        return self._backend.audit_count()

    def record_spend(
        self,
        agent_id: str | AgentId,
        amount: float | int | Decimal | str,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Atomically add ``amount`` (> 0) to the agent's spend and to each of its budget scopes.

        All or nothing: if ``spent + open holds + amount`` would pass the limit of the agent or of
        any scope it draws on, nothing is charged anywhere, a ``budget_exceeded`` event is
        written and :class:`BudgetExceeded` (naming the ``scope``) is raised. A budget whose
        period ended starts its new one first (``budget_reset``). Raises ``AgentNotRunning`` for
        an agent that is stopped or failed, ``BudgetNotFound`` for a scope that does not exist.
        Amounts are kept to the micro-unit (0.000001). The spend is written to the ledger as a
        ``spend`` audit record (with ``tags``) in the same atomic step, and a threshold it
        crosses writes ``budget_threshold``.
        """
        request = self._spend_request(agent_id, amount)
        note = self._note(None, tags)
        return self._spent(request, self._backend.record_spend(*request, self._chain, note))

    def record_usage(
        self,
        agent_id: str | AgentId,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Price a model call that already happened (:meth:`cost`) and record it as a spend, with
        the model and token counts in its ledger record. Refused like :meth:`record_spend`
        (:class:`BudgetExceeded`) when it would pass a limit; :class:`PricingError` for a model
        without a price."""
        aid, micros, now, note = self._usage_request(
            agent_id, model, input_tokens, output_tokens, cached_input_tokens, tags
        )
        request = (aid, micros, now)
        return self._spent(request, self._backend.record_spend(aid, micros, now, self._chain, note))

    def record_pii_detection(
        self, agent_id: str | AgentId, count: int = 1, *, details: str = ""
    ) -> AgentState:
        """Atomically add ``count`` (>= 1) PII detections and write a ``pii_detected`` event."""
        aid, n, now, event = self._pii_request(agent_id, count, details)
        return self._changed(self._backend.record_pii(aid, n, now, event, self._chain))

    def set_status(self, agent_id: str | AgentId, status: AgentStatus | str) -> AgentState:
        """Atomically change the status; a real change writes a ``status_changed`` event."""
        request = self._status_request(agent_id, status)
        return self._changed(self._backend.set_status(*request, self._chain))

    # -- reservations ----------------------------------------------------------------------------

    def reserve_budget(
        self, agent_id: str | AgentId, amount: float | int | Decimal | str, *, ttl: float = DEFAULT_TTL
    ) -> Reservation:
        """Hold ``amount`` of the agent's budget, and of each of its scopes, before a call whose
        cost is known only after.

        Admitted only if ``spent + open holds + amount <= limit`` for the agent and every scope,
        atomically; otherwise a ``budget_exceeded`` event and :class:`BudgetExceeded`. Settle it with
        :meth:`commit_reservation` or :meth:`release_reservation`; after ``ttl`` seconds the
        store releases it by itself, even if this process died.
        """
        request = self._spend_request(agent_id, amount)
        aid, value, now = request
        result = self._backend.reserve(aid, value, self._ttl(ttl), now, new_reservation_id(), self._chain)
        return self._reserved(request, result)

    def commit_reservation(
        self,
        reservation: Reservation,
        actual: float | int | Decimal | str | None = None,
        *,
        usage: Usage | Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AgentState:
        """Record what the call really cost (on the agent and the hold's scopes) and free the hold,
        atomically.

        Give the amount, or the call's ``usage`` (a :class:`~iron_runtime_state.pricing.Usage`
        or a mapping with ``model``, ``input_tokens``, ``output_tokens`` and optionally
        ``cached_input_tokens``), which the manager prices. The spend is recorded even if it
        passes the limit (it was spent); then a ``budget_exceeded`` event is written. The
        ledger's ``spend`` record carries the usage and ``tags``. Committing a hold that is not
        open raises :class:`ReservationError` and charges nothing.
        """
        held, now = self._release_request(reservation)
        micros, note = self._settle_request(actual, usage, None, tags)
        return self._changed(self._backend.commit(held, micros, now, self._chain, note))

    def release_reservation(self, reservation: Reservation) -> None:
        """Free the hold without spending; :class:`ReservationError` if it is not open."""
        self._backend.release(*self._release_request(reservation))

    def budget_available(self, agent_id: str | AgentId) -> float:
        """What can still be reserved: the least ``limit - spent - open holds`` of the agent and
        its budget scopes (``inf`` without any limit)."""
        now = self._now()
        state, held = self._backend.reserved(coerce(agent_id), now)
        scopes = [self._backend.get_budget(scope, now) for scope in state.budget_scopes]
        state = self._view(state)
        return available(state, held, [self._budget(row, now) for row in scopes if row is not None])

    # -- budget scopes -------------------------------------------------------------------------

    def set_budget(
        self,
        scope: str,
        *,
        limit: float | int | Decimal | str | None,
        period: str | None = None,
        tz: str = "UTC",
        thresholds: Sequence[float] | None = None,
    ) -> BudgetState:
        """Create or change the budget scope ``scope`` (``"team:support"``, ``"org:acme"``).

        Agents draw on it by listing it in ``AgentState.budget_scopes``. ``limit=None`` tracks
        spend without a limit. With a ``period`` (``"day"``, ``"week"`` or ``"month"``, calendar
        aligned in ``tz``; weeks start on Monday) its spend starts from zero at each boundary.
        A changed scope keeps its spend and holds. ``thresholds`` are the shares of the limit
        whose first crossing in a period writes a ``budget_threshold`` event (default
        ``(0.5, 0.8, 1.0)``; ``()`` for none). Writes a ``budget_set`` event.
        """
        request, alerts = self._budget_request(scope, limit, period, tz, thresholds)
        change = self._backend.set_budget(*request, self._chain, alerts)
        return self._budget_set(change, request[-1])

    def get_budget(self, scope: str) -> BudgetState | None:
        """The scope's limit, period, current period's start, spend, holds and what is available."""
        name, now = self._scope_request(scope)
        row = self._backend.get_budget(name, now)
        return None if row is None else self._budget(row, now)

    def list_budgets(self) -> list[BudgetState]:
        """Every budget scope, sorted by name."""
        now = self._now()
        return [self._budget(row, now) for row in self._backend.list_budgets(now)]

    def remove_budget(self, scope: str) -> bool:
        """Remove the scope (its open holds with it); ``True`` when there was one.

        Agents that still list it get ``BudgetNotFound`` when they spend, until the scope is set
        again or they stop listing it. Writes a ``budget_removed`` event.
        """
        name, now = self._scope_request(scope)
        return self._budget_removed(self._backend.remove_budget(name, now, self._chain))

    def budget(
        self, agent_id: str | AgentId, estimate: float | int | Decimal | str, *, ttl: float = DEFAULT_TTL
    ) -> BudgetHold:
        """A hold as a context manager::

            with manager.budget(agent_id, 0.50) as hold:
                cost = call_the_model()
                hold.commit(cost)

        The hold is released if the block raises, or ends without ``commit``.
        """
        return BudgetHold(self, self.reserve_budget(agent_id, estimate, ttl=ttl))

    # -- metering model calls ----------------------------------------------------------------------

    def reserve_for_call(
        self,
        agent_id: str | AgentId,
        *,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        ttl: float = DEFAULT_TTL,
        tags: Mapping[str, str] | None = None,
    ) -> BudgetHold:
        """Hold the worst case of a model call before it is made: ``input_tokens`` and
        ``max_output_tokens`` at ``model``'s price. Raises :class:`BudgetExceeded` (nothing is
        held) when it would pass a limit, so the call is never sent::

            with manager.reserve_for_call(agent, model="gpt-4o", input_tokens=900,
                                          max_output_tokens=500) as hold:
                reply = call_the_model()
                hold.commit_usage(input_tokens=..., output_tokens=...)

        The hold is released if the block raises or ends without a commit.
        """
        request = self._call_request(agent_id, model, input_tokens, max_output_tokens)
        aid, value, now = request
        result = self._backend.reserve(aid, value, self._ttl(ttl), now, new_reservation_id(), self._chain)
        return BudgetHold(self, self._reserved(request, result), model=model, tags=tags)

    def spend_report(
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
        """Totals of the spend ledger (amount, calls, tokens) per group, sorted by group.

        ``group_by`` holds up to one time key (``"hour"``, ``"day"``, ``"week"``, ``"month"``,
        in ``tz``) and any of ``"agent"``, ``"scope"`` (a spend counts under each scope it
        charged), ``"model"``, ``"label:<key>"`` (the agent's label when it spent) and
        ``"tag:<key>"``. ``since`` (inclusive) and ``until`` (exclusive) are datetimes, dates
        (midnight in ``tz``), ISO 8601 texts or Unix seconds. The other arguments filter.
        """
        request = self._report_request(since, until, group_by, tz, agent_id, scope, model, labels, tags)
        return self._report(self._backend.spend_totals(request[0]), request)

    # -- the audit trail's integrity, export and retention -----------------------------------------

    def verify_audit_log(self, *, since_checkpoint: AuditCheckpoint | None = None) -> AuditVerification:
        """Check the whole audit trail; the report names the first bad record and why.

        Every record a reader can see is checked: each links to the one before it and its hash
        matches its content, and the store's head, anchor and count agree with the records.
        With an audit key the head and the anchor must carry the key's seal. With
        ``since_checkpoint`` (from :meth:`audit_checkpoint`, kept elsewhere) the trail must still
        hold the checkpoint's record: a truncation of the newest records fails. See the README's
        audit section for what is and is not detected. A prune that runs meanwhile is allowed for.
        """
        return self._drive(self._verify_steps(self._checkpoint_request(since_checkpoint)))

    def audit_checkpoint(self) -> AuditCheckpoint:
        """A witness of the trail's head now: keep it outside the store (signed with the audit key).

        ``verify_audit_log(since_checkpoint=...)`` then fails if the store no longer extends it.
        """
        return self._checkpoint(self._backend.audit_marks())

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
    ) -> Iterator[AuditRecord]:
        """Like :meth:`audit_log`, but streamed page by page (flat memory for any size)."""
        query = self._audit_query(agent_id, event_type, since, until, after_seq, limit)
        return self._read_pages(self._pages(query, page_size))

    def watch(
        self,
        *,
        after_seq: int | None = None,
        agent_id: str | AgentId | None = None,
        event_type: str | None = None,
        idle_timeout: float | None = None,
    ) -> Iterator[AuditRecord]:
        """Audit records as they are appended, in ``seq`` order, for as long as you iterate.

        From the record after ``after_seq`` (``None``: from now on): pass the last ``seq`` you
        handled to resume after a restart with no gap and no repeat. ``agent_id`` and
        ``event_type`` filter. Between records it blocks on the store where the store can
        (a condition in memory, ``XREAD BLOCK`` on Redis, ``LISTEN`` on PostgreSQL; SQLite
        polls its data version), without busy polling. With ``idle_timeout`` the iterator ends
        after that many seconds without a record.
        """
        return self._follow(self._feed(after_seq, agent_id, event_type, idle_timeout))

    def _follow(self, feed: AuditFeed) -> Iterator[AuditRecord]:
        """Run a feed (arguments already checked, so a bad one fails at the call, not at ``next``)."""
        backend = self._backend
        if feed.last is None:
            feed.last = backend.audit_marks().head[0]
        while True:
            head = backend.audit_marks().head[0]
            page = backend.query_audit(feed.next_query())
            yield from page
            feed.advance(page, head)
            if feed.behind:
                continue
            wait = feed.wait()
            if wait is None:
                return
            backend.wait_audit(feed.last, wait)

    def export_audit_log(
        self,
        file: str | os.PathLike[str] | IO[str],
        *,
        format: Literal["jsonl", "csv"] = "jsonl",
        **filters: Any,
    ) -> int:
        """Stream the audit trail (or the part ``filters`` select) to a path or text file.

        ``filters`` are those of :meth:`audit_log`. JSONL lines carry ``prev_hash`` and
        ``hash``, so the chain can be checked outside this library. Returns the record count.
        """
        write = export_writer(file, check_export_format(format))
        return write(self.iter_audit_log(**filters))

    def prune_audit_log(self, *, before: int) -> int:
        """Remove the oldest records with a timestamp before ``before`` (Unix seconds).

        Only a prefix of the trail is removed (it stops at the first record that is not old
        enough), so what remains still verifies: the last removed hash becomes the anchor.
        Returns how many records were removed.
        """
        return self._backend.prune_audit(check_timestamp(before, "before"), self._chain)

    def purge_agents(
        self,
        *,
        older_than: float,
        status: AgentStatus | str | Iterable[AgentStatus | str] = (
            AgentStatus.STOPPED,
            AgentStatus.FAILED,
        ),
    ) -> list[str]:
        """Remove agents with ``status`` whose state has not changed for ``older_than`` seconds.

        By default stopped and failed agents. Returns the removed ids.
        """
        return self._backend.purge_agents(*self._purge_request(status, older_than))

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the store's connections and files."""
        self._backend.close()

    def __enter__(self) -> StateManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateManager({self.url!r})"

    # -- running the core's outcomes and steps ---------------------------------------------------

    def _append(self, events: list[AuditEvent] | tuple[AuditEvent, ...]) -> list[AuditRecord]:
        if not events:
            return []
        records = self._backend.append_audit(events, self._chain)
        self._emit(records)
        return records

    def _drive(self, steps: Generator[StoreCall | VerifyRows, Any, _T]) -> _T:
        """Run a multi-call operation of the core to its end."""
        reply: Any = None
        try:
            while True:
                step = steps.send(reply)
                if isinstance(step, VerifyRows):
                    reply = step.verifier.feed(self._backend.iter_audit_rows(step.after_seq, VERIFY_BATCH))
                else:
                    reply = getattr(self._backend, step.name)(*step.args)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _read_pages(self, pages: AuditPages) -> Iterator[AuditRecord]:
        while (next_query := pages.next_query()) is not None:
            page = self._backend.query_audit(next_query)
            yield from page
            pages.advance(page)
