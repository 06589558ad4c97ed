"""The in-memory store: ``memory://``, the default.

Agent states are kept column by column in typed arrays, indexed by the id's 128-bit UUID value,
so a million agents cost about 150 bytes each instead of the ~500 that a dict of dataclasses
would. One re-entrant lock guards every structure, so the store is correct without relying on
the GIL (free-threaded CPython included); each operation holds it for a few microseconds.
"""

from __future__ import annotations

import bisect
import heapq
import math
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import Final

from ..audit_chain import GENESIS_HASH, AuditChain, AuditRow
from ..errors import AgentNotFound, AgentNotRunning, ReservationError
from ..ids import AgentId
from ..models import (
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    exceeds,
)
from .base import AuditQuery, Backend, CommitResult, SpendResult, UpdateFn

__all__ = ["MemoryBackend", "open_memory"]

_STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
# Keyed by the member's plain value: hashing a str is C-fast, hashing an Enum member is not.
_CODE: Final = {status._value_: code for code, status in enumerate(_STATUSES)}
_RUNNING: Final = 0
_FREE: Final = 255
_NAN: Final = math.nan
_SPARE_HOLDS: Final = 256
_new_state = object.__new__


class _Holds:
    """One agent's open reservations: O(log n) expiry and an O(1) running total."""

    __slots__ = ("amounts", "expiries", "total")

    def __init__(self) -> None:
        self.amounts: dict[str, tuple[float, float]] = {}  # id -> (amount, expires_at)
        self.expiries: list[tuple[float, str]] = []  # a heap of (expires_at, id)
        self.total = 0.0

    def add(self, reservation_id: str, amount: float, expires_at: float) -> None:
        self.amounts[reservation_id] = (amount, expires_at)
        heapq.heappush(self.expiries, (expires_at, reservation_id))
        self.total += amount

    def take(self, reservation_id: str) -> tuple[float, float] | None:
        entry = self.amounts.pop(reservation_id, None)
        if entry is not None:
            self._subtract(entry[0])
        return entry

    def expire(self, now: float) -> float:
        """Drop holds whose time is up; return the total of those left."""
        expiries = self.expiries
        while expiries and expiries[0][0] <= now:
            _, rid = heapq.heappop(expiries)
            entry = self.amounts.get(rid)
            if entry is not None and entry[1] <= now:
                del self.amounts[rid]
                self._subtract(entry[0])
        if len(expiries) > 2 * len(self.amounts) + 16:  # settled holds linger in the heap
            self.expiries = [(e, rid) for rid, (_, e) in self.amounts.items()]
            heapq.heapify(self.expiries)
        return self.total

    def _subtract(self, amount: float) -> None:
        # Exactly zero once nothing is held, so rounding never builds up across holds.
        self.total = self.total - amount if self.amounts else 0.0


def _id_str(key: int) -> str:
    h = f"{key:032x}"
    return f"agent_{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class MemoryBackend(Backend):
    """A thread-safe store in this process's memory; nothing survives the process."""

    schemes = ("memory",)
    blocking = False  # every call holds the lock for microseconds: asyncio calls it directly

    def __init__(self) -> None:
        self._lock = threading.RLock()
        # Agent columns; a slot's status byte is _FREE while the slot is unused.
        self._index: dict[int, int] = {}
        self._status = bytearray()
        self._spent = array("d")
        self._pii = array("q")
        self._limit = array("d")  # NaN: no limit
        self._changed = array("d")  # Unix time of the last change, for purge_agents
        self._free: list[int] = []
        # Open holds, only for agents that have some.
        self._holds: dict[int, _Holds] = {}
        self._spare_holds: list[_Holds] = []
        # Aggregates for stats().
        self._counts = [0, 0, 0]
        self._spent_total = 0.0
        self._pii_total = 0
        # Audit trail: records[i].seq == first_seq + i.
        self._records: list[AuditRecord] = []
        self._first_seq = 1
        self._by_agent: dict[str, list[int]] = {}
        self._by_type: dict[str, list[int]] = {}
        self._anchor: tuple[int, str] = (0, GENESIS_HASH)
        self._head: tuple[int, str] = (0, GENESIS_HASH)

    @property
    def url(self) -> str:
        return "memory://"

    # -- agent states -----------------------------------------------------------------------

    def _state(self, agent_id: AgentId, slot: int) -> AgentState:
        limit = self._limit[slot]
        return AgentState._trusted(
            agent_id,
            _STATUSES[self._status[slot]],
            self._spent[slot],
            self._pii[slot],
            None if limit != limit else limit,
        )

    def _write(self, slot: int, state: AgentState, now: float) -> None:
        """Store ``state`` in an occupied slot, keeping the aggregates in step."""
        code = _CODE[state.status._value_]
        old = self._status[slot]
        if old != code:
            self._counts[old] -= 1
            self._counts[code] += 1
            self._status[slot] = code
        self._spent_total += state.budget_spent - self._spent[slot]
        self._spent[slot] = state.budget_spent
        self._pii_total += state.pii_detections - self._pii[slot]
        self._pii[slot] = state.pii_detections
        limit = state.budget_limit
        self._limit[slot] = _NAN if limit is None else limit
        self._changed[slot] = now

    def _insert(self, key: int, state: AgentState, now: float) -> None:
        code = _CODE[state.status._value_]
        limit = state.budget_limit
        if self._free:
            slot = self._free.pop()
            self._status[slot] = code
            self._spent[slot] = state.budget_spent
            self._pii[slot] = state.pii_detections
            self._limit[slot] = _NAN if limit is None else limit
            self._changed[slot] = now
        else:
            slot = len(self._status)
            self._status.append(code)
            self._spent.append(state.budget_spent)
            self._pii.append(state.pii_detections)
            self._limit.append(_NAN if limit is None else limit)
            self._changed.append(now)
        self._index[key] = slot
        self._counts[code] += 1
        self._spent_total += state.budget_spent
        self._pii_total += state.pii_detections

    def save(self, state: AgentState, now: float) -> None:
        key = state.agent_id._int
        code = _CODE[state.status._value_]
        spent = state.budget_spent
        pii = state.pii_detections
        limit = state.budget_limit
        lock = self._lock
        lock.acquire()
        try:
            slot = self._index.get(key)
            if slot is None:
                self._insert(key, state, now)
                return
            # _write, inlined: this is the hottest write path.
            status = self._status
            old = status[slot]
            if old != code:
                self._counts[old] -= 1
                self._counts[code] += 1
                status[slot] = code
            column = self._spent
            self._spent_total += spent - column[slot]
            column[slot] = spent
            counts = self._pii
            self._pii_total += pii - counts[slot]
            counts[slot] = pii
            self._limit[slot] = _NAN if limit is None else limit
            self._changed[slot] = now
        finally:
            lock.release()

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        with self._lock:
            for state in states:
                self.save(state, now)

    def get(self, agent_id: AgentId) -> AgentState | None:
        # The hottest path: read the columns under the lock, build the copy outside it.
        # acquire/release costs half of what ``with`` does on CPython 3.11.
        lock = self._lock
        lock.acquire()
        try:
            slot = self._index.get(agent_id._int)
            if slot is None:
                return None
            code = self._status[slot]
            spent = self._spent[slot]
            pii = self._pii[slot]
            limit = self._limit[slot]
        finally:
            lock.release()
        state: AgentState = _new_state(AgentState)  # no re-validation: the store holds valid values
        state.agent_id = agent_id
        state.status = _STATUSES[code]
        state.budget_spent = spent
        state.pii_detections = pii
        state.budget_limit = None if limit != limit else limit
        return state

    def get_many(self, agent_ids: Sequence[AgentId]) -> list[AgentState | None]:
        index = self._index
        with self._lock:
            out: list[AgentState | None] = []
            for agent_id in agent_ids:
                slot = index.get(agent_id._int)
                out.append(None if slot is None else self._state(agent_id, slot))
            return out

    def remove(self, agent_id: AgentId) -> bool:
        key = agent_id._int
        with self._lock:
            slot = self._index.pop(key, None)
            if slot is None:
                return False
            self._holds.pop(key, None)
            self._counts[self._status[slot]] -= 1
            self._pii_total -= self._pii[slot]
            if self._index:
                self._spent_total -= self._spent[slot]
            else:
                self._spent_total = 0.0  # no drift left behind once the store is empty
            self._status[slot] = _FREE
            self._spent[slot] = 0.0
            self._pii[slot] = 0
            self._free.append(slot)
            return True

    def list_ids(self) -> list[str]:
        with self._lock:
            keys = list(self._index)
        return [_id_str(key) for key in keys]

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Iterator[AgentState]:
        with self._lock:
            keys = list(self._index)
        want = None if status is None else _CODE[status._value_]
        for start in range(0, len(keys), batch_size):
            batch: list[AgentState] = []
            with self._lock:
                for key in keys[start : start + batch_size]:
                    slot = self._index.get(key)
                    if slot is None or (want is not None and self._status[slot] != want):
                        continue
                    batch.append(self._state(AgentId._trusted(_id_str(key), key), slot))
            yield from batch

    def stats(self) -> FleetStats:
        with self._lock:
            running, stopped, failed = self._counts
            return FleetStats(
                total=running + stopped + failed,
                running=running,
                stopped=stopped,
                failed=failed,
                budget_spent=self._spent_total,
                pii_detections=self._pii_total,
            )

    def _slot(self, agent_id: AgentId) -> int:
        slot = self._index.get(agent_id._int)
        if slot is None:
            raise AgentNotFound(agent_id.as_str())
        return slot

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        with self._lock:
            slot = self._slot(agent_id)
            new = fn(self._state(agent_id, slot))
            self._write(slot, new, now)
            return new.copy()

    # -- atomic counters ---------------------------------------------------------------------

    def _open_holds(self, key: int, now: float) -> float:
        """Sum of the agent's unexpired holds, dropping the expired ones."""
        holds = self._holds.get(key)
        if holds is None:
            return 0.0
        total = holds.expire(now)
        if not holds.amounts:
            self._drop_holds(key, holds)
        return total

    def _drop_holds(self, key: int, holds: _Holds) -> None:
        """Forget an agent's emptied holds, keeping a few for reuse (reserve-commit cycles)."""
        del self._holds[key]
        if len(self._spare_holds) < _SPARE_HOLDS:
            holds.expiries.clear()
            holds.total = 0.0
            self._spare_holds.append(holds)

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        key = agent_id._int
        with self._lock:
            slot = self._slot(agent_id)
            if self._status[slot] != _RUNNING:
                raise AgentNotRunning(agent_id.as_str(), _STATUSES[self._status[slot]].value, "record spend")
            spent = self._spent[slot]
            limit = self._limit[slot]
            reserved = self._open_holds(key, now) if key in self._holds else 0.0
            if limit == limit and exceeds(spent + reserved + amount, limit):
                return SpendResult(self._state(agent_id, slot), exceeded=True, reserved=reserved)
            self._spent[slot] = spent + amount
            self._spent_total += amount
            self._changed[slot] = now
            return SpendResult(self._state(agent_id, slot), reserved=reserved)

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        with self._lock:
            slot = self._slot(agent_id)
            self._pii[slot] += count
            self._pii_total += count
            self._changed[slot] = now
            return self._state(agent_id, slot)

    def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> tuple[AgentStatus, AgentState]:
        with self._lock:
            slot = self._slot(agent_id)
            old = self._status[slot]
            code = _CODE[status._value_]
            self._counts[old] -= 1
            self._counts[code] += 1
            self._status[slot] = code
            self._changed[slot] = now
            return _STATUSES[old], self._state(agent_id, slot)

    # -- reservations ----------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        key = agent_id._int
        with self._lock:
            slot = self._slot(agent_id)
            if self._status[slot] != _RUNNING:
                raise AgentNotRunning(
                    agent_id.as_str(), _STATUSES[self._status[slot]].value, "reserve budget"
                )
            reserved = self._open_holds(key, now)
            limit = self._limit[slot]
            if limit == limit and exceeds(self._spent[slot] + reserved + amount, limit):
                return SpendResult(self._state(agent_id, slot), exceeded=True, reserved=reserved)
            expires_at = now + ttl
            holds = self._holds.get(key)
            if holds is None:
                holds = self._holds[key] = self._spare_holds.pop() if self._spare_holds else _Holds()
            holds.add(reservation_id, amount, expires_at)
            return Reservation._trusted(reservation_id, agent_id, amount, expires_at)

    def _take_hold(self, reservation: Reservation, now: float, action: str) -> None:
        key = reservation.agent_id._int
        holds = self._holds.get(key)
        entry = None if holds is None else holds.take(reservation.reservation_id)
        if holds is not None and not holds.amounts:
            self._drop_holds(key, holds)
        if entry is None or entry[1] <= now:
            raise ReservationError(
                f"cannot {action} reservation {reservation.reservation_id}: it is not open "
                "(already committed or released, expired after its ttl, or its agent was "
                "removed); if money was spent after the hold expired, record it with record_spend"
            )

    def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        agent_id = reservation.agent_id
        with self._lock:
            self._take_hold(reservation, now, "commit")
            slot = self._slot(agent_id)
            spent = self._spent[slot] + actual
            self._spent[slot] = spent
            self._spent_total += actual
            self._changed[slot] = now
            limit = self._limit[slot]
            exceeded = limit == limit and exceeds(spent, limit)
            return CommitResult(self._state(agent_id, slot), exceeded=exceeded)

    def release(self, reservation: Reservation, now: float) -> None:
        with self._lock:
            self._take_hold(reservation, now, "release")

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        with self._lock:
            slot = self._slot(agent_id)
            return self._state(agent_id, slot), self._open_holds(agent_id._int, now)

    # -- audit trail -------------------------------------------------------------------------

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        with self._lock:
            seq, prev = self._head
            for event in events:
                seq += 1
                agent = event.agent_id.as_str()
                digest = chain.seal(prev, seq, agent, event.event_type, event.timestamp, event.details)
                record = AuditRecord(seq, event, digest, prev)
                self._records.append(record)
                by_agent = self._by_agent.get(agent)
                if by_agent is None:
                    self._by_agent[agent] = [seq]
                else:
                    by_agent.append(seq)
                by_type = self._by_type.get(event.event_type)
                if by_type is None:
                    self._by_type[event.event_type] = [seq]
                else:
                    by_type.append(seq)
                out.append(record)
                prev = digest
            self._head = (seq, prev)
        return out

    def query_audit(self, query: AuditQuery) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        limit = query.limit
        if limit == 0:
            return out
        after = query.after_seq if query.after_seq is not None else 0
        with self._lock:
            records = self._records
            first = self._first_seq
            candidates: Sequence[int]
            if query.agent_id is not None:
                candidates = self._by_agent.get(query.agent_id.as_str(), [])
            elif query.event_type is not None:
                candidates = self._by_type.get(query.event_type, [])
            else:
                candidates = range(first, first + len(records))
            start = bisect.bisect_right(candidates, after)
            for i in range(start, len(candidates)):
                record = records[candidates[i] - first]
                event = record.event
                if (
                    (query.event_type is None or event.event_type == query.event_type)
                    and (query.since is None or event.timestamp >= query.since)
                    and (query.until is None or event.timestamp <= query.until)
                ):
                    out.append(record)
                    if limit is not None and len(out) >= limit:
                        break
        return out

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Iterator[AuditRow]:
        position = 0
        while True:
            with self._lock:
                records = self._records
                if position == 0:
                    position = max(0, bisect.bisect_right(records, after_seq, key=_seq))
                batch = records[position : position + batch_size]
            if not batch:
                return
            position += len(batch)
            for r in batch:
                e = r.event
                yield (
                    r.seq,
                    e.agent_id.as_str(),
                    e.event_type,
                    e.timestamp,
                    e.details,
                    r.prev_hash,
                    r.hash,
                )

    def audit_anchor(self) -> tuple[int, str]:
        with self._lock:
            return self._anchor

    def audit_head(self) -> tuple[int, str]:
        with self._lock:
            return self._head

    def audit_count(self) -> int:
        with self._lock:
            return len(self._records)

    def prune_audit(self, before: int) -> int:
        with self._lock:
            records = self._records
            n = 0
            while n < len(records) and records[n].event.timestamp < before:
                n += 1
            if n == 0:
                return 0
            last = records[n - 1]
            self._anchor = (last.seq, last.hash)
            del records[:n]
            self._first_seq = last.seq + 1
            for index in (self._by_agent, self._by_type):
                for name in list(index):
                    seqs = index[name]
                    cut = bisect.bisect_right(seqs, last.seq)
                    if cut == len(seqs):
                        del index[name]
                    elif cut:
                        del seqs[:cut]
            return n

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> list[str]:
        codes = {_CODE[s._value_] for s in statuses}
        removed: list[str] = []
        with self._lock:
            doomed = [
                key
                for key, slot in self._index.items()
                if self._status[slot] in codes and self._changed[slot] < changed_before
            ]
            for key in doomed:
                agent_id = AgentId._trusted(_id_str(key), key)
                self.remove(agent_id)
                removed.append(agent_id.as_str())
        return removed

    def close(self) -> None:
        """Nothing to release: the data lives as long as this object."""


def _seq(record: AuditRecord) -> int:
    return record.seq


def open_memory(url: str, **options: object) -> MemoryBackend:
    """Build the in-memory store for ``memory://`` (it takes no options)."""
    if options:
        from ..errors import ConfigurationError

        raise ConfigurationError(
            f"memory:// takes no options, got {sorted(options)}; remove them from the call"
        )
    return MemoryBackend()
