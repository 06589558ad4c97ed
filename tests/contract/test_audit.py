"""The audit trail: append, queries, the hash chain, export and retention, on every store."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from iron_runtime_state import (
    GENESIS_HASH,
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    AuditRecord,
    IdError,
    StateManager,
    StateTypeError,
    ValidationError,
)

from .stores import StoreHandle


def events(agent_id: AgentId, n: int, *, start: int = 1_000, kind: str = "tool_call") -> list[AuditEvent]:
    return [AuditEvent(agent_id, kind, start + i, f"call {i}") for i in range(n)]


def test_append_assigns_increasing_seq_and_chains(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    first = manager.save_audit_log(AuditEvent(agent_id, "pii_detected", 1234567890, "Email found"))
    second = manager.save_audit_log(AuditEvent(agent_id, "budget_exceeded", 1234567900, "$10"))
    assert isinstance(first, AuditRecord)
    assert first.seq < second.seq
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert len(first.hash) == 64
    stored = manager.audit_log()
    assert stored == [first, second]
    assert stored[0].event == AuditEvent(agent_id, "pii_detected", 1234567890, "Email found")


def test_append_logs_at_debug(manager: StateManager, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="iron_runtime_state.audit"):
        manager.save_audit_log(AuditEvent(AgentId.generate(), "pii_detected", 5, "Email"))
    assert any("pii_detected" in r.getMessage() for r in caplog.records)
    assert all(r.name == "iron_runtime_state.audit" for r in caplog.records)


def test_hash_is_documented_sha256(manager: StateManager) -> None:
    agent_id = AgentId.test_fixture(7)
    record = manager.save_audit_log(AuditEvent(agent_id, "note", 42, 'héllo "q"\n'))
    canonical = json.dumps(
        {"agent_id": str(agent_id), "details": 'héllo "q"\n', "event_type": "note", "timestamp": 42},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    message = f"{record.prev_hash}\n{record.seq}\n{canonical}".encode()
    assert record.hash == hashlib.sha256(message).hexdigest()


def test_keyed_chain_uses_hmac(store: StoreHandle) -> None:
    key = b"k" * 32
    manager = store.open(audit_key=key)
    record = manager.save_audit_log(AuditEvent(AgentId.test_fixture(1), "note", 1, ""))
    canonical = f'{{"agent_id":"{AgentId.test_fixture(1)}","details":"","event_type":"note","timestamp":1}}'
    message = f"{record.prev_hash}\n{record.seq}\n{canonical}".encode()
    assert record.hash == hmac.new(key, message, "sha256").hexdigest()
    assert manager.verify_audit_log().ok
    # Without the key the chain does not verify: nobody can rebuild it without the key.
    unkeyed = store.open()
    report = unkeyed.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == record.seq
    with pytest.raises(ValidationError):
        store.open(audit_key=b"short")


def test_bulk_append_is_one_batch(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    records = manager.save_audit_logs(events(agent_id, 50))
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert manager.audit_log() == records
    assert manager.save_audit_logs([]) == []
    with pytest.raises(StateTypeError):
        manager.save_audit_logs([events(agent_id, 1)[0], "nope"])  # type: ignore[list-item]
    assert manager.audit_count() == 50


def test_bad_events_are_refused(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    with pytest.raises(StateTypeError):
        manager.save_audit_log({"event_type": "x"})  # type: ignore[arg-type]
    for bad in ["", "Upper", "has space", "-lead", "x" * 65, "semi;colon"]:
        with pytest.raises(ValidationError):
            AuditEvent(agent_id, bad, 1, "")
    with pytest.raises(ValidationError):
        AuditEvent(agent_id, "ok", 1, "é" * 40_000)
    with pytest.raises(ValidationError):
        AuditEvent(agent_id, "ok", -1, "")
    with pytest.raises(StateTypeError):
        AuditEvent(str(agent_id), "ok", 1, "")  # type: ignore[arg-type]
    assert manager.audit_log() == []


def test_largest_details_round_trip(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    details = "é" * (32 * 1024)  # exactly 64 KiB of UTF-8
    manager.save_audit_log(AuditEvent(agent_id, "big", 1, details))
    assert manager.audit_log()[0].event.details == details
    assert manager.verify_audit_log().ok


def test_queries_filter_and_page(manager: StateManager) -> None:
    a, b = AgentId.generate(), AgentId.generate()
    manager.save_audit_logs(events(a, 10, start=100) + events(b, 10, start=100, kind="pii_detected"))
    assert len(manager.audit_log(agent_id=a)) == 10
    assert len(manager.audit_log(agent_id=b.as_str())) == 10
    assert all(r.event.agent_id == a for r in manager.audit_log(agent_id=a))
    assert len(manager.audit_log(event_type="pii_detected")) == 10
    assert len(manager.audit_log(agent_id=a, event_type="pii_detected")) == 0
    window = manager.audit_log(since=103, until=105)
    assert sorted(r.event.timestamp for r in window) == [103, 103, 104, 104, 105, 105]
    assert len(manager.audit_log(agent_id=b, since=108)) == 2
    # Pagination with after_seq and limit walks everything once, in order.
    seen: list[int] = []
    after = None
    while True:
        page = manager.audit_log(after_seq=after, limit=7)
        if not page:
            break
        seen.extend(r.seq for r in page)
        after = page[-1].seq
    assert seen == sorted(seen)
    assert len(seen) == 20
    assert manager.audit_log(limit=0) == []
    assert [r.seq for r in manager.audit_log(agent_id=a, limit=3)] == seen[:3]
    assert manager.audit_log(agent_id=AgentId.generate()) == []
    assert list(manager.iter_audit_log(agent_id=b, page_size=3)) == manager.audit_log(agent_id=b)


def test_query_bad_filters(manager: StateManager) -> None:
    with pytest.raises(IdError):
        manager.audit_log(agent_id="garbage")
    with pytest.raises(ValidationError):
        manager.audit_log(event_type="Bad Type")
    with pytest.raises(ValidationError):
        manager.audit_log(limit=-1)
    with pytest.raises(StateTypeError):
        manager.audit_log(since="yesterday")  # type: ignore[arg-type]


def test_verify_clean_chain(manager: StateManager) -> None:
    report = manager.verify_audit_log()
    assert report.ok
    assert report.checked == 0
    manager.save_audit_logs(events(AgentId.generate(), 25))
    report = manager.verify_audit_log()
    assert report.ok
    assert bool(report)
    assert report.checked == 25
    assert report.first_bad_seq is None


def _trail(manager: StateManager, n: int = 6) -> list[AuditRecord]:
    return manager.save_audit_logs(events(AgentId.generate(), n))


def test_verify_catches_an_edit(store: StoreHandle) -> None:
    manager = store.open()
    records = _trail(manager)
    store.tamper_edit_details(manager, records[2].seq, "nothing to see")
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == records[2].seq
    assert report.reason is not None
    assert "edited" in report.reason
    assert report.checked == 2


def test_verify_catches_a_deletion(store: StoreHandle) -> None:
    manager = store.open()
    records = _trail(manager)
    store.tamper_delete(manager, records[3].seq)
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == records[4].seq


def test_verify_catches_deleting_the_newest(store: StoreHandle) -> None:
    manager = store.open()
    records = _trail(manager)
    store.tamper_delete(manager, records[-1].seq)
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == records[-1].seq


def test_verify_catches_a_swap(store: StoreHandle) -> None:
    manager = store.open()
    records = _trail(manager)
    store.tamper_swap(manager, records[1].seq, records[4].seq)
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == records[1].seq


def test_verify_catches_an_insertion(store: StoreHandle) -> None:
    manager = store.open()
    records = _trail(manager)
    forged = AuditEvent(records[0].event.agent_id, "status_changed", 1_002, "all fine")
    store.tamper_insert(manager, records[2].seq, forged)
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq is not None
    assert records[2].seq <= report.first_bad_seq <= records[3].seq


def test_chain_holds_under_concurrent_appends(store: StoreHandle) -> None:
    managers = [store.open() for _ in range(4)]
    per_thread = max(10, int(100 * store.scale))
    agent_id = AgentId.generate()

    def work(m: StateManager) -> None:
        for i in range(per_thread):
            if i % 10 == 0:
                m.save_audit_logs(events(agent_id, 3))
            else:
                m.save_audit_log(AuditEvent(agent_id, "tick", 1, str(i)))

    threads = [threading.Thread(target=work, args=(m,)) for m in managers for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = managers[0].verify_audit_log()
    assert report.ok, report
    seqs = [r.seq for r in managers[0].audit_log()]
    assert seqs == sorted(set(seqs))
    assert report.checked == len(seqs) == managers[0].audit_count()


def test_export_jsonl_carries_the_chain(manager: StateManager, tmp_path: Path) -> None:
    agent_id = AgentId.generate()
    manager.save_audit_logs(events(agent_id, 12))
    manager.save_audit_log(AuditEvent(agent_id, "note", 5, 'ünïcode, "quotes"\nnewline'))
    path = tmp_path / "audit.jsonl"
    assert manager.export_audit_log(path) == 13
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 13
    # An outside verifier: recompute each hash from the documented encoding.
    prev = GENESIS_HASH
    for line in lines:
        canonical = json.dumps(
            {k: line[k] for k in ("agent_id", "details", "event_type", "timestamp")},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert line["prev_hash"] == prev
        digest = hashlib.sha256(f"{prev}\n{line['seq']}\n{canonical}".encode()).hexdigest()
        assert digest == line["hash"]
        prev = digest


def test_export_csv_and_filters(manager: StateManager) -> None:
    a, b = AgentId.generate(), AgentId.generate()
    manager.save_audit_logs(events(a, 5) + events(b, 3))
    out = io.StringIO()
    assert manager.export_audit_log(out, format="csv", agent_id=b) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["agent_id"] for r in rows] == [b.as_str()] * 3
    assert set(rows[0]) == {"seq", "agent_id", "event_type", "timestamp", "details", "prev_hash", "hash"}
    with pytest.raises(ValidationError):
        manager.export_audit_log(io.StringIO(), format="xml")  # type: ignore[arg-type]


def test_prune_keeps_the_rest_verifiable(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    records = manager.save_audit_logs(events(agent_id, 10, start=100))
    assert manager.prune_audit_log(before=104) == 4
    remaining = manager.audit_log()
    assert [r.seq for r in remaining] == [r.seq for r in records[4:]]
    report = manager.verify_audit_log()
    assert report.ok, report
    assert report.checked == 6
    assert report.anchor_seq == records[3].seq
    assert report.anchor_hash == records[3].hash
    more = manager.save_audit_log(AuditEvent(agent_id, "after", 200, ""))
    assert more.prev_hash == records[-1].hash
    assert manager.prune_audit_log(before=104) == 0
    assert manager.verify_audit_log().ok
    assert manager.prune_audit_log(before=10_000) == 7
    assert manager.audit_log() == []
    report = manager.verify_audit_log()
    assert report.ok
    assert report.anchor_seq == more.seq
    nxt = manager.save_audit_log(AuditEvent(agent_id, "after", 300, ""))
    assert nxt.seq > more.seq
    assert nxt.prev_hash == more.hash
    assert manager.verify_audit_log().ok


def test_prune_stops_at_the_first_recent_record(manager: StateManager) -> None:
    agent_id = AgentId.generate()
    manager.save_audit_logs([AuditEvent(agent_id, "e", ts, "") for ts in [100, 101, 500, 102, 103]])
    assert manager.prune_audit_log(before=200) == 2
    assert [r.event.timestamp for r in manager.audit_log()] == [500, 102, 103]
    assert manager.verify_audit_log().ok


def test_purge_agents(manager: StateManager) -> None:
    old_stopped = AgentState(AgentId.generate(), AgentStatus.STOPPED)
    old_failed = AgentState(AgentId.generate(), AgentStatus.FAILED)
    old_running = AgentState(AgentId.generate(), AgentStatus.RUNNING)
    for s in (old_stopped, old_failed, old_running):
        manager.save_agent_state(s)
    time.sleep(1.1)
    fresh_stopped = AgentState(AgentId.generate(), AgentStatus.STOPPED)
    manager.save_agent_state(fresh_stopped)
    removed = manager.purge_agents(status=AgentStatus.STOPPED, older_than=1.0)
    assert removed == [old_stopped.agent_id.as_str()]
    removed = manager.purge_agents(older_than=1.0)
    assert removed == [old_failed.agent_id.as_str()]
    assert sorted(manager.list_agents()) == sorted(
        [old_running.agent_id.as_str(), fresh_stopped.agent_id.as_str()]
    )
    assert manager.stats().total == 2
    with pytest.raises(ValidationError):
        manager.purge_agents(status=AgentStatus.RUNNING, older_than=0)
    with pytest.raises(ValidationError):
        manager.purge_agents(older_than=-1)
