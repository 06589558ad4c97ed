"""The cursors of the managers' paged and followed audit reads (no I/O).

:class:`AuditPages` pages ``iter_audit_log``; :class:`AuditFeed` follows the trail for
``watch()``. Each manager drives them with its own store calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .backends.base import AuditQuery
from .models import AuditRecord

__all__ = ["FEED_BATCH", "FEED_WAIT", "AuditFeed", "AuditPages"]


@dataclass
class AuditPages:
    """The cursor of a paged audit query: which page to ask for next (no I/O).

    ``while (query := pages.next_query()) is not None: page = <fetch>; pages.advance(page)``
    """

    query: AuditQuery
    page_size: int
    _after: int | None = field(init=False)
    _remaining: int | None = field(init=False)
    _take: int = field(init=False, default=0)
    _done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._after = self.query.after_seq
        self._remaining = self.query.limit

    def next_query(self) -> AuditQuery | None:
        """The query for the next page, or ``None`` when every page was read."""
        remaining = self._remaining
        if self._done or (remaining is not None and remaining <= 0):
            return None
        self._take = take = self.page_size if remaining is None else min(self.page_size, remaining)
        q = self.query
        return AuditQuery(q.agent_id, q.event_type, q.since, q.until, self._after, take)

    def advance(self, page: Sequence[AuditRecord]) -> None:
        """Move past ``page``, the answer to the last :meth:`next_query`."""
        if len(page) < self._take:
            self._done = True
            return
        self._after = page[-1].seq
        if self._remaining is not None:
            self._remaining -= len(page)


#: Records read per query while a feed catches up.
FEED_BATCH: Final = 500
#: The longest one wait of a feed lasts, so that a feed notices when it should stop.
FEED_WAIT: Final = 1.0


@dataclass
class AuditFeed:
    """The cursor of ``watch()``: which records to ask for next, and how long to wait (no I/O).

    A driver runs it so::

        if feed.last is None: feed.last = <head seq>            # start from now
        while True:
            head = <head seq>; page = <query feed.next_query()>
            <hand out page>; feed.advance(page, head)
            if feed.behind: continue
            wait = feed.wait(); if wait is None: return            # idle too long
            <wait_audit(feed.last, wait)>

    Records are handed out in ``seq`` order, each once: a feed resumed from the last ``seq`` it
    handed out misses nothing and repeats nothing. With filters, ``last`` moves past records
    that do not match (up to the head read before the query), so waiting does not spin on them.
    """

    query: AuditQuery
    idle_timeout: float | None
    last: int | None = None
    behind: bool = False
    _idle_since: float = field(default_factory=time.monotonic)

    def next_query(self) -> AuditQuery:
        """The query for the records after the last one handed out."""
        q = self.query
        return AuditQuery(q.agent_id, q.event_type, None, None, self.last, FEED_BATCH)

    def advance(self, page: Sequence[AuditRecord], head: int) -> None:
        """Move past ``page`` (and past ``head``, the head read before it, unless more are waiting)."""
        self.behind = len(page) >= FEED_BATCH
        if page:
            self._idle_since = time.monotonic()
            self.last = page[-1].seq
        if not self.behind and self.last is not None:
            self.last = max(self.last, head)

    def wait(self) -> float | None:
        """How long to wait for a new record now; ``None`` when the feed was idle for its timeout."""
        if self.idle_timeout is None:
            return FEED_WAIT
        left = self.idle_timeout - (time.monotonic() - self._idle_since)
        return None if left <= 0 else min(FEED_WAIT, left)
