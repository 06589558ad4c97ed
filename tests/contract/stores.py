"""How the contract suite gets a fresh store of each kind.

A backend is tested by the whole contract suite once it has an entry in :data:`PROVISIONERS`:
a function that, given the pytest request and a temporary folder, returns a :class:`StoreHandle`
for an empty store. ``test_every_scheme_is_provisioned`` fails when a URL scheme registered in the
library has no provisioner here, so a new backend cannot be forgotten.

A handle opens any number of managers on the same store (to show that state is shared), gives
the URL for subprocesses, and knows how to tamper with the stored audit trail directly (to show
that the hash chain catches it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import AuditEvent, AuditRecord, StateManager
from iron_runtime_state.backends.memory import MemoryBackend


class StoreHandle:
    """One empty store of one kind, for one test."""

    #: Name shown in test ids.
    name = "?"
    #: Whether several processes can share the store (SQLite, Redis: yes; memory: no).
    multiprocess = False
    #: Multiplier for loop counts in load tests (slow stores run fewer iterations).
    scale = 1.0

    def __init__(self) -> None:
        self._opened: list[StateManager] = []

    @property
    def url(self) -> str:
        """A URL that reaches this store from another process."""
        raise NotImplementedError

    def _open(self, **options: Any) -> StateManager:
        return StateManager.from_url(self.url, **options)

    def open(self, **options: Any) -> StateManager:
        """A new manager over this same store (closed at the end of the test)."""
        manager = self._open(**options)
        self._opened.append(manager)
        return manager

    def close_all(self) -> None:
        for manager in self._opened:
            manager.close()
        self._opened.clear()

    # Direct edits of the stored trail, bypassing the library (what an attacker with write
    # access to the store could do). ``seq`` numbers are those the library assigned.
    def tamper_edit_details(self, manager: StateManager, seq: int, details: str) -> None:
        raise NotImplementedError

    def tamper_delete(self, manager: StateManager, seq: int) -> None:
        raise NotImplementedError

    def tamper_swap(self, manager: StateManager, seq_a: int, seq_b: int) -> None:
        """Exchange the contents of two records, keeping their seq numbers and hashes in place."""
        raise NotImplementedError

    def tamper_insert(self, manager: StateManager, after_seq: int, event: AuditEvent) -> None:
        """Insert a forged record right after ``after_seq`` (with a made-up hash)."""
        raise NotImplementedError


class MemoryHandle(StoreHandle):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._backend = MemoryBackend()

    @property
    def url(self) -> str:
        return "memory://"

    def _open(self, **options: Any) -> StateManager:
        # Managers over the very same in-memory store.
        return StateManager(self._backend, **options)

    def close_all(self) -> None:
        self._opened.clear()

    def _records(self, manager: StateManager) -> list[AuditRecord]:
        backend = manager.backend
        assert isinstance(backend, MemoryBackend)
        return backend._records

    def _position(self, records: list[AuditRecord], seq: int) -> int:
        return next(i for i, r in enumerate(records) if r.seq == seq)

    def tamper_edit_details(self, manager: StateManager, seq: int, details: str) -> None:
        records = self._records(manager)
        i = self._position(records, seq)
        event = dataclasses.replace(records[i].event, details=details)
        records[i] = dataclasses.replace(records[i], event=event)

    def tamper_delete(self, manager: StateManager, seq: int) -> None:
        records = self._records(manager)
        del records[self._position(records, seq)]

    def tamper_swap(self, manager: StateManager, seq_a: int, seq_b: int) -> None:
        records = self._records(manager)
        i, j = self._position(records, seq_a), self._position(records, seq_b)
        a, b = records[i], records[j]
        records[i] = dataclasses.replace(a, event=b.event)
        records[j] = dataclasses.replace(b, event=a.event)

    def tamper_insert(self, manager: StateManager, after_seq: int, event: AuditEvent) -> None:
        records = self._records(manager)
        i = self._position(records, after_seq)
        prev = records[i]
        forged = AuditRecord(seq=prev.seq, event=event, hash="f" * 64, prev_hash=prev.hash)
        records.insert(i + 1, forged)


Provisioner = Callable[[pytest.FixtureRequest, Path], StoreHandle]


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    return MemoryHandle()


#: Every store kind the contract suite runs against, by name.
PROVISIONERS: dict[str, Provisioner] = {
    "memory": _memory,
}

#: Which provisioner covers each registered URL scheme.
SCHEME_COVERAGE: dict[str, str] = {
    "memory": "memory",
}
