"""What the dashboard keeps up to date in the background, for every page and browser at once.

Three tasks, one store:

- the **feed** follows the audit trail with ``AsyncStateManager.watch()`` (which blocks on the
  store where it can) and keeps the newest records in a ring; every live page is served from
  that ring, so a hundred open browsers cost one ``watch()``, and a browser that reconnects
  with the last ``seq`` it saw (``Last-Event-ID``) resumes with no gap and no repeat: from the
  ring when it still holds that ``seq``, from the store otherwise. The same records feed the
  event counters of ``/metrics`` (:class:`~iron_runtime_state.metrics.TrailCounters`);
- the **sampler** reads the totals and the budget scopes every ``refresh`` seconds (they change
  without an audit event: a spend under the limit writes none) and records the fleet's spend
  over time for the chart;
- the **verifier** checks the whole hash chain every ``verify_every`` seconds.

A store that fails is marked down (:class:`~.link.StoreLink`) and retried, waiting longer each
time; the pages keep showing the last totals read, marked as old.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from ..aio import AsyncStateManager
from ..errors import StateError
from ..ids import AgentId
from ..metrics import TrailCounters
from ..models import AuditRecord, BudgetState, FleetStats
from .link import StoreDown, StoreLink, StoreSlow

__all__ = ["FEED_PAGE", "Hub", "Message", "Snapshot", "SpendHistory", "Verification"]

#: Records read from the store per query when a browser catches up from before the ring.
FEED_PAGE: Final = 500
#: Records shown when the dashboard starts, read from before the head.
PRELOAD: Final = 200
#: Seconds between two comments on an idle event stream (proxies drop silent connections).
HEARTBEAT: Final = 15.0
#: The first and the longest wait before a failed task tries the store again.
RETRY_FIRST: Final = 0.5
RETRY_MAX: Final = 10.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The totals and budget scopes as last read."""

    stats: FleetStats
    budgets: tuple[BudgetState, ...]
    audit_records: int
    taken_at: float  # Unix seconds

    def same(self, other: Snapshot | None) -> bool:
        """Whether ``other`` shows the same figures (whenever it was read)."""
        return other is not None and (self.stats, self.budgets, self.audit_records) == (
            other.stats,
            other.budgets,
            other.audit_records,
        )


@dataclass(frozen=True, slots=True)
class Verification:
    """The last check of the hash chain."""

    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str | None
    last_seq: int | None
    at: float  # Unix seconds
    took: float  # seconds


class SpendHistory:
    """The fleet's total spend over time, sampled: a point when it changed, or at least every
    ``every`` seconds; the newest ``size`` points."""

    def __init__(self, size: int = 2880, every: float = 30.0) -> None:
        self.points: deque[tuple[float, float]] = deque(maxlen=size)
        self._every = every

    def add(self, at: float, spent: float) -> bool:
        """Record ``spent`` at ``at``; ``True`` when it became a point."""
        if self.points:
            last_at, last = self.points[-1]
            if spent == last and at - last_at < self._every:
                return False
        self.points.append((at, spent))
        return True


#: What an event stream hands out: ``("audit", AuditRecord)``, ``("totals", dict)``,
#: ``("store", dict)``, ``("verify", dict)`` or ``("ping", None)``.
Message = tuple[str, Any]


class Hub:
    """The feed, the sampler and the verifier of one dashboard (see the module docstring)."""

    def __init__(
        self,
        link: StoreLink,
        *,
        refresh: float = 1.0,
        verify_every: float = 300.0,
        feed_size: int = 1000,
    ) -> None:
        self.link = link
        self.refresh = refresh
        self.verify_every = verify_every
        self.records: deque[AuditRecord] = deque()
        self._feed_size = feed_size
        #: Every record with a ``seq`` above ``floor`` (up to ``last_seq``) is in the ring.
        self.floor: int | None = None
        self.last_seq: int | None = None
        self.snapshot: Snapshot | None = None
        self.verification: Verification | None = None
        self.history = SpendHistory()
        self.counters = TrailCounters()
        #: Bumped by each kind of change; a stream compares them with what it sent.
        self.versions = {"audit": 0, "totals": 0, "store": 0, "verify": 0}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background tasks (on the running loop)."""
        self._tasks = [
            asyncio.create_task(self._retrying(self._follow), name="dashboard-feed"),
            asyncio.create_task(self._sample(), name="dashboard-sampler"),
        ]
        if self.verify_every > 0:
            self._tasks.append(asyncio.create_task(self._verify(), name="dashboard-verifier"))

    async def stop(self) -> None:
        """End the streams and the tasks, and close the store."""
        self.close_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, StateError):
                await task
        await self.link.close()

    def close_streams(self) -> None:
        """Make every event stream end (the server is stopping)."""
        self._closing = True
        self._bump("store")

    def _bump(self, kind: str) -> None:
        self.versions[kind] += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the feed -----------------------------------------------------------------------------

    async def _retrying(self, task: Callable[[], Awaitable[None]]) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                await task()
                delay = RETRY_FIRST
            except StoreDown:
                pass  # the link has noted it
            except StateError as exc:
                self.link.failed(exc)
            self._bump("store")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _follow(self) -> None:
        if self.last_seq is None:
            await self._preload()
        manager = await self.link.manager()
        async for record in manager.watch(after_seq=self.last_seq):
            self._add(record)
            self.link.mark_up()

    async def _preload(self) -> None:
        marks = await self.link.read(lambda m: m.backend.call("audit_marks"))
        head, anchor = marks.head[0], marks.anchor[0]
        start = max(anchor, head - PRELOAD)
        records = await self.link.read(lambda m: m.audit_log(after_seq=start, limit=PRELOAD))
        self.counters.start_at(head)  # counters count from now on
        self.floor = self.last_seq = start
        for record in records:
            self._add(record)
        if len(records) < PRELOAD:  # everything up to the head is in: start the watch past it
            self.last_seq = max(self.last_seq, head)
        self._bump("audit")

    def _add(self, record: AuditRecord) -> None:
        if self.last_seq is not None and record.seq <= self.last_seq:
            return
        if len(self.records) >= self._feed_size:
            self.floor = self.records.popleft().seq
        self.records.append(record)
        self.last_seq = record.seq
        self.counters.count((record,))
        self._bump("audit")

    def recent(self, count: int, agent_id: AgentId | None = None) -> list[AuditRecord]:
        """The newest ``count`` records in the ring (of one agent), oldest first."""
        found: list[AuditRecord] = []
        for record in reversed(self.records):
            if agent_id is None or record.agent_id == agent_id:
                found.append(record)
                if len(found) >= count:
                    break
        found.reverse()
        return found

    async def records_after(
        self, cursor: int, agent_id: AgentId | None, event_type: str | None
    ) -> tuple[list[AuditRecord], int]:
        """The records after ``cursor`` that match, and the cursor to ask from next time.

        From the ring when it holds everything after ``cursor``, else a page from the store.
        """
        if self.floor is not None and self.last_seq is not None and cursor >= self.floor:
            found = [
                r
                for r in self.records
                if r.seq > cursor
                and (agent_id is None or r.agent_id == agent_id)
                and (event_type is None or r.event_type == event_type)
            ][:FEED_PAGE]
            if len(found) == FEED_PAGE:
                return found, found[-1].seq
            return found, max(cursor, self.last_seq)
        page = await self.link.read(
            lambda m: m.audit_log(after_seq=cursor, agent_id=agent_id, event_type=event_type, limit=FEED_PAGE)
        )
        if len(page) == FEED_PAGE:
            return page, page[-1].seq
        # Every match up to the store's head is in the page, and the ring starts below that head.
        last = page[-1].seq if page else cursor
        return page, max(last, cursor, self.floor if self.floor is not None else cursor)

    # -- totals and verification --------------------------------------------------------------

    async def _sample(self) -> None:
        was = self.link.status.up
        while True:
            try:
                await self.sample()
            except StoreSlow as exc:  # the totals are cheap: a store this slow is in trouble
                self.link.failed(exc)
            except StoreDown:
                pass
            except StateError as exc:
                self.link.failed(exc)
            if self.link.status.up != was:
                was = self.link.status.up
                self._bump("store")
            await asyncio.sleep(self.refresh)

    async def sample(self) -> Snapshot:
        """Read the totals and the budgets now (and note the spend for the chart)."""

        async def read(m: AsyncStateManager) -> tuple[FleetStats, list[BudgetState], int]:
            return await m.stats(), await m.list_budgets(), await m.audit_count()

        stats, budgets, count = await self.link.read(read)
        snapshot = Snapshot(stats, tuple(budgets), count, time.time())
        if not snapshot.same(self.snapshot):
            self.snapshot = snapshot
            self._bump("totals")
        else:
            self.snapshot = snapshot
        if self.history.add(snapshot.taken_at, stats.budget_spent):
            self._bump("totals")
        return snapshot

    async def _verify(self) -> None:
        while True:
            started = time.monotonic()
            try:
                report = await self.link.read(lambda m: m.verify_audit_log(), timed=False)
            except StateError:
                pass  # the sampler reports the store as down
            else:
                self.verification = Verification(
                    report.ok,
                    report.checked,
                    report.first_bad_seq,
                    report.reason,
                    report.last_seq,
                    time.time(),
                    time.monotonic() - started,
                )
                self._bump("verify")
            await asyncio.sleep(self.verify_every)

    # -- event streams ------------------------------------------------------------------------

    async def stream(
        self,
        cursor: int | None,
        agent_id: AgentId | None = None,
        event_type: str | None = None,
        *,
        heartbeat: float = HEARTBEAT,
    ) -> AsyncIterator[Message]:
        """Messages for one browser: the store's status, the totals when they change, and the
        audit records after ``cursor`` (``None``: from now on) that match, in ``seq`` order."""
        sent = dict.fromkeys(self.versions, -1)
        while not self._closing:
            changed = self._changed  # taken before reading, so no change is missed
            for kind in ("store", "totals", "verify"):
                if sent[kind] != self.versions[kind]:
                    sent[kind] = self.versions[kind]
                    yield kind, None
            if cursor is None:
                cursor = self.last_seq
            more = False
            if cursor is not None:
                try:
                    records, cursor = await self.records_after(cursor, agent_id, event_type)
                except StoreDown:
                    records = []
                for record in records:
                    yield "audit", record
                more = len(records) >= FEED_PAGE
            if more:
                continue
            try:
                await asyncio.wait_for(changed.wait(), heartbeat)
            except asyncio.TimeoutError:
                yield "ping", None
