"""The Redis store's operations, written once for the sync and the asyncio driver, with no I/O.

Each operation is a generator (an :data:`Op`) with the name and arguments of the store contract
(:class:`~iron_runtime_state.backends.base.Backend`): it yields requests, receives their
replies, and returns the result; a driver only carries the requests to Redis and back::

    def get(self, key):                                  # here
        reply = yield Call(slot, ("HMGET", ...), True, "read an agent")
        return decode_state(AgentId._trusted(key), reply)

    store.get(key)        # sync.py: derived, self._drive(self.ops.get(key))
    await store.get(key)  # aio.py: store.call("get", key), which drives the same generator

Requests: :class:`~.policy.Call` (one command; the reply), :class:`Batch` (commands that
are safe to repeat, pipelined per server; the replies in order), :class:`Pause` (back off for a
moment while another client wins a compare-and-set) and, in the two iterators only,
:class:`Emit` (items for the consumer). So the compare-and-set loops of ``update`` and of audit
appends, the paging of walks, queries, prunes and purges, and every encoding and decoding exist
once, whatever drives them. A driver that raises while a request is out closes the operation
(``close()``), so an operation can clean up in ``except BaseException``.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Generator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

from ...audit_chain import AuditChain, AuditRow
from ...errors import AgentNotFound, BackendError, StateError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from ..base import AuditQuery, CommitResult, SpendResult, UpdateFn
from .decode import (
    decode_agent_id,
    decode_audit_row,
    decode_commit,
    decode_head,
    decode_pii,
    decode_query_rows,
    decode_reserve,
    decode_reserved,
    decode_spend,
    decode_state,
    decode_stats,
    decode_status,
    reservation_error,
    row_to_record,
)
from .keys import GroupWalk, RedisLayout, Routed
from .policy import Call, RetryPolicy, rexc
from .scripts import ScriptCall
from .url import RedisConfig

__all__ = ["Batch", "Call", "Emit", "Op", "Pause", "RedisOps", "RedisStore", "Request"]

_T = TypeVar("_T")


class Batch(NamedTuple):
    """Commands that are safe to repeat, pipelined per server; the reply is the list of replies."""

    items: Sequence[Routed]
    what: str


class Pause(NamedTuple):
    """Back off before trying again (another client won a compare-and-set)."""

    seconds: float


class Emit(NamedTuple):
    """Items an iterator hands to its consumer (the reply is ``None``)."""

    items: list[Any]


Request = Call | Batch | Pause | Emit
#: An operation: yields requests, receives their replies, returns its result.
Op = Generator[Request, Any, _T]


def _script(call: ScriptCall, idempotent: bool, what: str) -> Call:
    """Run a script: ``EVALSHA`` (the drivers fall back to ``EVAL`` when the server lacks it)."""
    return Call(call.slot, call.command(), idempotent, what)


def _seal(events: Sequence[AuditEvent], chain: AuditChain, head: tuple[int, str]) -> list[AuditRecord]:
    """The records of ``events`` sealed into the chain on top of ``head``."""
    seq, prev = head
    records: list[AuditRecord] = []
    for event in events:
        seq += 1
        digest = chain.seal(
            prev, seq, event.agent_id.as_str(), event.event_type, event.timestamp, event.details
        )
        records.append(AuditRecord(seq, event, digest, prev))
        prev = digest
    return records


def _contended(started: float, timeout: float, attempt: int) -> Pause | None:
    """After losing a compare-and-set: ``None`` to give up, else the pause before the next try.

    Others keep winning after a few tries: step aside for a moment, longer each time.
    """
    if time.monotonic() - started > max(10.0, timeout):
        return None
    return Pause(random.random() * 0.001 * min(attempt, 20) if attempt >= 2 else 0.0)


class RedisOps:
    """Every operation of the Redis store, over one namespace's layout.

    Holds the only state the operations share: the audit head this process saw last, so a lone
    writer appends in one round trip.
    """

    def __init__(self, layout: RedisLayout, timeout: float) -> None:
        self.layout = layout
        self._timeout = timeout
        self._head: tuple[int, str] | None = None
        self._stats_commands = layout.stats_commands()

    def prepare(self) -> Op[None]:
        """Check that the namespace uses this version's key layout (once per store)."""
        call = self.layout.meta_check()
        self.layout.check_meta((yield _script(call, True, "check the namespace")))

    # -- agent states --------------------------------------------------------------------------

    def save(self, state: AgentState, now: float) -> Op[None]:
        """See ``Backend.save``."""
        yield _script(self.layout.save(state, now), True, "save an agent state")

    def save_many(self, states: Sequence[AgentState], now: float) -> Op[None]:
        """See ``Backend.save_many``."""
        calls = [self.layout.save(state, now) for state in states]
        yield Batch([(c.slot, c.command()) for c in calls], "save agent states")

    def get(self, key: str) -> Op[AgentState | None]:
        """See ``Backend.get``."""
        read = self.layout.get_command(key)
        if read is None:
            return None
        reply = yield Call(*read, True, "read an agent")
        return decode_state(AgentId._trusted(key), reply)

    def get_many(self, keys: Sequence[str]) -> Op[list[AgentState | None]]:
        """See ``Backend.get_many``: one pipelined read."""
        reads = [self.layout.get_command(key) for key in keys]
        replies = iter((yield Batch([r for r in reads if r is not None], "read agent states")))
        return [
            None if read is None else decode_state(AgentId._trusted(key), next(replies))
            for key, read in zip(keys, reads, strict=True)
        ]

    def remove(self, agent_id: AgentId) -> Op[bool]:
        """See ``Backend.remove``."""
        return bool((yield _script(self.layout.remove(agent_id), False, "remove an agent")) == 1)

    def _walk_round(self, walk: GroupWalk) -> Op[list[tuple[int, bytes]]]:
        """The next round of a walk over the groups' id sets: one pipelined read per server."""
        return walk.advance((yield Batch(walk.commands(), "list agents")))

    def list_ids(self) -> Op[list[str]]:
        """See ``Backend.list_ids``."""
        walk = GroupWalk(self.layout, self.layout.list_batch)
        ids: list[str] = []
        while not walk.done:
            ids += [agent.decode() for _, agent in (yield from self._walk_round(walk))]
        return ids

    def iter_states(self, status: AgentStatus | None, batch_size: int) -> Op[None]:
        """See ``Backend.iter_states`` (an iterator: the states come as :class:`Emit`)."""
        walk = GroupWalk(self.layout, max(batch_size, 100))
        while not walk.done:
            batch = yield from self._walk_round(walk)
            for start in range(0, len(batch), batch_size):
                # Ids read back are checked: garbage in the id set is a SchemaError, not a miss.
                keys = [decode_agent_id(agent).as_str() for _, agent in batch[start : start + batch_size]]
                states = yield from self.get_many(keys)
                yield Emit([s for s in states if s is not None and (status is None or s.status is status)])

    def stats(self) -> Op[FleetStats]:
        """See ``Backend.stats``."""
        return decode_stats((yield Batch(self._stats_commands, "read fleet statistics")))

    def update(self, agent_id: AgentId, fn: UpdateFn, now: float) -> Op[AgentState]:
        """See ``Backend.update``: read, apply ``fn``, store if unchanged meanwhile, else again."""
        lay = self.layout
        command = lay.get_command(agent_id.as_str())
        assert command is not None  # an id always has a group
        read = Call(*command, True, "read an agent")
        started = time.monotonic()
        for attempt in itertools.count():
            fields = yield read
            current = decode_state(agent_id, fields)
            if current is None:
                raise AgentNotFound(agent_id.as_str())
            new = fn(current)
            result = yield _script(lay.update(fields, new, now), False, "update an agent")
            if result == 1:
                return new.copy()
            if result == -1:
                raise AgentNotFound(agent_id.as_str())
            pause = _contended(started, self._timeout, attempt)
            if pause is None:
                break
            if pause.seconds:
                yield pause
        raise BackendError(
            f"update_agent_state of {agent_id} kept losing to concurrent writers for "
            f"{time.monotonic() - started:.0f} s; retry later"
        )

    # -- atomic counters ------------------------------------------------------------------------

    def record_spend(self, agent_id: AgentId, amount: float, now: float) -> Op[SpendResult]:
        """See ``Backend.record_spend``."""
        call = self.layout.record_spend(agent_id, amount, now)
        return decode_spend(agent_id, (yield _script(call, False, "record spend")))

    def record_pii(self, agent_id: AgentId, count: int, now: float) -> Op[AgentState]:
        """See ``Backend.record_pii``."""
        call = self.layout.record_pii(agent_id, count, now)
        return decode_pii(agent_id, (yield _script(call, False, "record PII detections")))

    def set_status(
        self, agent_id: AgentId, status: AgentStatus, now: float
    ) -> Op[tuple[AgentStatus, AgentState]]:
        """See ``Backend.set_status``."""
        call = self.layout.set_status(agent_id, status, now)
        return decode_status(agent_id, (yield _script(call, False, "set a status")))

    # -- reservations -----------------------------------------------------------------------------

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str
    ) -> Op[Reservation | SpendResult]:
        """See ``Backend.reserve``.

        Holds expire by the Redis server's clock (one clock for every client host), so the
        client's ``now`` is not needed.
        """
        call = self.layout.reserve(agent_id, amount, ttl, reservation_id)
        reply = yield _script(call, False, "reserve budget")
        return decode_reserve(agent_id, amount, reservation_id, reply)

    def commit(self, reservation: Reservation, actual: float, now: float) -> Op[CommitResult]:
        """See ``Backend.commit``."""
        call = self.layout.commit(reservation, actual, now)
        return decode_commit(reservation, (yield _script(call, False, "commit a reservation")))

    def release(self, reservation: Reservation, now: float) -> Op[None]:
        """See ``Backend.release`` (a hold's expiry is the server's business: ``now`` is unused)."""
        if (yield _script(self.layout.release(reservation), False, "release a reservation")) != 1:
            raise reservation_error(reservation, "release")

    def reserved(self, agent_id: AgentId, now: float) -> Op[tuple[AgentState, float]]:
        """See ``Backend.reserved`` (holds expire by the server's clock: ``now`` is unused)."""
        return decode_reserved(agent_id, (yield _script(self.layout.reserved(agent_id), True, "read holds")))

    # -- audit trail ------------------------------------------------------------------------------

    def audit_anchor(self) -> Op[tuple[int, str]]:
        """See ``Backend.audit_anchor``."""
        return (yield from self._read_head(anchor=True))

    def audit_head(self) -> Op[tuple[int, str]]:
        """See ``Backend.audit_head``."""
        return (yield from self._read_head(anchor=False))

    def _read_head(self, anchor: bool) -> Op[tuple[int, str]]:
        slot, command = self.layout.head_command(anchor)
        return decode_head((yield Call(slot, command, True, "read the audit head")))

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> Op[list[AuditRecord]]:
        """See ``Backend.append_audit``: seal on the head last seen, append if it is still the head.

        Another process that appended first moves the head: the script returns the new one, and
        the events are sealed again on top of it.
        """
        if not events:
            return []
        head = self._head or (yield from self.audit_head())
        started = time.monotonic()
        for attempt in itertools.count():
            records = _seal(events, chain, head)
            call = self.layout.append_audit(events, [r.hash for r in records], head)
            try:
                reply = yield _script(call, False, "append to the audit trail")
            except BaseException:  # the head is unknown now (GeneratorExit included)
                self._head = None
                raise
            if reply[0] == 1:
                self._head = (records[-1].seq, records[-1].hash)
                return records
            head = (int(reply[1]), reply[2].decode())
            pause = _contended(started, self._timeout, attempt)
            if pause is None:
                break
            if pause.seconds:
                yield pause
        self._head = None
        raise BackendError("appending to the audit trail kept losing to concurrent appenders; retry later")

    def query_audit(self, query: AuditQuery) -> Op[list[AuditRecord]]:
        """See ``Backend.query_audit``: pages of at most ``query_budget`` candidates per script call."""
        limit = query.limit
        if limit == 0:
            return []
        lay = self.layout
        after = query.after_seq or 0
        rows: list[AuditRow] = []
        while True:
            want = lay.query_budget if limit is None else limit - len(rows)
            call = lay.query_audit(query.agent_id, query.event_type, query.since, query.until, after, want)
            reply = yield _script(call, True, "query the audit trail")
            rows += decode_query_rows(reply)
            if reply[1] == 1 or (limit is not None and len(rows) >= limit):
                break
            after = int(reply[0])
        return [row_to_record(row) for row in rows]

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Op[None]:
        """See ``Backend.iter_audit_rows`` (an iterator: the rows come as :class:`Emit`)."""
        lay = self.layout
        start: bytes | str = str(after_seq + 1)
        while True:
            command = ("XRANGE", lay.audit_log, start, "+", "COUNT", batch_size)
            entries = yield Call(lay.audit_slot, command, True, "read the audit trail")
            yield Emit([decode_audit_row(entry_id, fields) for entry_id, fields in entries])
            if len(entries) < batch_size:
                return
            start = b"(" + entries[-1][0]

    def audit_count(self) -> Op[int]:
        """See ``Backend.audit_count``."""
        lay = self.layout
        return int((yield Call(lay.audit_slot, ("XLEN", lay.audit_log), True, "count audit records")))

    def prune_audit(self, before: int) -> Op[int]:
        """See ``Backend.prune_audit``: chunks of ``prune_chunk`` records, then the indexes."""
        total = 0
        while True:
            call = self.layout.prune_audit(before)
            removed, done = yield _script(call, False, "prune the audit trail")
            total += int(removed)
            if done or not removed:
                break
        if total:
            yield from self._clean_audit_indexes()
        return total

    def _clean_audit_indexes(self) -> Op[None]:
        """Drop pruned seqs from the per-agent and per-type indexes, a batch at a time."""
        lay = self.layout
        anchor = (yield from self.audit_anchor())[0]
        cursor: bytes | int = 0
        while True:
            command = ("SSCAN", lay.audit_indexes, cursor, "COUNT", 200)
            cursor, keys = yield Call(lay.audit_slot, command, True, "list audit indexes")
            if keys:
                call = lay.prune_indexes([k.decode() for k in keys], anchor)
                yield _script(call, True, "clean audit indexes")
            if int(cursor) == 0:
                return

    def purge_agents(self, statuses: Sequence[AgentStatus], changed_before: float) -> Op[list[str]]:
        """See ``Backend.purge_agents``."""
        wanted = tuple(dict.fromkeys(statuses))
        if not wanted:
            return []
        lay = self.layout
        removed: list[str] = []
        if AgentStatus.RUNNING in wanted:
            # Running agents are not indexed by change time: consider every agent.
            walk = GroupWalk(lay, lay.purge_chunk)
            while not walk.done:
                by_group: dict[int, list[str]] = {}
                for g, agent in (yield from self._walk_round(walk)):
                    by_group.setdefault(g, []).append(agent.decode())
                for g, ids in by_group.items():
                    removed += yield from self._purge(g, ids, wanted, changed_before)
            return removed
        # Candidates come from each group's index of finished agents, a chunk at a time; those
        # the script keeps (another status) are skipped by the offset next time.
        offsets = dict.fromkeys(range(lay.groups), 0)
        while offsets:
            replies = yield Batch(lay.finished_commands(offsets, changed_before), "find agents to purge")
            pending, offsets = offsets, {}
            for (g, offset), candidates in zip(pending.items(), replies, strict=True):
                if not candidates:
                    continue
                gone = yield from self._purge(g, [c.decode() for c in candidates], wanted, changed_before)
                removed += gone
                if len(candidates) == lay.purge_chunk:
                    offsets[g] = offset + len(candidates) - len(gone)
        return removed

    def _purge(
        self, group: int, ids: list[str], statuses: Sequence[AgentStatus], cutoff: float
    ) -> Op[list[str]]:
        reply = yield _script(self.layout.purge(group, ids, statuses, cutoff), False, "purge agents")
        return [agent.decode() for agent in reply]


class RedisStore:
    """What both drivers hold for one store: its settings, key layout, operations and policy.

    The sync and the asyncio driver add only how they carry requests to Redis and back.
    """

    #: Driver exception types that the store contract's wrapper maps with :meth:`map_driver_error`.
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (rexc.RedisError,)

    def __init__(self, config: RedisConfig) -> None:
        """The store ``config`` describes; nothing connects until the first call."""
        self._config = config
        self._layout = RedisLayout(config.namespace)
        #: Every operation of the store, as I/O-free generators.
        self.ops = RedisOps(self._layout, config.timeout)
        self._policy = RetryPolicy(config)
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
