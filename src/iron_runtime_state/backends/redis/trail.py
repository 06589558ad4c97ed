"""The audit trail of the Redis store, and the outboxes that carry changes' events to it, as
I/O-free operations of :class:`~.ops.RedisOps` (a mixin).

A change and its audit event are one write
------------------------------------------
A settled spend (its ``spend`` record, and the ``budget_threshold`` events it reaches), a
refused spend or hold, a commit past the limit, a PII count and a real status change each imply
an audit event. An agent's keys live in its group's slot and the trail in a slot of its
own, and one script cannot write two slots of a Redis Cluster; nor can a script seal the event:
the hash chain is keyed with the audit key, which never reaches Redis. So the change's script
queues the event, as raw values, in its group's *outbox* (a stream in the group's slot): the
change and its pending event are stored together or not at all. The client then *drains* the
outbox: it builds the events in Python (:func:`.decode.outbox_event`, with ``events.py``: the
same details, to the digit, as every other store writes), seals them onto the trail's head and
appends them with ``append_audit.lua``, then trims them from the outbox: in the same script on a
standalone server, where every key is on one server; on a cluster, where the outbox lives in
another slot, the store object notes the group's new mark (:meth:`TrailOps._landed_at`) and
hands it, as its last argument, to the group's next change script, which trims the outbox up
to it before queueing its own events (``trim_landed`` in ``lua/_prelude.lua``). A group that
sees no further change from this store object is trimmed with the others in one batch once
:data:`TRIM_BATCH` groups wait, or before its next audit read; an entry left in an
outbox after it landed is never appended again (the mark, below), only read once more by a
drain that meets it.

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

Round trips: a change that implies no event takes one; with its event, two, on a standalone server
and on a cluster alike.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from ...audit_chain import AuditChain, AuditRow
from ...errors import BackendError
from ...ledger import SpendQuery, SpendTotal, aggregate, entry_of
from ...models import AuditEvent, AuditRecord
from ..base import AuditMarks, AuditQuery
from ..head_watch import HeadWatch
from .decode import (
    Queued,
    decode_audit_row,
    decode_head,
    decode_marks,
    decode_query_rows,
    outbox_event,
    row_to_record,
)
from .index import build_time_index
from .keys import Origin, RedisLayout
from .requests import Batch, Block, Call, Emit, Gather, Op, contended, once, op_id, script
from .scripts import OUTBOX_BATCH, ScriptCall

__all__ = ["LEDGER_PAGE", "TRIM_BATCH", "TrailOps"]

#: ``spend`` records read per page by :meth:`TrailOps.spend_totals`.
LEDGER_PAGE: Final = 10_000
#: (cluster) Groups whose landed outbox entries wait for their next change before they are all
#: trimmed at once (see :meth:`TrailOps._landed_at`).
TRIM_BATCH: Final = 32


class _Appended(NamedTuple):
    """What an append did: the records it wrote, the caller's own records, the group's mark."""

    records: list[AuditRecord]
    own: dict[bytes, AuditRecord]  # the records of the origin's ``own`` entries found, whoever appended them
    mark: bytes | None  # the id of the group's last outbox entry in the trail, when known


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


class TrailOps:
    """The audit trail and outbox operations of :class:`~.ops.RedisOps`.

    Holds, through :class:`~.ops.RedisOps`, the only state the operations share: the audit head
    this process saw last (so a lone writer appends in one round trip, and an append notices a head
    that went back), and the chain it last sealed with (to drain outboxes before audit reads).
    """

    layout: RedisLayout
    _cluster: bool
    _timeout: float
    #: The longest one ``XREAD BLOCK`` of :meth:`wait_audit` waits on the server, in seconds.
    _block: float
    #: The highest head this store object saw or wrote (as ``_watch`` keeps it, but readable).
    _head: tuple[int, str] | None
    _watch: HeadWatch
    #: The chain this store object last sealed with: audit reads drain the outboxes with it.
    _chain: AuditChain | None
    _swept: bool  # this store object drained every outbox once, at its first write
    #: (cluster) Per group, the newest outbox entry this store object knows appended and has not
    #: trimmed yet: the group's next change script trims up to it (see the module docstring).
    _landed: dict[int, bytes]

    def _change(self, call: ScriptCall, what: str, chain: AuditChain, group: int) -> Op[Any]:
        """Run a change script (once per op key: resent after a lost reply) that queues its events
        in outbox ``group``, with the outbox's trim point (:meth:`_trim_point`); the reply. The
        first write of this store object drains every outbox first."""
        if not self._swept:
            yield from self._first_use(chain)
        call, landed = self._trimming(call, group)
        reply = yield once(call, what)
        self._trimmed(group, landed)
        return reply

    # -- trimming outboxes on a cluster -------------------------------------------------------------

    def _trimming(self, call: ScriptCall, group: int) -> tuple[ScriptCall, bytes]:
        """``call`` (of a script that queues in outbox ``group``) with the outbox's trim point as
        its last argument, and that point: pass it to :meth:`_trimmed` once the script ran."""
        landed = self._trim_point(group)
        return call._replace(args=(*call.args, landed)), landed

    def _trim_point(self, group: int) -> bytes:
        """The last argument of a change script that queues in outbox ``group``: the newest entry
        of it this store object knows appended and not yet trimmed (``b""``: none; always on a
        standalone server, whose appends trim). The script trims up to it (``trim_landed``)."""
        return self._landed.get(group, b"")

    def _trimmed(self, group: int, landed: bytes) -> None:
        """A script given ``landed`` (see :meth:`_trim_point`) ran: the outbox is trimmed up to it
        (unless a concurrent drain of this store object moved the point on meanwhile)."""
        if landed and self._landed.get(group) == landed:
            del self._landed[group]

    def _landed_at(self, group: int, mark: bytes) -> Op[None]:
        """(cluster) Outbox ``group``'s entries up to ``mark`` are in the trail: the group's next
        change trims them. Once :data:`TRIM_BATCH` groups wait, they are all trimmed
        now, in one pipelined batch, so that the outboxes of groups this store object no longer
        changes do not keep their landed entries."""
        known = self._landed.get(group)
        if known is None or _entry_order(known) < _entry_order(mark):
            self._landed[group] = mark
        if len(self._landed) >= TRIM_BATCH:
            yield from self._trim_landed()

    def _trim_landed(self) -> Op[None]:
        """Trim every outbox up to the entries this store object knows appended (one pipelined
        batch per server; safe to repeat)."""
        if self._landed:
            waiting, self._landed = self._landed, {}
            trims = [self.layout.outbox_trim(group, mark) for group, mark in waiting.items()]
            yield Batch(trims, "trim audit outboxes")

    def _events(self, group: int, queued: Queued | None, chain: AuditChain) -> Op[list[AuditRecord]]:
        """Append the events a change queued in outbox ``group``, if any (and, first, any older
        entry of that outbox: those of a writer that died, or of one draining too); the records
        of the change.

        Fewer, too, when another process appended an event and its record can no longer be found
        (more than :data:`~.scripts.OUTBOX_BATCH` older entries waited before it, or more than
        :data:`~.scripts.LANDED_KEEP` records came from outboxes since): the event is in the
        trail, this call just cannot hand its record back.
        """
        if queued is None:
            return []
        mine = queued.entries
        own = [entry_id for entry_id, _ in mine]
        entries: list[Any] = list(mine)
        if queued.waiting > len(mine):
            entries = yield Call(*self.layout.outbox_oldest(group), True, "read an audit outbox")
            if len(entries) < OUTBOX_BATCH:
                # Another drain appended some and trimmed the outbox up to them: what is left is
                # newer. Offered first, they are refused by the group's mark, and the refusal
                # carries their records.
                found = {entry_id for entry_id, _ in entries}
                entries = [entry for entry in mine if entry[0] not in found] + entries
        records = yield from self._drain(group, entries, chain, own)
        return [records[entry_id] for entry_id in own if entry_id in records]

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
        either, and the next sweep drains them. On a cluster the outboxes are trimmed before the
        read (of what this store object knows appended) and after the drains (of what they
        appended: these groups may see no further change from this store object).
        """
        yield from self._trim_landed()
        pending = yield Gather(self.layout.outbox_commands())
        for group, entries in enumerate(pending):
            if entries and not isinstance(entries, BaseException):
                yield from self._drain(group, entries, chain)
        yield from self._trim_landed()

    def _drain(
        self, group: int, entries: list[Any], chain: AuditChain, own: Sequence[bytes] = ()
    ) -> Op[dict[bytes, AuditRecord]]:
        """Append outbox ``group``'s entries to the trail, ``entries`` (the oldest) first, a batch
        at a time, and trim them; up to the last ``own`` entry if given (else to the end). Returns
        the records of the ``own`` entries found."""
        lay = self.layout
        mine: dict[bytes, AuditRecord] = {}
        last_own = own[-1] if own else None
        while entries:
            ids = [entry_id for entry_id, _ in entries]
            events = [outbox_event(fields) for _, fields in entries]
            appended = yield from self._append(events, chain, Origin(group, ids, own))
            mine.update(appended.own)
            if appended.mark is not None and not appended.records:
                # Everything offered was in the trail already (left by a drain that died, or
                # met while another process drains): trim it now, on either topology.
                yield Call(*lay.outbox_trim(group, appended.mark), True, "trim an audit outbox")
            elif appended.mark is not None and self._cluster:
                yield from self._landed_at(group, appended.mark)
            last = ids[-1]
            if len(entries) < OUTBOX_BATCH or (
                last_own is not None and _entry_order(last_own) <= _entry_order(last)
            ):
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
        mine: dict[bytes, AuditRecord] = {}
        wanted = set(origin.own) if origin is not None else set()
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
            reply = yield script(call, False, what) if origin is None else once(call, what)
            if reply[0] == 1:
                self._wrote((last.seq, last.hash))
                self._chain = chain
                appended = records[len(rewound) :]
                if origin is not None:
                    mark = ids[-1]
                    mine.update((i, r) for r, i in zip(appended, ids, strict=True) if i in wanted)
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
                for i in range(4, len(reply) - 1, 3):  # own records another process appended
                    mine[reply[i]] = row_to_record(decode_audit_row(reply[i + 1], reply[i + 2]))
                if not events:
                    return _Appended([], mine, mark)
            pause = contended(started, self._timeout, attempt)
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
        marks = decode_marks((yield script(self.layout.audit_marks(), True, "read the audit marks")))
        self._saw(marks.head)
        return marks

    def wait_audit(self, after_seq: int, timeout: float) -> Op[bool]:
        """See ``Backend.wait_audit``: ``XREAD BLOCK`` on the trail's stream, woken by the append.

        The trail's entry ids are ``<seq>-0``, so ``XREAD ... STREAMS <log> <after_seq>-0``
        answers as soon as a record past ``after_seq`` is stored (at once if one already is),
        with at most one entry (``COUNT 1``: the caller queries for the records). Each command
        blocks for at most ``_block`` seconds (a second, or half the socket timeout if that is
        shorter), so a wait never ties up a connection, nor outlasts a reply's timeout, for long;
        a longer ``timeout`` sends another.

        The events of changes reach the trail through outboxes (see the module docstring), and
        the process that made a change appends its event in the same call, a round trip later:
        that append wakes this wait. An event sits in an outbox only when its writer died between
        the two steps; the next change in its slot group appends it, and so does every audit
        read of a store object that has written (``watch()`` reads the marks before each query),
        so a watcher that writes too picks such leftovers up within one wait.
        """
        lay = self.layout
        stream = (lay.audit_log, f"{max(after_seq, 0)}-0")
        what = "wait for audit records"
        if timeout < 0.001:  # no time to block: one look
            found = yield Call(lay.audit_slot, ("XREAD", "COUNT", 1, "STREAMS", *stream), True, what)
            return bool(found)
        deadline = time.monotonic() + timeout
        while True:
            block = min(deadline - time.monotonic(), self._block)
            command = ("XREAD", "COUNT", 1, "BLOCK", max(1, round(block * 1000)), "STREAMS", *stream)
            if (yield Block(lay.audit_slot, command, block, what)):
                return True
            if deadline - time.monotonic() < 0.001:
                return False

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
            reply = yield script(call, True, "query the audit trail")
            if reply[1] == -1:  # by time, and records were appended without the time index
                yield from build_time_index(lay)
                continue
            rows += decode_query_rows(reply)
            if reply[1] == 1 or (limit is not None and len(rows) >= limit):
                break
            after = int(reply[0])
        return [row_to_record(row) for row in rows]

    def check_ledger(self) -> Op[tuple[int, str] | None]:
        """See ``Backend.check_ledger``: reports read the ``spend`` records themselves, so there
        is no index to disagree with them."""
        yield from ()  # an operation, run like the others, that sends no request
        return None

    def spend_totals(self, query: SpendQuery) -> Op[list[SpendTotal]]:
        """See ``Backend.spend_totals``: the ``spend`` records of the span, found through the
        trail's index by event type and its time index (no other record is read), summed a page
        at a time."""
        totals: dict[tuple[str | int | None, ...], SpendTotal] = {}
        until = None if query.until is None else query.until - 1  # the audit query's is inclusive
        after = 0
        while True:
            wanted = AuditQuery(
                event_type="spend", since=query.since, until=until, after_seq=after, limit=LEDGER_PAGE
            )
            page = yield from self.query_audit(wanted)
            for total in aggregate(map(entry_of, page), query):
                into = totals.get(total.key)
                if into is None:
                    totals[total.key] = total
                else:
                    into.add(total)
            if len(page) < LEDGER_PAGE:
                return list(totals.values())
            after = page[-1].seq

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
            call = lay.prune_audit(before, entries[run - 1][0], digest, seal, op_id())
            removed = yield once(call, "prune the audit trail")
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
                yield script(call, True, "clean audit indexes")
            if int(cursor) == 0:
                return
