"""The in-memory store's agents, counters and holds, and :class:`MemoryBackend` itself.

Agent states live in typed columns (``array``), one slot per agent, found through a dict from
the canonical id text to the slot: a read by text is one dict lookup, with no parse. A million
agents cost about 200 bytes each (the text, its dict entry, the slot number, the slot's link
back to the text and 33 bytes of columns), where a dict of dataclasses costs more. A removed
agent's slot is reused. Agents of one status are found by searching the status column, a byte
per slot, in C. Amounts are whole micro-units. Labels, budget scopes and periods live beside the
columns (:class:`~.budgets.Extra`), for the agents that have them, with an index from each label
to its agents; budget scopes and holds are in :mod:`.budgets`. The audit trail is a
:class:`~.trail.Trail` the store holds.

One lock guards every structure, the trail's included, so the store does not rely on the GIL
(free-threaded CPython included). It is re-entrant so that an update function may read the
store. Each call holds it for microseconds, so the asyncio adapter calls this store directly
(``blocking = False``).
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from ... import events
from ...audit_chain import AuditChain, AuditRow
from ...budgets import current_start, micros_of_state, passes
from ...errors import AgentNotFound, AgentNotRunning, ConfigurationError
from ...ids import AgentId
from ...ledger import SpendNote
from ...models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    check_count,
)
from ...money import from_micros
from ...thresholds import DEFAULT_THRESHOLDS
from ..base import (
    AuditMarks,
    AuditQuery,
    Backend,
    BudgetChange,
    BudgetRow,
    Change,
    CommitResult,
    SpendResult,
    UpdateFn,
)
from .budgets import Extra, Holds, Scope
from .charges import NO_LIMIT, Charges
from .trail import Trail

__all__ = ["MemoryBackend", "open_memory"]


#: A slot's status code is the status's place here; ``_FREE`` marks an unused slot.
_STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
_RUNNING: Final = _STATUSES.index(AgentStatus.RUNNING)
_FREE: Final = len(_STATUSES)


class MemoryBackend(Charges, Backend):
    """A thread-safe store in this process's memory; nothing survives the process."""

    schemes = ("memory",)
    blocking = False  # every call holds the lock for microseconds: asyncio calls it directly

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._slots: dict[str, int] = {}  # canonical id text -> slot
        self._keys: list[str] = []  # slot -> canonical id text ("" for a free slot)
        self._free: list[int] = []  # slots of removed agents, taken before new ones
        # The columns, one entry per slot. A free slot has status _FREE, zero spent and count.
        self._status = array("B")
        self._spent = array("q")  # micro-units
        self._pii = array("q")
        self._limit = array("q")  # micro-units; NO_LIMIT for no limit
        self._changed = array("d")  # when the slot last changed, for purge_agents
        # The stats() aggregates, changed by _write alone; _counts[_FREE] counts free slots.
        self._counts = [0] * (len(_STATUSES) + 1)
        self._spent_total = 0
        self._pii_total = 0
        self._extra: dict[str, Extra] = {}  # only agents with labels, scopes or a period
        self._labelled: dict[tuple[str, str], set[str]] = {}  # (key, value) -> agents with it
        self._holds: dict[str, Holds] = {}  # only agents that have open holds
        self._alerted: dict[str, float] = {}  # only agents with a threshold alerted this period
        self._scopes: dict[str, Scope] = {}  # budget scopes by name
        # Woken by every append, for watch(): waits on the store's one lock.
        self._appended = threading.Condition(self._lock)
        self._waiting = 0  # watchers in wait_audit: an append wakes them only when there are any
        self._trail = Trail(self._wake)  # the audit trail, guarded by the same lock

    @property
    def url(self) -> str:
        return "memory://"

    # -- slots (every caller holds the lock) ---------------------------------------------------

    def _write(
        self,
        slot: int,
        now: float,
        code: int | None = None,
        spent: int | None = None,
        pii: int | None = None,
        limit: int | None = None,
    ) -> None:
        """Change a slot's columns (``None`` leaves one as it is; ``limit`` as the column holds it).

        The one place a slot changes, so the ``stats()`` aggregates always match the columns.
        A free slot holds zeros, so filling one adds exactly its new values. Each column is
        written before its aggregate, so a value the column refuses changes nothing.
        """
        if code is not None:
            old_code = self._status[slot]
            self._status[slot] = code
            self._counts[old_code] -= 1
            self._counts[code] += 1
        if spent is not None:
            old_spent = self._spent[slot]
            self._spent[slot] = spent
            self._spent_total += spent - old_spent
        if pii is not None:
            old_pii = self._pii[slot]
            self._pii[slot] = pii  # OverflowError past a signed 64-bit count
            self._pii_total += pii - old_pii
        if limit is not None:
            self._limit[slot] = limit
        self._changed[slot] = now

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        self._keys.append("")
        self._status.append(_FREE)
        self._spent.append(0)
        self._pii.append(0)
        self._limit.append(NO_LIMIT)
        self._changed.append(0.0)
        self._counts[_FREE] += 1
        return len(self._status) - 1

    def _drop(self, key: str) -> bool:
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        holds = self._holds.pop(key, None)
        if holds is not None:
            for reservation_id, (_, _, scopes) in holds.amounts.items():
                self._drop_scope_holds(reservation_id, scopes)
        self._set_extra(key, None)
        self._alerted.pop(key, None)
        self._write(slot, 0.0, code=_FREE, spent=0, pii=0, limit=NO_LIMIT)
        self._keys[slot] = ""
        self._free.append(slot)
        return True

    def _set_extra(self, key: str, extra: Extra | None) -> None:
        """Replace an agent's fields beyond the columns, keeping the label index in step."""
        old = self._extra.pop(key, None)
        if old is not None:
            for label in old.labels.items():
                agents = self._labelled[label]
                agents.discard(key)
                if not agents:
                    del self._labelled[label]
        if extra is not None:
            self._extra[key] = extra
            for label in extra.labels.items():
                self._labelled.setdefault(label, set()).add(key)

    def _state(self, agent_id: AgentId, slot: int) -> AgentState:
        """A new state holding the slot's values (valid: the store holds nothing else)."""
        limit = self._limit[slot]
        status = _STATUSES[self._status[slot]]
        budget_limit = None if limit == NO_LIMIT else from_micros(limit)
        spent = from_micros(self._spent[slot])
        extra = self._extra.get(agent_id.as_str())
        if extra is None:
            return AgentState._trusted(agent_id, status, spent, self._pii[slot], budget_limit)
        return AgentState._trusted(
            agent_id,
            status,
            spent,
            self._pii[slot],
            budget_limit,
            dict(extra.labels),
            extra.scopes,
            extra.period,
            extra.tz,
            extra.period_start,
            extra.thresholds,
        )

    def _slot(self, key: str, action: str = "") -> int:
        """The agent's slot; ``AgentNotFound`` when absent, ``AgentNotRunning`` for an ``action``
        that needs a running agent."""
        slot = self._slots.get(key)
        if slot is None:
            raise AgentNotFound(key)
        if action and self._status[slot] != _RUNNING:
            raise AgentNotRunning(key, _STATUSES[self._status[slot]].value, action)
        return slot

    def _keys_with(self, codes: Iterable[int]) -> list[str]:
        """The ids of the agents with one of these status codes (the caller holds the lock).

        The status column is one byte per slot, searched in C (``bytes.find``): a fleet of a
        million agents costs a fraction of a millisecond, plus the matches themselves.
        """
        column = self._status.tobytes()
        keys = self._keys
        found: list[str] = []
        for code in codes:
            slot = column.find(code)
            while slot >= 0:
                found.append(keys[slot])
                slot = column.find(code, slot + 1)
        return found

    def _keys_labelled(self, labels: Mapping[str, str]) -> list[str]:
        """The ids of the agents that carry every label in ``labels``, from the label index."""
        sets = sorted((self._labelled.get(label, set()) for label in labels.items()), key=len)
        return sorted(sets[0].intersection(*sets[1:]))

    # -- agent states -----------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> None:
        key = state.agent_id.as_str()
        spent, limit = micros_of_state(state)
        code = _STATUSES.index(state.status)
        plain = (
            not state.labels
            and not state.budget_scopes
            and state.budget_period is None
            and state.budget_tz == "UTC"
            and state.budget_thresholds is DEFAULT_THRESHOLDS
        )
        extra = None
        if not plain:
            labels = dict(state.labels)
            extra = Extra(
                labels,
                state.budget_scopes,
                state.budget_period,
                state.budget_tz,
                state.period_start,
                state.budget_thresholds,
            )
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = self._new_slot()
                self._keys[slot] = key
            self._write(slot, now, code, spent, state.pii_detections, NO_LIMIT if limit is None else limit)
            if extra is not None or key in self._extra:
                self._set_extra(key, extra)

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        with self._lock:  # held across the batch: other threads see all of it or none
            for state in states:
                self.save(state, now)

    def get(self, key: str) -> AgentState | None:
        with self._lock:
            slot = self._slots.get(key)
            return None if slot is None else self._state(AgentId._trusted(key), slot)

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        with self._lock:
            return [self.get(key) for key in keys]

    def remove(self, agent_id: AgentId) -> bool:
        with self._lock:
            return self._drop(agent_id.as_str())

    def list_ids(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def iter_states(
        self, status: AgentStatus | None, labels: Mapping[str, str] | None, batch_size: int
    ) -> Iterator[AgentState]:
        wanted = range(len(_STATUSES)) if status is None else (_STATUSES.index(status),)
        with self._lock:
            if labels:
                keys = self._keys_labelled(labels)
            else:
                keys = list(self._slots) if status is None else self._keys_with(wanted)
        for start in range(0, len(keys), batch_size):
            batch: list[AgentState] = []
            with self._lock:
                for key in keys[start : start + batch_size]:
                    slot = self._slots.get(key)  # gone if removed since
                    if slot is not None and self._status[slot] in wanted:
                        state = self._state(AgentId._trusted(key), slot)
                        if not labels or labels.items() <= state.labels.items():
                            batch.append(state)
            yield from batch

    def stats(self) -> FleetStats:
        with self._lock:
            running, stopped, failed, _ = self._counts
            total = running + stopped + failed
            return FleetStats(
                total, running, stopped, failed, from_micros(self._spent_total), self._pii_total
            )

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float, chain: AuditChain) -> Change:
        with self._lock:
            key = agent_id.as_str()
            slot = self._slot(key)
            resets = self._roll_agent(agent_id, slot, self._extra.get(key), now)
            new = fn(self._state(agent_id, slot))
            sealed = self._trail.seal(resets, chain, now)
            self.save(new, now)
            return Change(self._state(agent_id, slot), self._trail.keep(sealed))

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        codes = {_STATUSES.index(status) for status in statuses}
        with self._lock:
            doomed = [
                key for key in self._keys_with(codes) if self._changed[self._slots[key]] < changed_before
            ]
            for key in doomed:
                self._drop(key)
        return doomed

    # -- atomic counters ----------------------------------------------------------------------

    def record_spend(
        self, agent_id: AgentId, amount: int, now: float, chain: AuditChain, note: SpendNote | None = None
    ) -> SpendResult:
        with self._lock:
            slot, scopes, resets = self._prepare(agent_id, amount, now, "record spend")
            refusal = self._refusal(agent_id, slot, scopes, amount, now, "spend")
            if refusal is not None:
                held, event, budget = refusal
                sealed = self._trail.seal([*resets, event], chain, now)
                state = self._state(agent_id, slot)
                return SpendResult(state, True, held, self._trail.keep(sealed), budget)
            records = self._charge(agent_id, slot, scopes, amount, now, chain, resets, None, note)
            return SpendResult(self._state(agent_id, slot), False, 0, records)

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Change:
        with self._lock:
            slot = self._slot(agent_id.as_str())
            pii = check_count(self._pii[slot] + count, "the agent's pii_detections")
            sealed = self._trail.seal([event], chain, now)
            self._write(slot, now, pii=pii)
            return Change(self._state(agent_id, slot), self._trail.keep(sealed))

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Change:
        with self._lock:
            slot = self._slot(agent_id.as_str())
            old = _STATUSES[self._status[slot]]
            implied = [] if old is status else [events.status_changed(agent_id, old, status, now)]
            sealed = self._trail.seal(implied, chain, now)
            self._write(slot, now, code=_STATUSES.index(status))
            return Change(self._state(agent_id, slot), self._trail.keep(sealed))

    # -- reservations ----------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: int, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        key = agent_id.as_str()
        with self._lock:
            slot, scopes, resets = self._prepare(agent_id, amount, now, "reserve budget")
            refusal = self._refusal(agent_id, slot, scopes, amount, now, "reserve")
            if refusal is not None:
                held, event, budget = refusal
                sealed = self._trail.seal([*resets, event], chain, now)
                state = self._state(agent_id, slot)
                return SpendResult(state, True, held, self._trail.keep(sealed), budget)
            if resets:
                self._trail.keep(self._trail.seal(resets, chain, now))
            names = tuple(name for name, _ in scopes)
            expires_at = now + ttl
            holds = self._holds.get(key)
            if holds is None:
                holds = self._holds[key] = Holds()
            holds.add(reservation_id, amount, expires_at, names)
            for _, scope in scopes:
                scope.holds.add(reservation_id, amount, expires_at)
        return Reservation._trusted(reservation_id, agent_id, from_micros(amount), expires_at, names)

    def commit(
        self,
        reservation: Reservation,
        actual: int,
        now: float,
        chain: AuditChain,
        note: SpendNote | None = None,
    ) -> CommitResult:
        agent_id = reservation.agent_id
        key = agent_id.as_str()
        rid = reservation.reservation_id
        with self._lock:
            amount, _, names = self._open_hold(reservation, now, "commit")
            slot = self._slot(key)  # there: removing an agent drops its holds
            scopes = [(name, self._scopes[name]) for name in names if name in self._scopes]
            self._charge_check(slot, scopes, actual)
            extra = self._extra.get(key)
            expired = self._expire_holds(agent_id, now)
            resets = expired + self._roll_agent(agent_id, slot, extra, now) + self._roll_scopes(scopes, now)
            spent, limit = self._spent[slot] + actual, self._limit[slot]
            overs = []
            if limit != NO_LIMIT and passes(limit, spent):
                overs.append(
                    events.overspent(
                        agent_id, now, rid, limit=limit, spent=spent, committed=actual, reserved=amount
                    )
                )
            for name, scope in scopes:
                if scope.limit is not None and passes(scope.limit, scope.spent + actual):
                    overs.append(
                        events.overspent(
                            agent_id,
                            now,
                            rid,
                            limit=scope.limit,
                            spent=scope.spent + actual,
                            committed=actual,
                            reserved=amount,
                            scope=name,
                        )
                    )
            records = self._charge(agent_id, slot, scopes, actual, now, chain, resets, rid, note, overs)
            self._drop_hold(key, rid)
            return CommitResult(self._state(agent_id, slot), bool(overs), records)

    def release(self, reservation: Reservation, now: float) -> None:
        with self._lock:
            self._open_hold(reservation, now, "release")
            self._drop_hold(reservation.agent_id.as_str(), reservation.reservation_id)

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, int]:
        with self._lock:
            slot = self._slot(agent_id.as_str())
            holds = self._holds.get(agent_id.as_str())
            return self._state(agent_id, slot), 0 if holds is None else holds.total_at(now)

    # -- budget scopes ------------------------------------------------------------------------

    def set_budget(
        self,
        scope: str,
        limit: int | None,
        period: str | None,
        tz: str,
        now: float,
        chain: AuditChain,
        thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    ) -> BudgetChange:
        with self._lock:
            event = events.budget_set(scope, limit, period, tz, now, thresholds)
            sealed = self._trail.seal([event], chain, now)
            found = self._scopes.get(scope)
            if found is None:
                start = current_start(period, tz, now)
                found = self._scopes[scope] = Scope(limit, period, tz, start, thresholds=thresholds)
            else:
                if (found.period, found.tz) != (period, tz):
                    found.period_start = current_start(period, tz, now)
                    found.alerted = 0.0
                found.limit, found.period, found.tz = limit, period, tz
                found.thresholds = thresholds
            return BudgetChange(found.row(scope, now), self._trail.keep(sealed))

    def get_budget(self, scope: str, now: float) -> BudgetRow | None:
        with self._lock:
            found = self._scopes.get(scope)
            return None if found is None else found.row(scope, now)

    def list_budgets(self, now: float) -> list[BudgetRow]:
        with self._lock:
            return [self._scopes[name].row(name, now) for name in sorted(self._scopes)]

    def remove_budget(self, scope: str, now: float, chain: AuditChain) -> BudgetChange:
        with self._lock:
            found = self._scopes.get(scope)
            if found is None:
                return BudgetChange(None)
            sealed = self._trail.seal([events.budget_removed(scope, found.spent, now)], chain, now)
            row = found.row(scope, now)
            del self._scopes[scope]
            return BudgetChange(row, self._trail.keep(sealed))

    # -- audit trail -------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        with self._lock:
            return self._trail.keep(self._trail.seal(events, chain, time.time()))

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        if query.limit == 0:
            return []
        with self._lock:
            return self._trail.query(query)

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        position = -1
        while True:
            with self._lock:
                if position < 0:
                    position = self._trail.position_after(after_seq)
                batch = self._trail.records[position : position + batch_size]
            if not batch:
                return
            position += len(batch)
            for r in batch:
                e = r.event
                yield (r.seq, e.agent_id.as_str(), e.event_type, e.timestamp, e.details, r.prev_hash, r.hash)

    def audit_marks(self) -> AuditMarks:
        with self._lock:
            return self._trail.marks()

    def wait_audit(self, after_seq: int, timeout: float) -> bool:
        with self._appended:
            self._waiting += 1
            try:
                return self._appended.wait_for(lambda: self._trail.head[0] > after_seq, timeout)
            finally:
                self._waiting -= 1

    def _wake(self) -> None:
        """After an append (under the lock): wake the watchers, if any wait (every settled spend
        appends, and waking nobody still costs a call into ``threading``)."""
        if self._waiting:
            self._appended.notify_all()

    def audit_count(self) -> int:
        with self._lock:
            return len(self._trail.records)

    def prune_audit(self, before: int, chain: AuditChain) -> int:
        with self._lock:
            return self._trail.prune(before, chain)

    def close(self) -> None:
        """Nothing to release: the data lives as long as this object."""


def open_memory(url: str, **options: object) -> MemoryBackend:
    """Build the in-memory store for ``memory://`` (it takes no options)."""
    if options:
        raise ConfigurationError(
            f"memory:// takes no options, got {sorted(options)}; remove them from the call"
        )
    return MemoryBackend()
