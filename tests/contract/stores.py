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

import contextlib
import dataclasses
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iron_runtime_state import AsyncStateManager, AuditEvent, AuditRecord, StateManager
from iron_runtime_state.backends.memory import MemoryBackend
from iron_runtime_state.backends.redis import RedisLayout

from ..postgres_server import PostgresServer, new_schema


class StoreHandle:
    """One empty store of one kind, for one test."""

    #: Name shown in test ids.
    name = "?"
    #: Whether several processes can share the store (SQLite, Redis: yes; memory: no).
    multiprocess = False
    #: Multiplier for loop counts in load tests (slow stores run fewer iterations).
    scale = 1.0
    #: Set by the conftest for the "async" api: gives an AsyncStateManager StateManager's
    #: synchronous interface (facade.py), so ``open()`` hands the tests one of those instead.
    wrap_async: Callable[[AsyncStateManager], StateManager] | None = None

    def __init__(self) -> None:
        self._opened: list[StateManager] = []

    @property
    def url(self) -> str:
        """A URL that reaches this store from another process."""
        raise NotImplementedError

    def _open(self, **options: Any) -> StateManager:
        return StateManager.from_url(self.url, **options)

    def open(self, **options: Any) -> StateManager:
        """A new manager over this same store (closed at the end of the test).

        With ``wrap_async`` set, an AsyncStateManager over the store, behind that wrapper.
        """
        if self.wrap_async is not None:
            manager = self.wrap_async(self.open_async(**options))
        else:
            manager = self._open(**options)
        self._opened.append(manager)
        return manager

    def open_async(self, **options: Any) -> AsyncStateManager:
        """A new AsyncStateManager over this same store (the caller closes it)."""
        return AsyncStateManager.from_url(self.url, **options)

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

    #: Whether reports are answered from a ledger index kept beside the records (SQL stores).
    ledger_index = False

    def tamper_ledger(self, sql: str) -> None:
        """Run ``sql`` on the store's ledger index (``{ledger}``: the table), bypassing the library."""
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

    def open_async(self, **options: Any) -> AsyncStateManager:
        return AsyncStateManager(self._backend, **options)

    def close_all(self) -> None:
        self._opened.clear()

    def _records(self, manager: StateManager) -> list[AuditRecord]:
        backend = manager.backend
        assert isinstance(backend, MemoryBackend)
        return backend._trail.records

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


class RedisHandle(StoreHandle):
    """A unique namespace on the session's standalone redis-server (tests/conftest.py)."""

    name = "redis"
    multiprocess = True
    scale = 0.25

    def __init__(self, base_url: str, client: Callable[[], Any]) -> None:
        super().__init__()
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self._base_url = base_url
        self._client = client
        self._layout = RedisLayout(self.namespace)

    @property
    def url(self) -> str:
        return f"{self._base_url}?namespace={self.namespace}"

    # The trail is a stream whose entry ids are "<seq>-0"; entries cannot be edited in place,
    # so edits rewrite the stream with the same ids, as an attacker with write access could.
    def _rewrite(self, change: Callable[[list[tuple[bytes, dict[bytes, bytes]]]], None]) -> None:
        client = self._client()
        log = self._layout.audit_log
        entries = [(entry_id, dict(fields)) for entry_id, fields in client.xrange(log)]
        change(entries)
        client.delete(log)
        for entry_id, fields in entries:
            client.xadd(log, fields, id=entry_id)

    @staticmethod
    def _find(entries: list[tuple[bytes, dict[bytes, bytes]]], seq: int) -> int:
        return next(i for i, (entry_id, _) in enumerate(entries) if entry_id == f"{seq}-0".encode())

    def tamper_edit_details(self, manager: StateManager, seq: int, details: str) -> None:
        def change(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
            entries[self._find(entries, seq)][1][b"details"] = details.encode()

        self._rewrite(change)

    def tamper_delete(self, manager: StateManager, seq: int) -> None:
        self._client().xdel(self._layout.audit_log, f"{seq}-0")

    def tamper_swap(self, manager: StateManager, seq_a: int, seq_b: int) -> None:
        content = (b"agent_id", b"event_type", b"timestamp", b"details")

        def change(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
            a = entries[self._find(entries, seq_a)][1]
            b = entries[self._find(entries, seq_b)][1]
            for key in content:
                a[key], b[key] = b[key], a[key]

        self._rewrite(change)

    def tamper_insert(self, manager: StateManager, after_seq: int, event: AuditEvent) -> None:
        def change(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
            i = self._find(entries, after_seq)
            forged = {
                b"agent_id": event.agent_id.as_str().encode(),
                b"event_type": event.event_type.encode(),
                b"timestamp": str(event.timestamp).encode(),
                b"details": event.details.encode(),
                b"prev_hash": entries[i][1][b"hash"],
                b"hash": b"f" * 64,
            }
            entries.insert(i + 1, (f"{after_seq}-1".encode(), forged))

        self._rewrite(change)


class RedisClusterHandle(RedisHandle):
    """A unique namespace on the session's three-master Redis Cluster (tests/conftest.py)."""

    name = "redis-cluster"


class SQLiteHandle(StoreHandle):
    """A new SQLite file in the test's temporary folder."""

    name = "sqlite"
    multiprocess = True

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.path = folder / "store.db"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"  # the path is absolute: sqlite:////tmp/...

    # Raw sqlite3 on the file, as anyone who can write to it could.
    def _edit(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        finally:
            db.close()

    ledger_index = True

    def tamper_ledger(self, sql: str) -> None:
        self._edit((sql.replace("{ledger}", "iron_ledger"), ()))

    def tamper_edit_details(self, manager: StateManager, seq: int, details: str) -> None:
        self._edit(("UPDATE iron_audit SET details = ? WHERE seq = ?", (details, seq)))

    def tamper_delete(self, manager: StateManager, seq: int) -> None:
        self._edit(("DELETE FROM iron_audit WHERE seq = ?", (seq,)))

    def tamper_swap(self, manager: StateManager, seq_a: int, seq_b: int) -> None:
        swap = (
            "UPDATE iron_audit SET (agent_id, event_type, timestamp, details) = "
            "(SELECT agent_id, event_type, timestamp, details FROM iron_audit AS o "
            "WHERE o.seq = (CASE iron_audit.seq WHEN ? THEN ? ELSE ? END)) WHERE seq IN (?, ?)"
        )
        self._edit((swap, (seq_a, seq_b, seq_a, seq_a, seq_b)))

    def tamper_insert(self, manager: StateManager, after_seq: int, event: AuditEvent) -> None:
        # Renumber the later records to make room, with the trigger that guards appends
        # dropped for the moment (an attacker with write access can do all of this).
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            (trigger,) = db.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'iron_audit_appended'"
            ).fetchone()
            db.execute("BEGIN IMMEDIATE")
            db.execute("DROP TRIGGER iron_audit_appended")
            db.execute("UPDATE iron_audit SET seq = -seq - 1 WHERE seq > ?", (after_seq,))
            db.execute("UPDATE iron_audit SET seq = -seq WHERE seq < 0")
            (prev_hash,) = db.execute("SELECT hash FROM iron_audit WHERE seq = ?", (after_seq,)).fetchone()
            db.execute(
                "INSERT INTO iron_audit VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    after_seq + 1,
                    event.agent_id.as_str(),
                    event.event_type,
                    event.timestamp,
                    event.details,
                    prev_hash,
                    "f" * 64,
                ),
            )
            db.execute(trigger)
            db.execute("COMMIT")
        finally:
            db.close()


class PostgresHandle(StoreHandle):
    """A schema of its own on the session's PostgreSQL server (tests/postgres_server.py)."""

    name = "postgres"
    multiprocess = True
    scale = 0.25

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self.schema = new_schema()
        self._server = server

    @property
    def url(self) -> str:
        return self._server.url(schema=self.schema)

    def close_all(self) -> None:
        super().close_all()
        self._server.drop_schema(self.schema)

    def edit(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Raw SQL on the schema's tables (``{s}``: the schema), in one transaction, as anyone with
        write access to them could."""
        with contextlib.closing(self._server.connect()) as conn, conn.transaction():
            for sql, params in statements:
                conn.execute(sql.replace("{s}", f'"{self.schema}"'), params)

    ledger_index = True

    def tamper_ledger(self, sql: str) -> None:
        self.edit((sql.replace("{ledger}", "{s}.ledger"), ()))

    def tamper_edit_details(self, manager: StateManager, seq: int, details: str) -> None:
        self.edit(("UPDATE {s}.audit SET details = %s WHERE seq = %s", (details, seq)))

    def tamper_delete(self, manager: StateManager, seq: int) -> None:
        self.edit(("DELETE FROM {s}.audit WHERE seq = %s", (seq,)))

    def tamper_swap(self, manager: StateManager, seq_a: int, seq_b: int) -> None:
        swap = (
            "UPDATE {s}.audit SET (agent_id, event_type, timestamp, details) = "
            "(SELECT o.agent_id, o.event_type, o.timestamp, o.details FROM {s}.audit AS o "
            "WHERE o.seq = (CASE {s}.audit.seq WHEN %s THEN %s ELSE %s END)) WHERE seq IN (%s, %s)"
        )
        self.edit((swap, (seq_a, seq_b, seq_a, seq_a, seq_b)))

    def tamper_insert(self, manager: StateManager, after_seq: int, event: AuditEvent) -> None:
        # Renumber the later records to make room (through negative numbers: the key is unique).
        self.edit(
            ("UPDATE {s}.audit SET seq = -seq - 1 WHERE seq > %s", (after_seq,)),
            ("UPDATE {s}.audit SET seq = -seq WHERE seq < 0", ()),
            (
                "INSERT INTO {s}.audit SELECT %s, %s, %s, %s, %s, hash, %s FROM {s}.audit WHERE seq = %s",
                (
                    after_seq + 1,
                    event.agent_id.as_str(),
                    event.event_type,
                    event.timestamp,
                    event.details,
                    "f" * 64,
                    after_seq,
                ),
            ),
        )


Provisioner = Callable[[pytest.FixtureRequest, Path], StoreHandle]


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    return MemoryHandle()


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    return SQLiteHandle(tmp_path)


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    server = request.getfixturevalue("redis_server")
    return RedisHandle(server.url, server.client)


def _redis_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    cluster = request.getfixturevalue("redis_cluster")
    return RedisClusterHandle(cluster.url, cluster.client)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> StoreHandle:
    return PostgresHandle(request.getfixturevalue("postgres_server"))


#: Every store kind the contract suite runs against, by name.
PROVISIONERS: dict[str, Provisioner] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "postgres": _postgres,
}

#: Which provisioner covers each registered URL scheme.
SCHEME_COVERAGE: dict[str, str] = {
    "memory": "memory",
    "sqlite": "sqlite",
    "redis": "redis",
    "rediss": "redis",  # the same backend over TLS; tests/test_redis.py runs it on a TLS server
    "unix": "redis",  # the same backend over a unix socket; tests/test_redis.py covers the socket
    "redis+cluster": "redis-cluster",
    "postgresql": "postgres",
    "postgres": "postgres",  # the same backend; tests/test_postgres.py opens it by this scheme too
}
