"""The trail's marks on every store: read together, sealed with a key, never hiding a record,
and a head that went back is reported by the next writer.

The edits below are what someone with write access to the store could do (move the head back,
drop the newest records), made directly in each kind of store.
"""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from iron_runtime_state import (
    GENESIS_HASH,
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    StateManager,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.memory import MemoryBackend

from .stores import MemoryHandle, PostgresHandle, RedisHandle, SQLiteHandle, StoreHandle

KEY = b"k" * 32


def trail(manager: StateManager, n: int = 5) -> list[AuditRecord]:
    agent_id = AgentId.generate()
    return manager.save_audit_logs([AuditEvent(agent_id, "note", 1_000 + i, f"n{i}") for i in range(n)])


def set_head(store: StoreHandle, manager: StateManager, head: tuple[int, str], *, drop_after: bool) -> None:
    """Move the store's head mark to ``head``; with ``drop_after``, remove the records after it too."""
    seq, digest = head
    if isinstance(store, MemoryHandle):
        backend = manager.backend
        assert isinstance(backend, MemoryBackend)
        if drop_after:
            backend._trail.records[:] = [r for r in backend._trail.records if r.seq <= seq]
        backend._trail.head = head
    elif isinstance(store, SQLiteHandle):
        db = sqlite3.connect(store.path, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            if drop_after:
                db.execute("DELETE FROM iron_audit WHERE seq > ?", (seq,))
                db.execute("DELETE FROM iron_ledger WHERE seq > ?", (seq,))  # their index rows
            db.execute("UPDATE iron_audit_chain SET head_seq = ?, head_hash = ?", (seq, digest))
            db.execute("COMMIT")
        finally:
            db.close()
    elif isinstance(store, RedisHandle):
        client = store._client()
        layout = store._layout
        if drop_after:
            later = [entry_id for entry_id, _ in client.xrange(layout.audit_log, min=f"{seq + 1}-0")]
            if later:
                client.xdel(layout.audit_log, *later)
        client.hset(layout.audit_head, mapping={"seq": seq, "hash": digest})
    elif isinstance(store, PostgresHandle):
        edits = [("UPDATE {s}.audit_chain SET head_seq = %s, head_hash = %s", (seq, digest))]
        if drop_after:
            edits.insert(0, ("DELETE FROM {s}.audit WHERE seq > %s", (seq,)))
            edits.insert(1, ("DELETE FROM {s}.ledger WHERE seq > %s", (seq,)))  # their index rows
        store.edit(*edits)
    else:  # pragma: no cover - a new kind of store needs its edit here
        pytest.fail(f"no way to move the head of a {store.name} store")


def test_marks_agree_with_the_records(manager: StateManager) -> None:
    marks = manager.backend.audit_marks()
    assert (marks.head, marks.anchor, marks.count) == ((0, GENESIS_HASH), (0, GENESIS_HASH), 0)
    records = trail(manager, 6)
    marks = manager.backend.audit_marks()
    assert marks.head == (records[-1].seq, records[-1].hash)
    assert (marks.anchor, marks.count) == ((0, GENESIS_HASH), 6)
    assert manager.prune_audit_log(before=1_002) == 2
    marks = manager.backend.audit_marks()
    assert marks.head == (records[-1].seq, records[-1].hash)
    assert marks.anchor == (records[1].seq, records[1].hash)
    assert marks.count == 4 == manager.audit_count()
    assert (marks.head_seal, marks.anchor_seal) == (None, None)  # no key, no seals


def test_with_a_key_the_head_and_the_anchor_are_sealed(store: StoreHandle) -> None:
    manager = store.open(audit_key=KEY)
    chain = AuditChain(KEY)
    records = trail(manager)
    marks = manager.backend.audit_marks()
    assert marks.head_seal == chain.seal_mark("head", *marks.head)
    assert marks.anchor_seal is None  # never pruned
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
    manager.set_status(agent_id, AgentStatus.STOPPED)  # a change's event moves the sealed head too
    manager.record_pii_detection(agent_id, 1)
    marks = manager.backend.audit_marks()
    assert marks.head[0] == records[-1].seq + 2
    assert marks.head_seal == chain.seal_mark("head", *marks.head)
    assert manager.prune_audit_log(before=1_003) == 3
    marks = manager.backend.audit_marks()
    assert marks.anchor == (records[2].seq, records[2].hash)
    assert marks.anchor_seal == chain.seal_mark("anchor", *marks.anchor)
    assert marks.head_seal == chain.seal_mark("head", *marks.head)
    assert manager.verify_audit_log().ok


def test_records_after_the_head_are_visible_and_counted(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 6)
    set_head(store, manager, (records[2].seq, records[2].hash), drop_after=False)
    assert [r.seq for r in manager.audit_log()] == [r.seq for r in records]
    assert [r.seq for r in manager.iter_audit_log()] == [r.seq for r in records]
    rows = list(manager.backend.iter_audit_rows(0, 2))
    assert [row[0] for row in rows] == [r.seq for r in records]
    assert manager.audit_count() == 6
    assert manager.backend.audit_marks().count == 6
    report = manager.verify_audit_log()
    assert not report.ok, report  # the head disagrees with the records


def test_an_append_after_the_head_went_back_records_the_rewind(
    store: StoreHandle, caplog: pytest.LogCaptureFixture
) -> None:
    manager = store.open()
    records = trail(manager, 5)  # this store object has seen the head at the fifth record
    kept = records[2]
    set_head(store, manager, (kept.seq, kept.hash), drop_after=True)  # a restore from a backup
    event = AuditEvent(AgentId.generate(), "note", 2_000, "after the restore")
    with caplog.at_level(logging.WARNING, logger="iron_runtime_state"):
        record = manager.save_audit_log(event)
    assert record.event == event
    assert any("went back" in r.getMessage() for r in caplog.records), caplog.records
    rewound, appended = manager.audit_log()[-2:]
    assert rewound.event.event_type == "audit_rewound"
    assert (rewound.seq, rewound.prev_hash) == (kept.seq + 1, kept.hash)
    assert json.loads(rewound.event.details) == {
        "expected_seq": records[-1].seq,
        "expected_hash": records[-1].hash,
        "found_seq": kept.seq,
        "found_hash": kept.hash,
    }
    assert appended == record
    assert record.prev_hash == rewound.hash
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iron_runtime_state"):
        manager.save_audit_log(event)  # reported once: the writer carries on from there
    assert not any("went back" in r.getMessage() for r in caplog.records)
    assert [r.event.event_type for r in manager.audit_log()].count("audit_rewound") == 1
    assert manager.verify_audit_log().ok


def test_a_change_after_the_head_went_back_records_the_rewind_in_its_step(store: StoreHandle) -> None:
    manager = store.open()
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
    records = trail(manager, 3)
    set_head(store, manager, (records[0].seq, records[0].hash), drop_after=True)
    manager.set_status(agent_id, AgentStatus.STOPPED)
    kinds = [r.event.event_type for r in manager.audit_log()]
    assert kinds == ["note", "audit_rewound", "status_changed"]
    assert manager.verify_audit_log().ok
