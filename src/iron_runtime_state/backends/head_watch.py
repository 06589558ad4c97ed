"""What a store object remembers of the audit trail's head, so that an append notices a rewind.

A trail's head only moves forward. A head found below the highest one a store object saw or
wrote means the store lost its newest records: it was restored from a backup, failed over to a
replica that lagged, or truncated. Sealing new records over that would hide the loss, so the
append logs a warning and records an ``audit_rewound`` event first, in the same atomic batch,
then carries on from the head it found. The stores share this check (no I/O here).
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from .. import events
from ..models import AuditEvent

__all__ = ["HeadWatch"]

logger: Final = logging.getLogger("iron_runtime_state")


class HeadWatch:
    """The highest audit head ``(seq, hash)`` one store object saw or wrote (thread-safe)."""

    __slots__ = ("_highest", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._highest: tuple[int, str] | None = None

    @property
    def highest(self) -> tuple[int, str] | None:
        """The highest head seen or written (``None`` before any)."""
        return self._highest

    def saw(self, head: tuple[int, str]) -> None:
        """A head read from the store: the mark rises to it, never falls."""
        with self._lock:
            if self._highest is None or head[0] > self._highest[0]:
                self._highest = head

    def wrote(self, head: tuple[int, str]) -> None:
        """The head an append committed: the mark moves to it, so a rewind is reported once.

        The store's head is at least this one (this writer just put it there), so the mark
        never rises above the store's head: a later check cannot report a rewind that was not.
        """
        with self._lock:
            self._highest = head

    def check(self, found: tuple[int, str], now: float) -> list[AuditEvent]:
        """The events an append must write first: ``audit_rewound`` when ``found`` (the store's
        head, read in the append's atomic step) is behind the mark, else none.

        Behind means a lower ``seq``, or the same ``seq`` with another hash (the newest records
        were replaced).
        """
        highest = self._highest
        if highest is None or found[0] > highest[0] or found == highest:
            return []
        logger.warning(
            "the audit trail's head went back from seq %d to seq %d (a restore, a failover or a "
            "truncation): records after seq %d were lost or replaced; an audit_rewound record says so",
            highest[0],
            found[0],
            found[0],
        )
        return [events.audit_rewound(highest, found, now)]
