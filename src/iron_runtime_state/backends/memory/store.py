"""The in-memory store's agents, counters and holds, and :class:`MemoryBackend` itself.

Agent states live in typed columns (``array``), one slot per agent, found through a dict from
the canonical id text to the slot: a read by text is one dict lookup, with no parse. A million
agents cost about 200 bytes each (the text, its dict entry, the slot number, the slot's link
back to the text and 33 bytes of columns), where a dict of dataclasses costs more. A removed
agent's slot is reused. Agents of one status are found by searching the status column, a byte
per slot, in C. The audit trail is a :class:`~.trail.Trail` the store holds.

One lock guards every structure, the trail's included, so the store does not rely on the GIL
(free-threaded CPython included). It is re-entrant so that an update function may read the
store. Each call holds it for microseconds, so the asyncio adapter calls this store directly
(``blocking = False``).
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from ... import events
from ...audit_chain import AuditChain, AuditRow
from ...errors import AgentNotFound, AgentNotRunning, ConfigurationError, ReservationError
from ...ids import AgentId
from ...models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    check_count,
    exceeds,
)
from ..base import AuditMarks, AuditQuery, Backend, Change, CommitResult, SpendResult, UpdateFn
from .trail import Trail

__all__ = ["MemoryBackend", "open_memory"]


#: A slot's status code is the status's place here; ``_FREE`` marks an unused slot.
_STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
_RUNNING: Final = _STATUSES.index(AgentStatus.RUNNING)
_FREE: Final = len(_STATUSES)
_NO_LIMIT: Final = math.nan  # the limit column's value for ``budget_limit=None``


class _Holds:
    """One agent's open reservations and their running total.

    ``soonest`` is never later than the first expiry, so the holds are scanned for expired ones
    only once ``now`` reaches it: many open holds stay cheap. A settled hold may leave it early,
    which costs one scan that finds the true value.
    """

    __slots__ = ("amounts", "soonest", "total")

    def __init__(self) -> None:
        self.amounts: dict[str, tuple[float, float]] = {}  # reservation id -> (amount, expires_at)
        self.soonest = math.inf
        self.total = 0.0

    def add(self, reservation_id: str, amount: float, expires_at: float) -> None:
        self.amounts[reservation_id] = (amount, expires_at)
        self.total += amount
        self.soonest = min(self.soonest, expires_at)

    def take(self, reservation_id: str) -> tuple[float, float] | None:
        """Drop one hold; its ``(amount, expires_at)``, or ``None`` if there is no such hold."""
        entry = self.amounts.pop(reservation_id, None)
        if entry is not None:
            # Exactly zero once nothing is held, so rounding never builds up.
            self.total = self.total - entry[0] if self.amounts else 0.0
        return entry

    def open_total(self, now: float) -> float:
        """Drop the holds whose time is up; the total of those left."""
        if now >= self.soonest:
            for reservation_id, (_, expires_at) in list(self.amounts.items()):
                if expires_at <= now:
                    self.take(reservation_id)
            self.soonest = min((expires_at for _, expires_at in self.amounts.values()), default=math.inf)
        return self.total


class MemoryBackend(Backend):
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
        self._spent = array("d")
        self._pii = array("q")
        self._limit = array("d")  # _NO_LIMIT (NaN) for no limit
        self._changed = array("d")  # when the slot last changed, for purge_agents
        # The stats() aggregates, changed by _write alone; _counts[_FREE] counts free slots.
        self._counts = [0] * (len(_STATUSES) + 1)
        self._spent_total = 0.0
        self._pii_total = 0
        self._holds: dict[str, _Holds] = {}  # only agents that have open holds
        self._trail = Trail()  # the audit trail, guarded by the same lock

    @property
    def url(self) -> str:
        return "memory://"

    # -- slots (every caller holds the lock) ---------------------------------------------------

    def _write(
        self,
        slot: int,
        now: float,
        code: int | None = None,
        spent: float | None = None,
        pii: int | None = None,
        limit: float | None = None,
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
        if code == _FREE and self._counts[_FREE] == len(self._status):
            self._spent_total = 0.0  # an empty store: no rounding left behind

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        self._keys.append("")
        self._status.append(_FREE)
        self._spent.append(0.0)
        self._pii.append(0)
        self._limit.append(_NO_LIMIT)
        self._changed.append(0.0)
        self._counts[_FREE] += 1
        return len(self._status) - 1

    def _drop(self, key: str) -> bool:
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self._holds.pop(key, None)
        self._write(slot, 0.0, code=_FREE, spent=0.0, pii=0, limit=_NO_LIMIT)
        self._keys[slot] = ""
        self._free.append(slot)
        return True

    def _state(self, agent_id: AgentId, slot: int) -> AgentState:
        """A new state holding the slot's values (valid: the store holds nothing else)."""
        limit = self._limit[slot]
        status = _STATUSES[self._status[slot]]
        budget_limit = None if math.isnan(limit) else limit
        return AgentState._trusted(agent_id, status, self._spent[slot], self._pii[slot], budget_limit)

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

    def _passes_limit(self, slot: int, total: float) -> bool:
        """Whether a spend total passes the slot's limit (by ``models.exceeds``, the one rule)."""
        limit = self._limit[slot]
        return not math.isnan(limit) and exceeds(total, limit)

    # -- agent states -----------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> None:
        key = state.agent_id.as_str()
        limit = _NO_LIMIT if state.budget_limit is None else state.budget_limit
        code = _STATUSES.index(state.status)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = self._new_slot()
                self._keys[slot] = key
            self._write(slot, now, code, state.budget_spent, state.pii_detections, limit)

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

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        wanted = range(len(_STATUSES)) if status is None else (_STATUSES.index(status),)
        with self._lock:
            keys = list(self._slots) if status is None else self._keys_with(wanted)
        for start in range(0, len(keys), batch_size):
            batch: list[AgentState] = []
            with self._lock:
                for key in keys[start : start + batch_size]:
                    slot = self._slots.get(key)  # gone if removed since
                    if slot is not None and self._status[slot] in wanted:
                        batch.append(self._state(AgentId._trusted(key), slot))
            yield from batch

    def stats(self) -> FleetStats:
        with self._lock:
            running, stopped, failed, _ = self._counts
            total = running + stopped + failed
            return FleetStats(total, running, stopped, failed, self._spent_total, self._pii_total)

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        with self._lock:
            slot = self._slot(agent_id.as_str())
            self.save(fn(self._state(agent_id, slot)), now)
            return self._state(agent_id, slot)

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

    def record_spend(self, agent_id: AgentId, amount: float, now: float, chain: AuditChain) -> SpendResult:
        key = agent_id.as_str()
        with self._lock:
            slot = self._slot(key, "record spend")
            reserved = self._open_holds(key, now)
            spent = self._spent[slot]
            if self._passes_limit(slot, spent + reserved + amount):
                return self._refuse(agent_id, slot, reserved, amount, now, "spend", chain)
            self._write(slot, now, spent=spent + amount)
            return SpendResult(self._state(agent_id, slot), False, reserved)

    def _refuse(
        self,
        agent_id: AgentId,
        slot: int,
        reserved: float,
        amount: float,
        now: float,
        action: str,
        chain: AuditChain,
    ) -> SpendResult:
        """A spend or hold past the limit: nothing changes, and its ``budget_exceeded`` event is appended."""
        state = self._state(agent_id, slot)
        event = events.budget_exceeded(agent_id, state, reserved, amount, now, action)
        return SpendResult(state, True, reserved, self._trail.keep(self._trail.seal([event], chain, now)))

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

    def _open_holds(self, key: str, now: float) -> float:
        """The total of the agent's unexpired holds, dropping the expired ones."""
        holds = self._holds.get(key)
        if holds is None:
            return 0.0
        total = holds.open_total(now)
        if not holds.amounts:
            del self._holds[key]
        return total

    def _check_open(self, reservation: Reservation, now: float, action: str) -> None:
        """``ReservationError`` unless the reservation's hold is open (an expired one is dropped)."""
        key = reservation.agent_id.as_str()
        holds = self._holds.get(key)
        entry = None if holds is None else holds.amounts.get(reservation.reservation_id)
        if entry is not None and entry[1] > now:
            return
        if entry is not None:
            self._drop_hold(key, reservation.reservation_id)
        raise ReservationError(
            f"cannot {action} reservation {reservation.reservation_id}: it is not open "
            "(already committed or released, expired after its ttl, or its agent was "
            "removed); if money was spent after the hold expired, record it with record_spend"
        )

    def _drop_hold(self, key: str, reservation_id: str) -> None:
        """Drop a hold known to be there."""
        holds = self._holds[key]
        holds.take(reservation_id)
        if not holds.amounts:
            del self._holds[key]

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Reservation | SpendResult:
        key = agent_id.as_str()
        with self._lock:
            slot = self._slot(key, "reserve budget")
            reserved = self._open_holds(key, now)
            if self._passes_limit(slot, self._spent[slot] + reserved + amount):
                return self._refuse(agent_id, slot, reserved, amount, now, "reserve", chain)
            holds = self._holds.get(key)
            if holds is None:
                holds = self._holds[key] = _Holds()
            holds.add(reservation_id, amount, now + ttl)
        return Reservation._trusted(reservation_id, agent_id, amount, now + ttl)

    def commit(self, reservation: Reservation, actual: float, now: float, chain: AuditChain) -> CommitResult:
        agent_id = reservation.agent_id
        key = agent_id.as_str()
        with self._lock:
            self._check_open(reservation, now, "commit")
            slot = self._slot(key)  # there: removing an agent drops its holds
            spent = self._spent[slot] + actual
            state = self._state(agent_id, slot)
            state.budget_spent = spent  # the state this commit leaves
            exceeded = self._passes_limit(slot, spent)
            overspent = [events.overspent(state, reservation, actual, now)] if exceeded else []
            sealed = self._trail.seal(overspent, chain, now)
            self._drop_hold(key, reservation.reservation_id)
            self._write(slot, now, spent=spent)
            return CommitResult(state, exceeded, self._trail.keep(sealed))

    def release(self, reservation: Reservation, now: float) -> None:
        with self._lock:
            self._check_open(reservation, now, "release")
            self._drop_hold(reservation.agent_id.as_str(), reservation.reservation_id)

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        with self._lock:
            slot = self._slot(agent_id.as_str())
            return self._state(agent_id, slot), self._open_holds(agent_id.as_str(), now)

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
