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
are safe to repeat, pipelined per server; the replies in order), :class:`Gather` (reads sent
once per server, a failed server's error as its replies), :class:`Pause` (back off for a
moment while another client wins a compare-and-set) and, in the two iterators only,
:class:`Emit` (items for the consumer). So the compare-and-set loops of ``update`` and of audit
appends, the paging of walks, queries, prunes and purges, and every encoding and decoding exist
once, whatever drives them. A driver that raises while a request is out closes the operation
(``close()``), so an operation can clean up in ``except BaseException``.

A change and its audit event are one write
------------------------------------------
A refused spend or hold, a commit past the limit, a PII count and a real status change each
imply an audit event. An agent's keys live in its group's slot and the trail in a slot of its
own, and one script cannot write two slots of a Redis Cluster; nor can a script seal the event:
the hash chain is keyed with the audit key, which never reaches Redis. So the change's script
queues the event, as raw values, in its group's *outbox* (a stream in the group's slot): the
change and its pending event are stored together or not at all. The client then *drains* the
outbox: it builds the events in Python (:func:`.decode.outbox_event`, with ``events.py``: the
same details, to the digit, as every other store writes), seals them onto the trail's head and
appends them with ``append_audit.lua``, then trims them from the outbox (in the same script on a
standalone server, where every key is on one server; with one more command on a cluster).

The drain is idempotent by outbox entry: the trail keeps each group's *mark*, the id of the
group's last entry appended. Entries are appended in id order and a batch whose first entry is
not past the mark is refused (like a moved head, with the mark in the reply), so however often a
drain is repeated, and by however many processes at once, no entry is appended twice. A caller
whose own entry another process appended gets its record from the reply (the trail remembers
where the newest :data:`~.scripts.LANDED_KEEP` outbox entries landed).

A reply lost after the server ran a change must not let a resend count it twice. Each change
script runs once per *op key*: the client names every call with a random id, the script keeps its
reply under that key for the call's ``timeout`` plus :data:`~.keys.OP_TTL_MARGIN`, and a resend of
the call gets the first reply back and changes nothing. So the drivers resend a change after a
lost reply as they resend a read. Only a server away for the whole ``timeout`` ends the call with
``BackendUnavailable`` (outcome unknown); the change and its event were then made together or
not at all, and the trail shows which.

A process killed between the change and the drain leaves the event in the outbox. It is appended
by the next drain of its group (a change that queues an event drains its group's outbox, oldest
first, before its own), by the first write of every store object (so a restarted process sweeps
every outbox with a :class:`Gather`, passing over a server it cannot reach), and before
every audit read (``audit_marks``, ``audit_count``, ``iter_audit_rows``, ``query_audit``) of a
store object that has written, with the chain it last sealed with. A store object that never
wrote does not drain: it has no key to seal with, and a reader without the key must not append
to a keyed trail. So a reader may briefly see a change whose event is still in an outbox; never
an event without its change.

Round trips: a change that implies no event takes one, as before; with its event, two on a
standalone server and three on a cluster.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

from ...audit_chain import AuditChain, AuditRow
from ...errors import AgentNotFound, BackendError, StateError
from ...ids import AgentId
from ...models import AgentState, AgentStatus, AuditEvent, AuditRecord, FleetStats, Reservation
from ..base import AuditMarks, AuditQuery, Change, CommitResult, SpendResult, UpdateFn
from ..head_watch import HeadWatch
from .decode import (
    Queued,
    decode_agent_id,
    decode_audit_row,
    decode_commit,
    decode_head,
    decode_marks,
    decode_pii,
    decode_query_rows,
    decode_reserve,
    decode_reserved,
    decode_spend,
    decode_state,
    decode_stats,
    decode_status,
    outbox_event,
    reservation_error,
    row_to_record,
)
from .index import build_status_sets, build_time_index
from .keys import GroupWalk, Origin, RedisLayout
from .policy import RetryPolicy, rexc
from .requests import Batch, Call, Emit, Gather, Op, Pause, Request
from .scripts import OUTBOX_BATCH, ScriptCall
from .url import RedisConfig

__all__ = ["Batch", "Call", "Emit", "Gather", "Op", "Pause", "RedisOps", "RedisStore", "Request"]


class _Appended(NamedTuple):
    """What an append did: the records it wrote, the caller's own record, the group's mark."""

    records: list[AuditRecord]
    own: AuditRecord | None  # the record of the origin's ``own`` entry, whoever appended it
    mark: bytes | None  # the id of the group's last outbox entry in the trail, when known


def _script(call: ScriptCall, idempotent: bool, what: str) -> Call:
    """Run a script: ``EVALSHA`` (the drivers fall back to ``EVAL`` when the server lacks it)."""
    return Call(call.slot, call.command(), idempotent, what)


def _once(call: ScriptCall, what: str) -> Call:
    """Run a script that changes state once however often it is sent (by op key, or by outbox
    marks): resent after a lost reply, and an unknown outcome if every resend goes unanswered."""
    return Call(call.slot, call.command(), True, what, changes=True)


def _op_id() -> str:
    """A fresh name for one call of a change script (its op key): random, so forked processes
    and hosts never share one."""
    return os.urandom(9).hex()


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id ``<ms>-<n>`` as numbers, to compare ids."""
    ms, _, n = entry_id.partition(b"-")
    return int(ms), int(n)


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

    Holds the only state the operations share: the audit head this process saw last (so a lone
    writer appends in one round trip, and an append notices a head that went back), and the
    chain it last sealed with (to drain outboxes before audit reads; see the module docstring).
    """

    def __init__(self, layout: RedisLayout, timeout: float, cluster: bool = False) -> None:
        self.layout = layout
        self._timeout = timeout
        #: Whether the keys spread over masters: outboxes are then trimmed by a command of their own
        #: (their slot is not the trail's), and ``stats`` pipelines its reads.
        self._cluster = cluster
        #: The highest head this store object saw or wrote (as ``_watch`` keeps it, but readable).
        #: An append seals on it first, so a lone writer appends in one round trip; and compares
        #: the head it finds with the one known *before* it asked, so that a head another thread
        #: moved meanwhile is not taken for a rewind.
        self._head: tuple[int, str] | None = None
        self._watch = HeadWatch()
        #: The chain this store object last sealed with: audit reads drain the outboxes with it.
        self._chain: AuditChain | None = None
        self._swept = False  # this store object drained every outbox once, at its first write
        self._stats_commands = layout.stats_commands()
        self._stats_script = layout.stats_script()

    def prepare(self) -> Op[None]:
        """Check that the namespace uses this version's key layout (once per store)."""
        call = self.layout.meta_check()
        if not self.layout.check_meta((yield _script(call, True, "check the namespace"))):
            yield from build_status_sets(self.layout)  # a namespace written before them

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
        walk = GroupWalk(self.layout, max(batch_size, 100), status=status)
        while not walk.done:
            batch = yield from self._walk_round(walk)
            for start in range(0, len(batch), batch_size):
                # Ids read back are checked: garbage in the id set is a SchemaError, not a miss.
                keys = [decode_agent_id(agent).as_str() for _, agent in batch[start : start + batch_size]]
                states = yield from self.get_many(keys)
                # Checked again: an agent whose status changed since the walk read the set.
                yield Emit([s for s in states if s is not None and (status is None or s.status is status)])

    def stats(self) -> Op[FleetStats]:
        """See ``Backend.stats``: one script on a standalone server, one pipeline per master of a
        cluster (a script cannot read the slots of other masters)."""
        if self._cluster:
            return decode_stats((yield Batch(self._stats_commands, "read fleet statistics")))
        return decode_stats((yield _script(self._stats_script, True, "read fleet statistics")))

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

    # -- changes and their events -----------------------------------------------------------------
    # Each script runs once per op key (_op_id()), so it is resent after a lost reply (_once).

    def record_spend(
        self, agent_id: AgentId, amount: float, now: float, chain: AuditChain
    ) -> Op[SpendResult]:
        """See ``Backend.record_spend``."""
        call = self.layout.record_spend(agent_id, amount, now, _op_id())
        result, queued = decode_spend(agent_id, (yield from self._change(call, "record spend", chain)))
        result.records = yield from self._events(agent_id, queued, chain)
        return result

    def record_pii(
        self, agent_id: AgentId, count: int, now: float, event: AuditEvent, chain: AuditChain
    ) -> Op[Change]:
        """See ``Backend.record_pii``."""
        call = self.layout.record_pii(agent_id, count, now, event, _op_id())
        reply = yield from self._change(call, "record PII detections", chain)
        state, queued = decode_pii(agent_id, count, reply)
        return Change(state, (yield from self._events(agent_id, queued, chain)))

    def set_status(self, agent_id: AgentId, status: AgentStatus, now: float, chain: AuditChain) -> Op[Change]:
        """See ``Backend.set_status``."""
        call = self.layout.set_status(agent_id, status, now, _op_id())
        state, queued = decode_status(agent_id, (yield from self._change(call, "set a status", chain)))
        return Change(state, (yield from self._events(agent_id, queued, chain)))

    def reserve(
        self, agent_id: AgentId, amount: float, ttl: float, now: float, reservation_id: str, chain: AuditChain
    ) -> Op[Reservation | SpendResult]:
        """See ``Backend.reserve``.

        Holds expire by the Redis server's clock (one clock for every client host); the client's
        ``now`` only dates a refusal's event.
        """
        call = self.layout.reserve(agent_id, amount, ttl, now, reservation_id, _op_id())
        reply = yield from self._change(call, "reserve budget", chain)
        result, queued = decode_reserve(agent_id, amount, reservation_id, reply)
        if isinstance(result, SpendResult):
            result.records = yield from self._events(agent_id, queued, chain)
        return result

    def commit(
        self, reservation: Reservation, actual: float, now: float, chain: AuditChain
    ) -> Op[CommitResult]:
        """See ``Backend.commit``."""
        call = self.layout.commit(reservation, actual, now, _op_id())
        reply = yield from self._change(call, "commit a reservation", chain)
        result, queued = decode_commit(reservation, reply)
        result.records = yield from self._events(reservation.agent_id, queued, chain)
        return result

    def release(self, reservation: Reservation, now: float) -> Op[None]:
        """See ``Backend.release`` (a hold's expiry is the server's business: ``now`` is unused)."""
        call = self.layout.release(reservation, _op_id())
        if (yield _once(call, "release a reservation")) != 1:
            raise reservation_error(reservation, "release")

    def reserved(self, agent_id: AgentId, now: float) -> Op[tuple[AgentState, float]]:
        """See ``Backend.reserved`` (holds expire by the server's clock: ``now`` is unused)."""
        return decode_reserved(agent_id, (yield _script(self.layout.reserved(agent_id), True, "read holds")))

    def _change(self, call: ScriptCall, what: str, chain: AuditChain) -> Op[Any]:
        """Run a change script (once per op key: resent after a lost reply); the reply. The first
        write of this store object drains every outbox first."""
        if not self._swept:
            yield from self._first_use(chain)
        return (yield _once(call, what))

    def _events(self, agent_id: AgentId, queued: Queued | None, chain: AuditChain) -> Op[list[AuditRecord]]:
        """Append the event a change queued, if any (and, first, any older entry of its group's
        outbox: those of a writer that died, or of one draining too); the records of the change.

        Empty, too, when another process appended the event and its record can no longer be found
        (more than :data:`~.scripts.OUTBOX_BATCH` older entries waited before it, or more than
        :data:`~.scripts.LANDED_KEEP` records came from outboxes since): the event is in the
        trail, this call just cannot hand its record back.
        """
        if queued is None:
            return []
        group = self.layout.group_of(agent_id.as_str())
        mine = [queued.entry_id, queued.fields]
        entries: list[Any] = [mine]
        if queued.waiting > 1:
            entries = yield Call(*self.layout.outbox_oldest(group), True, "read an audit outbox")
            if len(entries) < OUTBOX_BATCH and all(entry_id != queued.entry_id for entry_id, _ in entries):
                # Another drain appended it and trimmed the outbox up to it: what is left is newer.
                # Offered first, it is refused by the group's mark, and the refusal carries its record.
                entries = [mine, *entries]
        own = yield from self._drain(group, entries, chain, queued.entry_id)
        return [] if own is None else [own]

    # -- outboxes -----------------------------------------------------------------------------------

    def _first_use(self, chain: AuditChain) -> Op[None]:
        """The first write of this store object: drain every outbox (what crashed writers left)."""
        yield from self._sweep(chain)
        self._chain = self._chain or chain
        self._swept = True

    def _sweep(self, chain: AuditChain) -> Op[None]:
        """Drain every group's outbox: one pipelined read per server, and a drain per group found
        with entries (none, unless a writer died between its change and its drain).

        A server that cannot be reached is passed over: its groups' changes cannot be read
        either, and the next sweep drains them.
        """
        pending = yield Gather(self.layout.outbox_commands())
        for group, entries in enumerate(pending):
            if entries and not isinstance(entries, BaseException):
                yield from self._drain(group, entries, chain)

    def _drain(
        self, group: int, entries: list[Any], chain: AuditChain, own: bytes | None = None
    ) -> Op[AuditRecord | None]:
        """Append a group's outbox entries to the trail, ``entries`` (the oldest) first, a batch at
        a time, and trim them; up to the ``own`` entry if given (else to the end). Returns the
        record of ``own``."""
        lay = self.layout
        mine: AuditRecord | None = None
        while entries:
            ids = [entry_id for entry_id, _ in entries]
            events = [outbox_event(fields) for _, fields in entries]
            appended = yield from self._append(events, chain, Origin(group, ids, own))
            mine = mine or appended.own
            if appended.mark is not None and (self._cluster or not appended.records):
                yield Call(*lay.outbox_trim(group, appended.mark), True, "trim an audit outbox")
            last = ids[-1]
            if len(entries) < OUTBOX_BATCH or (own is not None and _entry_order(own) <= _entry_order(last)):
                break
            entries = yield Call(*lay.outbox_after(group, last), True, "read an audit outbox")
        return mine

    # -- audit trail ------------------------------------------------------------------------------

    def _read_head(self) -> Op[tuple[int, str]]:
        head = decode_head((yield Call(*self.layout.head_command(), True, "read the audit head")))
        self._saw(head)
        return head

    def _saw(self, head: tuple[int, str]) -> None:
        """A head read from the store: the marks rise to it, never fall (a head below means
        records were lost, which the next append must see and report)."""
        if self._head is None or head[0] > self._head[0]:
            self._head = head
        self._watch.saw(head)

    def _wrote(self, head: tuple[int, str]) -> None:
        """A head this store object appended: the marks move to it (a rewind is reported once)."""
        self._head = head
        self._watch.wrote(head)

    def _rewound(self, found: tuple[int, str], highest: tuple[int, str] | None) -> list[AuditEvent]:
        """The ``audit_rewound`` record to append first when ``found``, the store's head, is
        behind ``highest``, the highest known before the store was asked (none otherwise)."""
        if highest is None or found[0] > highest[0] or found == highest:
            return []
        return self._watch.check(found, time.time())  # logs the warning, builds the record

    def append_audit(self, events: Sequence[AuditEvent], chain: AuditChain) -> Op[list[AuditRecord]]:
        """See ``Backend.append_audit``."""
        if not events:
            return []
        if not self._swept:
            yield from self._first_use(chain)
        return (yield from self._append(events, chain)).records

    def _append(
        self, events: Sequence[AuditEvent], chain: AuditChain, origin: Origin | None = None
    ) -> Op[_Appended]:
        """Seal ``events`` on the head last seen and append them if it is still the head.

        Another process that appended first moves the head: the script returns the new one, and
        the events are sealed again on top of it. A head below the highest this store object saw
        gets an ``audit_rewound`` record first (:class:`~..head_watch.HeadWatch`). Events from
        an outbox (``origin``) are appended at most once: those the group's mark shows appended
        already are dropped, so that resending this append is safe too.
        """
        lay = self.layout
        head = self._head or (yield from self._read_head())
        rewound: list[AuditEvent] = []
        ids = list(origin.entry_ids) if origin is not None else []
        mine: AuditRecord | None = None
        mark: bytes | None = None
        started = time.monotonic()
        for attempt in itertools.count():
            records = _seal([*rewound, *events], chain, head)
            last = records[-1]
            seal = chain.seal_mark("head", last.seq, last.hash)
            batch = [r.event for r in records]
            hashes = [r.hash for r in records]
            if origin is None:
                call = lay.append_audit(batch, hashes, head, seal)
            else:
                entry_ids = [b""] * len(rewound) + ids
                call = lay.append_audit(
                    batch, hashes, head, seal, origin._replace(entry_ids=entry_ids), trim=not self._cluster
                )
            # An append from outboxes is safe to resend (the marks); one of events given directly is not.
            what = "append to the audit trail"
            highest = self._head
            reply = yield _script(call, False, what) if origin is None else _once(call, what)
            if reply[0] == 1:
                self._wrote((last.seq, last.hash))
                self._chain = chain
                appended = records[len(rewound) :]
                if origin is not None:
                    mark = ids[-1]
                    mine = mine or next(
                        (r for r, i in zip(appended, ids, strict=True) if i == origin.own), None
                    )
                return _Appended(appended, mine, mark)
            head = (int(reply[1]), reply[2].decode())  # the store's head when the script ran
            rewound = self._rewound(head, highest)
            self._saw(head)
            if origin is not None:
                if reply[3]:
                    mark = reply[3]
                    done = _entry_order(mark)
                    kept = [i for i, entry_id in enumerate(ids) if _entry_order(entry_id) > done]
                    events, ids = [events[i] for i in kept], [ids[i] for i in kept]
                if len(reply) > 4:
                    mine = row_to_record(decode_audit_row(reply[4], reply[5]))
                if not events:
                    return _Appended([], mine, mark)
            pause = _contended(started, self._timeout, attempt)
            if pause is None:
                break
            if pause.seconds:
                yield pause
        raise BackendError("appending to the audit trail kept losing to concurrent appenders; retry later")

    def _drain_for_readers(self) -> Op[None]:
        """Before an audit read: drain what crashed writers left, if this store writes at all."""
        if self._chain is not None:
            yield from self._sweep(self._chain)

    def audit_marks(self) -> Op[AuditMarks]:
        """See ``Backend.audit_marks``: one script reads them all."""
        yield from self._drain_for_readers()
        marks = decode_marks((yield _script(self.layout.audit_marks(), True, "read the audit marks")))
        self._saw(marks.head)
        return marks

    def query_audit(self, query: AuditQuery) -> Op[list[AuditRecord]]:
        """See ``Backend.query_audit``: pages of at most ``query_budget`` candidates per script call
        (see :mod:`.index` for the indexes that pick them)."""
        limit = query.limit
        if limit == 0:
            return []
        yield from self._drain_for_readers()
        lay = self.layout
        after = query.after_seq or 0
        rows: list[AuditRow] = []
        while True:
            want = lay.query_budget if limit is None else limit - len(rows)
            call = lay.query_audit(query.agent_id, query.event_type, query.since, query.until, after, want)
            reply = yield _script(call, True, "query the audit trail")
            if reply[1] == -1:  # by time, and records were appended without the time index
                yield from build_time_index(lay)
                continue
            rows += decode_query_rows(reply)
            if reply[1] == 1 or (limit is not None and len(rows) >= limit):
                break
            after = int(reply[0])
        return [row_to_record(row) for row in rows]

    def iter_audit_rows(self, after_seq: int, batch_size: int) -> Op[None]:
        """See ``Backend.iter_audit_rows`` (an iterator: the rows come as :class:`Emit`).

        The stream itself is read, so every stored record is handed out, wherever the marks are.
        """
        yield from self._drain_for_readers()
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
        """See ``Backend.audit_count``: the records the stream holds."""
        yield from self._drain_for_readers()
        lay = self.layout
        return int((yield Call(lay.audit_slot, ("XLEN", lay.audit_log), True, "count audit records")))

    def prune_audit(self, before: int, chain: AuditChain) -> Op[int]:
        """See ``Backend.prune_audit``: chunks of ``prune_chunk`` records, then the indexes.

        The run to remove is read first, so that the new anchor's seal is made here (the key
        never reaches Redis); the script removes it only if it is still the oldest run.
        """
        if not self._swept:
            yield from self._first_use(chain)
        lay = self.layout
        total = 0
        anchor_seq = 0
        while True:
            entries = yield Call(*lay.oldest_command(), True, "read the oldest audit records")
            rows = [decode_audit_row(entry_id, fields) for entry_id, fields in entries]
            run = next((i for i, row in enumerate(rows) if row[3] >= before), len(rows))
            if run == 0:
                break
            seq, digest = rows[run - 1][0], rows[run - 1][6]
            seal = chain.seal_mark("anchor", seq, digest)
            call = lay.prune_audit(before, entries[run - 1][0], digest, seal, _op_id())
            removed = yield _once(call, "prune the audit trail")
            if removed < 0:
                continue  # another prune ran meanwhile: read the oldest records again
            total += removed
            anchor_seq = seq
            if run < len(rows) or len(rows) < lay.prune_chunk:
                break
        if total:
            yield from self._clean_audit_indexes(anchor_seq)
        return total

    def _clean_audit_indexes(self, anchor_seq: int) -> Op[None]:
        """Drop pruned seqs from the per-agent and per-type indexes, a batch at a time."""
        lay = self.layout
        cursor: bytes | int = 0
        while True:
            command = ("SSCAN", lay.audit_indexes, cursor, "COUNT", 200)
            cursor, keys = yield Call(lay.audit_slot, command, True, "list audit indexes")
            if keys:
                call = lay.prune_indexes([k.decode() for k in keys], anchor_seq)
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
        self._layout = RedisLayout(config.namespace, timeout=config.timeout)
        #: Every operation of the store, as I/O-free generators.
        self.ops = RedisOps(self._layout, config.timeout, config.cluster)
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
