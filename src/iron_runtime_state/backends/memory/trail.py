"""The in-memory store's audit trail: its records, marks and seals, and the queries over them.

The records are kept in ``seq`` order with three indexes: the seqs of each agent, those of each
event type, and a timeline of where each time can be (:class:`_Timeline`), so that no query
reads records that cannot match.

:class:`Trail` takes no lock: the store holds it and calls it under the store's one lock, so an
operation that changes an agent and appends its events does both in one step.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, NamedTuple

from ...audit_chain import GENESIS_HASH, AuditChain
from ...models import AuditEvent, AuditRecord
from ..base import AuditMarks, AuditQuery
from ..head_watch import HeadWatch

__all__ = ["Sealed", "Trail"]

_BLOCK: Final = 1024  # records per block of _Timeline.oldest


class _Timeline:
    """Where in the trail the records of a time window can be, so a query skips the rest.

    Timestamps are the events' own and need not grow with seq. By position in the trail:
    ``newest[i]`` is the newest timestamp up to position ``i``; it never decreases, so bisecting
    it for ``since`` finds the first record that can match. ``oldest[b]`` is the oldest
    timestamp in block ``b`` of :data:`_BLOCK` records; the last block whose oldest is not after
    ``until`` holds the last record that can match. Positions count from the first record ever
    kept (``dropped`` of them were pruned since), so a prune cuts the front and moves nothing.
    Both are bounds: they skip only records that cannot match.
    """

    __slots__ = ("dropped", "newest", "oldest", "room")

    def __init__(self, timestamps: Iterable[int] = ()) -> None:
        self.dropped = 0
        self.newest = array("q")
        self.oldest = array("q")
        self.room = 0  # records the last block can still take
        for timestamp in timestamps:
            self.add(timestamp)

    def add(self, timestamp: int) -> None:
        """Note the record appended after every other."""
        newest, oldest = self.newest, self.oldest
        newest.append(newest[-1] if newest and newest[-1] > timestamp else timestamp)
        if self.room:
            self.room -= 1
            if timestamp < oldest[-1]:
                oldest[-1] = timestamp
        else:
            oldest.append(timestamp)
            self.room = _BLOCK - 1

    def drop(self, count: int) -> None:
        """Forget the first ``count`` records (pruned)."""
        first_block = self.dropped // _BLOCK
        del self.newest[:count]
        self.dropped += count
        del self.oldest[: self.dropped // _BLOCK - first_block]

    def span(self, since: int | None, until: int | None) -> range:
        """The positions of the records that can have ``since <= timestamp <= until``."""
        start = 0 if since is None else bisect.bisect_left(self.newest, since)
        stop = len(self.newest)
        if until is not None:
            block = len(self.oldest) - 1
            while block >= 0 and self.oldest[block] > until:
                block -= 1
            stop = min(stop, (self.dropped // _BLOCK + block + 1) * _BLOCK - self.dropped)
        return range(start, max(start, stop))


class Sealed(NamedTuple):
    """Records sealed onto the trail's head and not kept yet (:meth:`Trail.seal`)."""

    records: list[AuditRecord]
    head_seal: str | None  # the seal of the head they lead to (with an audit key)
    rewound: int  # how many of them lead the batch: an audit_rewound record, or none


class Trail:
    """The audit trail of one in-memory store; the caller holds the store's lock for every call."""

    def __init__(self, on_append: Callable[[], None] = lambda: None) -> None:
        """``on_append`` is called (under the store's lock) after records are kept."""
        self.on_append = on_append
        self.records: list[AuditRecord] = []
        self.timeline = _Timeline()
        self.by_agent: dict[str, list[int]] = {}  # the seqs of each agent's records
        self.by_type: dict[str, list[int]] = {}  # the seqs of each event type's records
        self.anchor: tuple[int, str] = (0, GENESIS_HASH)
        self.head: tuple[int, str] = (0, GENESIS_HASH)
        self.anchor_seal: str | None = None  # with an audit key: the seals of the two marks
        self.head_seal: str | None = None
        # Only code that edits these fields can move the head back; the check is the stores' one.
        self.watch = HeadWatch()

    def seal(self, batch: Sequence[AuditEvent], chain: AuditChain, now: float) -> Sealed:
        """The records of ``batch`` sealed onto the head, not kept yet.

        Sealing is the part of an append that can fail, so an operation seals its events before
        it changes anything, then changes its agent and keeps the records: both or neither. A
        head behind the one this store last wrote gets an ``audit_rewound`` record first.
        """
        if not batch:
            return Sealed([], None, 0)
        seq, prev = self.head
        rewound = self.watch.check(self.head, now)
        records: list[AuditRecord] = []
        for event in (*rewound, *batch):
            seq += 1
            agent = event.agent_id.as_str()
            digest = chain.seal(prev, seq, agent, event.event_type, event.timestamp, event.details)
            records.append(AuditRecord(seq, event, digest, prev))
            prev = digest
        return Sealed(records, chain.seal_mark("head", seq, prev), len(rewound))

    def keep(self, sealed: Sealed) -> list[AuditRecord]:
        """Store sealed records (nothing here can fail); the records the caller asked for."""
        records = sealed.records
        if not records:
            return records
        for record in records:
            self.records.append(record)
            self.timeline.add(record.event.timestamp)
            self.by_agent.setdefault(record.event.agent_id.as_str(), []).append(record.seq)
            self.by_type.setdefault(record.event.event_type, []).append(record.seq)
        last = records[-1]
        self.head = (last.seq, last.hash)
        self.head_seal = sealed.head_seal
        self.watch.wrote(self.head)
        self.on_append()
        return records[sealed.rewound :]

    def _record(self, seq: int) -> AuditRecord | None:
        """The stored record numbered ``seq``.

        Records are kept in ``seq`` order without gaps, so its place is its distance from the
        first; the record found there is checked, and a list edited by hand is searched instead.
        """
        records = self.records
        i = seq - records[0].seq if records else -1
        if not (0 <= i < len(records) and records[i].seq == seq):
            i = bisect.bisect_left(records, seq, key=_seq_of)
            if i == len(records) or records[i].seq != seq:
                return None
        return records[i]

    def _time_span(self, query: AuditQuery) -> range:
        """The positions in the trail of the records that can be in the query's time window."""
        records = self.records
        if query.since is None and query.until is None:
            return range(len(records))
        if len(self.timeline.newest) != len(records):  # the list was edited by hand
            self.timeline = _Timeline(record.event.timestamp for record in records)
        return self.timeline.span(query.since, query.until)

    def query(self, query: AuditQuery) -> list[AuditRecord]:
        """The records that match ``query``, in seq order, at most ``query.limit`` of them."""
        out: list[AuditRecord] = []
        records = self.records
        span = self._time_span(query)
        if not span:
            return out
        # Seqs after ``after`` up to ``last`` can match: the time window's, the page's.
        after = max(query.after_seq or 0, records[span.start - 1].seq if span.start else 0)
        last = records[span.stop - 1].seq
        candidates: Iterator[AuditRecord | None]
        indexed: list[list[int]] = []
        if query.agent_id is not None:
            indexed.append(self.by_agent.get(query.agent_id.as_str(), []))
        if query.event_type is not None:
            indexed.append(self.by_type.get(query.event_type, []))
        if indexed:
            seqs = min(indexed, key=len)  # with both filters, walk the shorter list
            found = range(bisect.bisect_right(seqs, after), bisect.bisect_right(seqs, last))
            candidates = (self._record(seqs[i]) for i in found)
        else:
            start = bisect.bisect_right(records, after, key=_seq_of)
            candidates = (records[i] for i in range(start, span.stop))  # no copy of the tail
        for record in candidates:
            if record is None:
                continue
            event = record.event
            if query.matches(record.seq, event.agent_id.as_str(), event.event_type, event.timestamp):
                out.append(record)
                if query.limit is not None and len(out) >= query.limit:
                    break
        return out

    def position_after(self, seq: int) -> int:
        """The position of the first record after ``seq``."""
        return bisect.bisect_right(self.records, seq, key=_seq_of)

    def marks(self) -> AuditMarks:
        """The head and anchor marks, the record count and the marks' seals; the head is seen."""
        self.watch.saw(self.head)
        return AuditMarks(self.head, self.anchor, len(self.records), self.head_seal, self.anchor_seal)

    def prune(self, before: int, chain: AuditChain) -> int:
        """Drop the leading records older than ``before`` and move the anchor; how many went."""
        records = self.records
        n = 0
        while n < len(records) and records[n].event.timestamp < before:
            n += 1
        if n == 0:
            return 0
        last = records[n - 1]
        self.anchor_seal = chain.seal_mark("anchor", last.seq, last.hash)
        self.anchor = (last.seq, last.hash)
        pruned = records[:n]
        del records[:n]
        self.timeline.drop(n)
        # Only the agents and event types of the pruned records lose seqs.
        for index, names in (
            (self.by_agent, {record.event.agent_id.as_str() for record in pruned}),
            (self.by_type, {record.event.event_type for record in pruned}),
        ):
            for name in names:
                seqs = index.get(name, [])
                cut = bisect.bisect_right(seqs, last.seq)
                if cut == len(seqs):
                    index.pop(name, None)
                elif cut:
                    del seqs[:cut]
        return n


def _seq_of(record: AuditRecord) -> int:
    return record.seq
