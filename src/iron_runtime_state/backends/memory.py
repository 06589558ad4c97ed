"""The in-memory store: ``memory://``, the default.

Agent states are kept column by column in typed arrays, indexed by the id's 128-bit UUID value,
so a million agents cost about 160 bytes each instead of the ~210 of a dict of slotted
dataclasses (~300 for a naive layout). One re-entrant lock guards every structure, so the store
is correct without relying on the GIL (free-threaded CPython included); each operation holds it
for a few microseconds.

The hot paths (save, get, spend, reserve, commit) are written for CPython's interpreter: the
lock is taken with acquire/release rather than ``with``, small helpers are inlined where a call
would cost more than the work, a write that changes nothing is skipped, and results are built
after the lock is released. A call here costs about as much as the work it does, so the
store also does the whole of ``StateManager.save_agent_state`` and ``get_agent_state``
(checks included; see :meth:`MemoryBackend.manager_methods`), and a manager binds those in
place of its generic versions: one call per save or read instead of two.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from ..audit_chain import GENESIS_HASH, AuditChain, AuditRow
from ..errors import AgentNotFound, AgentNotRunning, ReservationError
from ..ids import AgentId, parse_canonical, try_parse
from ..models import (
    LIMIT_TOLERANCE,
    MAX_COUNT,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    FleetStats,
    Reservation,
    check_state,
)
from .base import AuditQuery, Backend, CommitResult, SpendResult, UpdateFn

__all__ = ["MemoryBackend", "open_memory"]

_STATUSES: Final = (AgentStatus.RUNNING, AgentStatus.STOPPED, AgentStatus.FAILED)
# Keyed by the member's plain value: hashing a str is C-fast, hashing an Enum member is not.
_CODE: Final = {status._value_: code for code, status in enumerate(_STATUSES)}
_RUNNING: Final = 0
_RUNNING_STATUS: Final = AgentStatus.RUNNING
_FREE: Final = 255
_NAN: Final = math.nan
_INF: Final = math.inf
_TOLERANCE: Final = LIMIT_TOLERANCE
_BY_TEXT_MAX: Final = 16384  # entries of MemoryBackend._by_text, about 100 bytes each
_new_state = object.__new__
_time = time.time


#: One open hold: (reservation_id, amount, expires_at).
_Hold = tuple[str, float, float]


class _Holds:
    """An agent's open reservations when it has more than one, and their running total.

    An agent with a single hold keeps it as a plain ``_Hold`` tuple, the common case and the
    cheapest to make and drop; a second hold turns it into one of these.

    ``soonest`` is never later than the first expiry, so a hold can only have expired when
    ``now >= soonest``; only then are the holds scanned. A settled hold may leave ``soonest``
    early, which costs one scan that finds the true value.
    """

    __slots__ = ("amounts", "soonest", "total")

    def __init__(self, first: _Hold) -> None:
        reservation_id, amount, expires_at = first
        self.amounts: dict[str, tuple[float, float]] = {reservation_id: (amount, expires_at)}
        self.soonest = expires_at
        self.total = amount

    def add(self, reservation_id: str, amount: float, expires_at: float) -> None:
        self.amounts[reservation_id] = (amount, expires_at)
        self.total += amount
        if expires_at < self.soonest:
            self.soonest = expires_at

    def expire(self, now: float) -> float:
        """Drop holds whose time is up; return the total of those left."""
        if now < self.soonest:
            return self.total
        amounts = self.amounts
        soonest = math.inf
        for reservation_id, (amount, expires_at) in list(amounts.items()):
            if expires_at <= now:
                del amounts[reservation_id]
                self.total -= amount
            elif expires_at < soonest:
                soonest = expires_at
        self.soonest = soonest
        if not amounts:
            self.total = 0.0  # exactly zero once nothing is held: rounding never builds up
        return self.total


def _floats(column: array[float]) -> memoryview[float]:
    """A view of a float column (a memoryview can only be cast from bytes)."""
    return memoryview(column).cast("B").cast("d")


def _ints(column: array[int]) -> memoryview[int]:
    """A view of an int column."""
    return memoryview(column).cast("B").cast("q")


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
        self._status = bytearray()  # one byte per slot, in use or not
        self._size = 0  # slots ever used; those past it are spare capacity
        self._free: list[int] = []  # used slots freed by remove, reused first
        # Numeric columns: read from the arrays, written through memoryviews of them, which
        # store a value faster than an array's own __setitem__ (reading is faster from the
        # array). An array cannot grow while viewed: _grow releases the views, extends the
        # arrays and views them again.
        self._spent = array("d")
        self._pii = array("q")
        self._limit = array("d")  # NaN: no limit
        self._changed = array("d")  # last change of a finished agent, for purge_agents
        self._view_columns()
        # The canonical text of ids read recently -> (id, slot), so that a read by text takes
        # one lookup. Bounded; an entry goes when its agent is removed, before its slot is reused.
        self._by_text: dict[str, tuple[AgentId, int]] = {}
        # Open holds, only for agents that have some.
        self._holds: dict[int, _Hold | _Holds] = {}
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

    def _write(self, slot: int, code: int, spent: float, pii: int, limit: float | None, now: float) -> None:
        """Store valid values in an occupied slot, keeping the aggregates in step.

        The spend is written outright (a save usually changes it); the status and the count,
        which usually do not change, cost one comparison each when they did not.
        """
        old = self._status[slot]
        if old != code:
            counts = self._counts
            counts[old] -= 1
            counts[code] += 1
            self._status[slot] = code
        self._spent_total += spent - self._spent[slot]
        self._spent_view[slot] = spent
        had = self._pii[slot]
        if had != pii:
            self._pii_total += pii - had
            self._pii_view[slot] = pii
        self._limit_view[slot] = _NAN if limit is None else limit
        if code != _RUNNING:  # running agents are never purged: their time is not needed
            self._changed_view[slot] = now

    def _view_columns(self) -> None:
        self._spent_view = _floats(self._spent)
        self._pii_view = _ints(self._pii)
        self._limit_view = _floats(self._limit)
        self._changed_view = _floats(self._changed)

    def _grow(self) -> None:
        """Add spare slots (an eighth more, at least 1,024), viewing the columns again."""
        extra = max(1024, self._size // 8)
        for view in (self._spent_view, self._pii_view, self._limit_view, self._changed_view):
            view.release()
        zeros = bytes(8 * extra)
        for column in (self._spent, self._pii, self._limit, self._changed):
            column.frombytes(zeros)
        self._status.extend(b"\xff" * extra)  # _FREE
        self._view_columns()

    def _insert(self, key: int, code: int, spent: float, pii: int, limit: float | None, now: float) -> None:
        if self._free:
            slot = self._free.pop()
        else:
            if self._size == len(self._status):
                self._grow()
            slot = self._size
            self._size = slot + 1
        self._status[slot] = code
        self._spent_view[slot] = spent
        self._pii_view[slot] = pii
        self._limit_view[slot] = _NAN if limit is None else limit
        self._changed_view[slot] = now
        self._index[key] = slot
        self._counts[code] += 1
        self._spent_total += spent
        self._pii_total += pii

    def save(self, state: AgentState, now: float) -> None:
        key = _int_of(state.agent_id)
        code = _CODE[state.status._value_]
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                self._insert(key, code, state.budget_spent, state.pii_detections, state.budget_limit, now)
            else:
                self._write(slot, code, state.budget_spent, state.pii_detections, state.budget_limit, now)

    def manager_methods(self) -> dict[str, Callable[..., Any]]:
        if type(self) is not MemoryBackend:
            return {}  # a subclass may change how states are kept: it gets the generic path
        return {"save_agent_state": self._save_agent_state, "get_agent_state": self._get_agent_state}

    def _save_slow(self, state: object) -> None:
        """Save what needs copying (a subclass) or normalising (ints), or raise the precise error."""
        self.save(check_state(state), _time())

    def _save_agent_state(self, state: object) -> None:
        """Insert or replace the agent's state; an invalid state raises and stores nothing."""
        # StateManager.save_agent_state and the store's write in one call (manager_methods).
        # Each field is read once and those values are checked and stored, so a thread changing
        # ``state`` meanwhile cannot slip an invalid value past the checks. A status is
        # checked by identity first: most agents are running.
        if type(state) is not AgentState:
            self._save_slow(state)
            return
        agent_id = state.agent_id
        status: object = state.status  # whatever was assigned since, checked below
        spent = state.budget_spent
        pii = state.pii_detections
        limit = state.budget_limit
        if status is _RUNNING_STATUS:
            code = _RUNNING
        elif type(status) is AgentStatus:
            code = _CODE[status._value_]
        else:
            self._save_slow(state)
            return
        if not (
            type(agent_id) is AgentId
            and type(spent) is float
            and 0.0 <= spent < _INF
            and type(pii) is int
            and 0 <= pii < MAX_COUNT
            and (limit is None or (type(limit) is float and 0.0 <= limit < _INF))
        ):
            self._save_slow(state)
            return
        lock = self._lock
        lock.acquire()  # acquire/release costs half of what ``with`` does on CPython 3.11
        try:
            slot = self._index.get(_int_of(agent_id))
            if slot is None:
                self._insert(_int_of(agent_id), code, spent, pii, limit, _time())
                # Later lookups by the id's text then get this AgentId from the parse cache,
                # whose int is our key itself: the index matches it by identity, without
                # reading a second copy of the number.
                pass
                return
            # _write, inlined: this is the hottest write path.
            old = self._status[slot]
            if old != code:
                counts = self._counts
                counts[old] -= 1
                counts[code] += 1
                self._status[slot] = code
            self._spent_total += spent - self._spent[slot]
            self._spent_view[slot] = spent
            had = self._pii[slot]
            if had != pii:
                self._pii_total += pii - had
                self._pii_view[slot] = pii
            self._limit_view[slot] = _NAN if limit is None else limit
            if code:  # not running (_RUNNING is 0): only then is the change time kept
                self._changed_view[slot] = _time()
        finally:
            lock.release()

    def save_many(self, states: Sequence[AgentState], now: float) -> None:
        with self._lock:
            for state in states:
                self.save(state, now)

    def get(self, key: str) -> AgentState | None:
        agent_id = parse_canonical(key)
        if agent_id is None:
            return None
        # The hottest path: read the columns under the lock, build the copy outside it.
        # acquire/release costs half of what ``with`` does on CPython 3.11.
        lock = self._lock
        lock.acquire()
        try:
            slot = self._index.get(_int_of(agent_id))
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

    def _get_agent_state(self, agent_id: str | AgentId) -> AgentState | None:
        """An independent copy of the agent's state; ``None`` if absent or not a valid id."""
        # StateManager.get_agent_state and get in one call (see manager_methods). An id's text
        # seen before leads straight to its slot (_by_text): one lookup instead of two.
        if type(agent_id) is not str:
            parsed = try_parse(agent_id)
            return None if parsed is None else self.get(parsed)
        lock = self._lock
        lock.acquire()  # acquire/release costs half of what ``with`` does on CPython 3.11
        try:
            hit = self._by_text.get(agent_id)
            if hit is not None:
                aid, slot = hit
            else:
                # A text not seen lately: parse it (a wrong length fails at once) and remember
                # it. The parse cache is left alone: _by_text caches these texts already.
                found = parse_canonical(agent_id)
                if found is None:
                    return None
                known = self._index.get(_int_of(found))
                if known is None:
                    return None
                aid, slot = found, known
                by_text = self._by_text
                if len(by_text) >= _BY_TEXT_MAX:
                    by_text.clear()  # bounded: a fleet larger than this re-learns its texts
                by_text[agent_id] = (aid, slot)
            code = self._status[slot]
            spent = self._spent[slot]
            pii = self._pii[slot]
            limit = self._limit[slot]
        finally:
            lock.release()
        state: AgentState = _new_state(AgentState)  # as in get, inlined
        state.agent_id = aid
        state.status = _STATUSES[code]
        state.budget_spent = spent
        state.pii_detections = pii
        state.budget_limit = None if limit != limit else limit
        return state

    def get_many(self, keys: Sequence[str]) -> list[AgentState | None]:
        index = self._index
        with self._lock:
            out: list[AgentState | None] = []
            for key in keys:
                agent_id = parse_canonical(key)
                slot = None if agent_id is None else index.get(_int_of(agent_id))
                if agent_id is None or slot is None:
                    out.append(None)
                    continue
                out.append(None if slot is None else self._state(agent_id, slot))
            return out

    def remove(self, agent_id: AgentId) -> bool:
        key = _int_of(agent_id)
        with self._lock:
            slot = self._index.pop(key, None)
            if slot is None:
                return False
            self._by_text.pop(agent_id._value, None)  # the slot may go to another agent
            self._holds.pop(key, None)
            self._counts[self._status[slot]] -= 1
            self._pii_total -= self._pii[slot]
            if self._index:
                self._spent_total -= self._spent[slot]
            else:
                self._spent_total = 0.0  # no drift left behind once the store is empty
            self._status[slot] = _FREE
            self._spent_view[slot] = 0.0
            self._pii_view[slot] = 0
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
                    batch.append(self._state(AgentId._trusted(_id_str(key)), slot))
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
        slot = self._index.get(_int_of(agent_id))
        if slot is None:
            raise AgentNotFound(agent_id.as_str())
        return slot

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> AgentState:
        with self._lock:
            slot = self._slot(agent_id)
            new = fn(self._state(agent_id, slot))
            code = _CODE[new.status._value_]
            self._write(slot, code, new.budget_spent, new.pii_detections, new.budget_limit, now)
            return new.copy()

    # -- atomic counters ---------------------------------------------------------------------
    # The hot paths take the lock with acquire/release (half the cost of ``with`` on CPython
    # 3.11), check the limit with exceeds()'s rule inlined, and build results outside the lock.

    def _open_holds(self, key: int, now: float) -> float:
        """Sum of the agent's unexpired holds, dropping the expired ones."""
        holds = self._holds.get(key)
        if holds is None:
            return 0.0
        if isinstance(holds, tuple):
            if now < holds[2]:
                return holds[1]
            del self._holds[key]
            return 0.0
        total = holds.expire(now)
        if not holds.amounts:
            del self._holds[key]
        return total

    def _not_running(self, agent_id: AgentId, code: int, action: str) -> AgentNotRunning:
        return AgentNotRunning(agent_id.as_str(), _STATUSES[code].value, action)

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> SpendResult:
        key = _int_of(agent_id)
        lock = self._lock
        lock.acquire()
        try:
            slot = self._index.get(key)
            if slot is None:
                raise AgentNotFound(agent_id.as_str())
            code = self._status[slot]
            if code != _RUNNING:
                raise self._not_running(agent_id, code, "record spend")
            spent = self._spent[slot]
            limit = self._limit[slot]
            reserved = self._open_holds(key, now) if key in self._holds else 0.0
            total = spent + reserved + amount
            # exceeds(total, limit), inlined; a NaN limit (none) never compares true.
            exceeded = total > limit + _TOLERANCE * (limit if limit > 1.0 else 1.0)
            if not exceeded:
                spent += amount
                self._spent_view[slot] = spent
                self._spent_total += amount
            pii = self._pii[slot]
        finally:
            lock.release()
        state = AgentState._trusted(agent_id, _RUNNING_STATUS, spent, pii, None if limit != limit else limit)
        return SpendResult(state, exceeded, reserved)

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> AgentState:
        with self._lock:
            slot = self._slot(agent_id)
            self._pii_view[slot] = self._pii[slot] + count
            self._pii_total += count
            if self._status[slot] != _RUNNING:
                self._changed_view[slot] = now
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
            self._changed_view[slot] = now
            return _STATUSES[old], self._state(agent_id, slot)

    # -- reservations ----------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Reservation | SpendResult:
        key = _int_of(agent_id)
        lock = self._lock
        lock.acquire()
        try:
            slot = self._index.get(key)
            if slot is None:
                raise AgentNotFound(agent_id.as_str())
            code = self._status[slot]
            if code != _RUNNING:
                raise self._not_running(agent_id, code, "reserve budget")
            holds = self._holds.get(key)
            if holds is None:
                reserved = 0.0
            else:
                reserved = self._open_holds(key, now)
                holds = self._holds.get(key)  # gone if every hold had expired
            limit = self._limit[slot]
            total = self._spent[slot] + reserved + amount
            if total > limit + _TOLERANCE * (limit if limit > 1.0 else 1.0):  # exceeds(), inlined
                return SpendResult(self._state(agent_id, slot), exceeded=True, reserved=reserved)
            expires_at = now + ttl
            if holds is None:
                self._holds[key] = (reservation_id, amount, expires_at)
            elif isinstance(holds, tuple):
                more = self._holds[key] = _Holds(holds)
                more.add(reservation_id, amount, expires_at)
            else:
                holds.add(reservation_id, amount, expires_at)
        finally:
            lock.release()
        return Reservation._trusted(reservation_id, agent_id, amount, expires_at)

    def _take_hold(self, reservation: Reservation, now: float, action: str) -> None:
        """Drop the reservation's hold; ``ReservationError`` if it is not open."""
        key = _int_of(reservation.agent_id)
        holds = self._holds.get(key)
        if isinstance(holds, tuple):
            if holds[0] != reservation.reservation_id:
                raise _not_open(reservation, action)
            del self._holds[key]
            expires_at = holds[2]
        else:
            entry = None if holds is None else holds.amounts.pop(reservation.reservation_id, None)
            if holds is None or entry is None:
                raise _not_open(reservation, action)
            if holds.amounts:
                holds.total -= entry[0]
            else:
                del self._holds[key]
            expires_at = entry[1]
        if expires_at <= now:  # it had expired: dropped as expiry would, but it was not open
            raise _not_open(reservation, action)

    def commit(self, reservation: Reservation, actual: float, now: float) -> CommitResult:
        agent_id = reservation.agent_id
        lock = self._lock
        lock.acquire()
        try:
            key = _int_of(agent_id)
            holds = self._holds.get(key)
            if isinstance(holds, tuple) and holds[0] == reservation.reservation_id and now < holds[2]:
                del self._holds[key]  # the common case of _take_hold, inlined
            else:
                self._take_hold(reservation, now, "commit")
            slot = self._index.get(key)
            if slot is None:  # not reached: removing an agent drops its holds first
                raise AgentNotFound(agent_id.as_str())
            spent = self._spent[slot] + actual
            self._spent_view[slot] = spent
            self._spent_total += actual
            code = self._status[slot]
            if code != _RUNNING:
                self._changed_view[slot] = now
            pii = self._pii[slot]
            limit = self._limit[slot]
        finally:
            lock.release()
        exceeded = spent > limit + _TOLERANCE * (limit if limit > 1.0 else 1.0)  # exceeds(), inlined
        state = AgentState._trusted(agent_id, _STATUSES[code], spent, pii, None if limit != limit else limit)
        return CommitResult(state, exceeded)

    def release(self, reservation: Reservation, now: float) -> None:
        lock = self._lock
        lock.acquire()
        try:
            self._take_hold(reservation, now, "release")
        finally:
            lock.release()

    def reserved(self, agent_id: AgentId, now: float) -> tuple[AgentState, float]:
        with self._lock:
            slot = self._slot(agent_id)
            return self._state(agent_id, slot), self._open_holds(_int_of(agent_id), now)

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
                agent_id = AgentId._trusted(_id_str(key))
                self.remove(agent_id)
                removed.append(agent_id.as_str())
        return removed

    def close(self) -> None:
        """Nothing to release: the data lives as long as this object."""


def _not_open(reservation: Reservation, action: str) -> ReservationError:
    return ReservationError(
        f"cannot {action} reservation {reservation.reservation_id}: it is not open "
        "(already committed or released, expired after its ttl, or its agent was "
        "removed); if money was spent after the hold expired, record it with record_spend"
    )


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


def _int_of(agent_id: AgentId) -> int:
    return int(agent_id.as_str()[6:].replace("-", ""), 16)
