"""verify_audit_log cannot be steered by someone who can write to the store (issue 14).

Each test makes, directly in the store, an edit the issue found passing verification: the head
moved back (or deleted), records left after the head, the anchor moved forward over records
that still exist, the newest records truncated with the head moved back to match. Every one
must fail verification, or (the truncation, without a key) fail against a checkpoint.
"""

from __future__ import annotations

import sqlite3

import pytest

from iron_runtime_state import AuditCheckpoint, StateManager, ValidationError
from iron_runtime_state.backends.memory import MemoryBackend

from .stores import MemoryHandle, PostgresHandle, RedisHandle, SQLiteHandle, StoreHandle
from .test_trust import KEY, set_head, trail


def set_anchor(store: StoreHandle, manager: StateManager, anchor: tuple[int, str]) -> None:
    """Move the store's anchor mark forward to ``anchor``, leaving the records before it in place."""
    seq, digest = anchor
    if isinstance(store, MemoryHandle):
        backend = manager.backend
        assert isinstance(backend, MemoryBackend)
        backend._trail.anchor = anchor
    elif isinstance(store, SQLiteHandle):
        db = sqlite3.connect(store.path, isolation_level=None)
        try:
            db.execute("UPDATE iron_audit_chain SET anchor_seq = ?, anchor_hash = ?", (seq, digest))
        finally:
            db.close()
    elif isinstance(store, RedisHandle):
        client = store._client()
        client.hset(store._layout.audit_head, mapping={"anchor_seq": seq, "anchor_hash": digest})
    elif isinstance(store, PostgresHandle):
        store.edit(("UPDATE {s}.audit_chain SET anchor_seq = %s, anchor_hash = %s", (seq, digest)))
    else:  # pragma: no cover - a new kind of store needs its edit here
        pytest.fail(f"no way to move the anchor of a {store.name} store")


def test_a_head_moved_back_to_zero_fails(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 20)
    store.tamper_edit_details(manager, records[5].seq, "edited")
    set_head(store, manager, (0, "0" * 64), drop_after=False)
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.checked < 20
    assert report.first_bad_seq is not None


def test_records_after_the_head_are_verified_and_fail(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 8)
    set_head(store, manager, (records[3].seq, records[3].hash), drop_after=False)
    assert manager.audit_count() == 8  # still visible to readers...
    report = manager.verify_audit_log()
    assert not report.ok  # ...so they are checked, and the head disagrees with them
    assert "head" in (report.reason or "")


def test_an_anchor_moved_forward_over_records_that_remain_fails(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 8)
    set_anchor(store, manager, (records[3].seq, records[3].hash))
    assert len(manager.audit_log()) == 8  # nothing is hidden from readers
    report = manager.verify_audit_log()
    assert not report.ok
    assert "anchor" in (report.reason or "")


def test_a_truncation_with_the_head_moved_back_fails_against_a_checkpoint(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 8)
    checkpoint = manager.audit_checkpoint()
    assert (checkpoint.seq, checkpoint.hash) == (records[-1].seq, records[-1].hash)
    assert manager.verify_audit_log(since_checkpoint=checkpoint).ok
    set_head(store, manager, (records[4].seq, records[4].hash), drop_after=True)
    # The store alone cannot show it (documented): the remaining trail is a valid chain.
    assert manager.verify_audit_log().ok
    report = manager.verify_audit_log(since_checkpoint=AuditCheckpoint.from_dict(checkpoint.to_dict()))
    assert not report.ok
    assert "checkpoint" in (report.reason or "")


def test_a_rewritten_trail_fails_against_a_checkpoint(store: StoreHandle) -> None:
    manager = store.open()
    records = trail(manager, 6)
    checkpoint = manager.audit_checkpoint()
    set_head(store, manager, (records[2].seq, records[2].hash), drop_after=True)
    trail(manager, 5)  # new records take the old seqs: a different trail of the same length
    assert manager.verify_audit_log().ok
    report = manager.verify_audit_log(since_checkpoint=checkpoint)
    assert not report.ok
    assert report.first_bad_seq == checkpoint.seq


def test_with_a_key_a_head_moved_without_it_fails(store: StoreHandle) -> None:
    manager = store.open(audit_key=KEY)
    records = trail(manager, 6)
    assert manager.verify_audit_log().ok
    set_head(store, manager, (records[2].seq, records[2].hash), drop_after=True)
    report = manager.verify_audit_log()
    assert not report.ok
    assert "seal" in (report.reason or "")


def test_with_a_key_a_checkpoint_is_signed_and_a_forged_one_fails(store: StoreHandle) -> None:
    manager = store.open(audit_key=KEY)
    trail(manager, 4)
    checkpoint = manager.audit_checkpoint()
    assert len(checkpoint.signature) == 64
    assert manager.verify_audit_log(since_checkpoint=checkpoint).ok
    forged = AuditCheckpoint(checkpoint.seq - 1, checkpoint.hash, checkpoint.time, checkpoint.signature)
    report = manager.verify_audit_log(since_checkpoint=forged)
    assert not report.ok
    assert "signature" in (report.reason or "")


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"seq": 1, "hash": "x", "time": 1, "signature": ""},
        {"seq": -1, "hash": "0" * 64, "time": 1, "signature": ""},
        {"seq": 1, "hash": "0" * 64, "time": 1, "signature": "", "extra": 1},
        {"seq": 1, "hash": "0" * 64, "time": "now", "signature": ""},
    ],
)
def test_a_malformed_checkpoint_is_a_clear_error(manager: StateManager, data: object) -> None:
    with pytest.raises((ValidationError, TypeError)):
        manager.verify_audit_log(since_checkpoint=data)  # type: ignore[arg-type]
