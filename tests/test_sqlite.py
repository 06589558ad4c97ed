"""What only the SQLite store has: a file, crashes, processes, locks, schema versions.

Behaviour every store shares is in tests/contract (which runs on SQLite too). These tests use
real files, real subprocesses (tests/sqlite_worker.py) and a real SIGKILL; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iron_runtime_state import (
    AgentId,
    AgentNotFound,
    AgentNotRunning,
    AgentState,
    AgentStatus,
    AuditEvent,
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    ConfigurationError,
    Reservation,
    ReservationError,
    SchemaError,
    StateManager,
    StateTypeError,
)
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends import AuditQuery, open_backend
from iron_runtime_state.backends.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteBackend,
    audit_select,
    open_sqlite,
)
from iron_runtime_state.backends.sqlite import schema as sqlite_schema
from iron_runtime_state.money import from_micros, to_micros

from .sqlite_support import WORKER, Workers, header_of, raw, url_of, worker_group

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and permissions")


# -- helpers -----------------------------------------------------------------------------------


workers = pytest.fixture(worker_group, name="workers")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def running(limit: float | None = None) -> AgentState:
    return AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=limit)


def make_store(path: Path, agents: int = 3, records: int = 5) -> None:
    """A closed store with some agents and audit records (its WAL checkpointed away)."""
    with StateManager.with_sqlite(path) as manager:
        for i in range(agents):
            manager.save_agent_state(AgentState(AgentId.test_fixture(i + 1), AgentStatus.RUNNING, float(i)))
        manager.save_audit_logs(
            [AuditEvent(AgentId.test_fixture(1), "note", 100 + i, f"r{i}") for i in range(records)]
        )
    assert not Path(f"{path}-wal").exists()


def open_without_privileges(target: Path) -> dict[str, str | None]:
    """Open a store in a subprocess that the file permissions bind (root's powers dropped)."""
    command = [sys.executable, str(WORKER), "open", str(target)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: root may write to read-only folders")
        command = [setpriv, "--bounding-set=-all", "--inh-caps=-all", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, str | None] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- URLs and options ------------------------------------------------------------------------------


def test_urls_relative_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with StateManager.from_url("sqlite:///relative.db") as manager:
        assert manager.url == f"sqlite:///{tmp_path}/relative.db"
        manager.save_agent_state(running())
    assert (tmp_path / "relative.db").is_file()
    with StateManager.from_url(f"sqlite:///{tmp_path}/relative.db") as again:
        assert len(again.list_agents()) == 1
    spaced = tmp_path / "with space?#.db"
    with StateManager.from_url("sqlite:///" + str(spaced).replace(" ", "%20").replace("?", "%3F")) as manager:
        manager.save_agent_state(running())
        with StateManager.from_url(manager.url) as same:  # manager.url reaches the same file
            assert same.list_agents() == manager.list_agents()
    assert spaced.is_file()


def test_options_in_url_and_keywords(path: Path) -> None:
    url = url_of(path) + "?synchronous=full&busy_timeout=2.5&read_cache=0&page_cache_mib=4"
    with StateManager.from_url(url) as manager:
        backend = manager.backend
        assert isinstance(backend, SQLiteBackend)
        assert backend.synchronous == "full"
        db = backend._connections.get().db
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
        assert db.execute("PRAGMA cache_size").fetchone()[0] == -4096
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    backend = SQLiteBackend(path, synchronous="EXTRA")
    try:
        assert backend._connections.get().db.execute("PRAGMA synchronous").fetchone()[0] == 3
    finally:
        backend.close()
    backend = open_sqlite(
        url_of(path) + "?read_cache=16&synchronous=full", busy_timeout=1, synchronous="normal"
    )
    try:  # a keyword wins over the URL
        settings = backend._settings
        assert (backend.synchronous, settings.read_cache, settings.busy_timeout) == ("normal", 16, 1.0)
    finally:
        backend.close()


def test_bad_options_name_the_accepted_ones(path: Path) -> None:
    bad_urls = [
        url_of(path) + "?colour=red",
        url_of(path) + "?synchronous=off",
        url_of(path) + "?synchronous=sometimes",
        url_of(path) + "?busy_timeout=soon",
        url_of(path) + "?busy_timeout=-1",
        url_of(path) + "?read_cache=-5",
        url_of(path) + "?page_cache_mib=0",
        url_of(path) + "?synchronous=full&synchronous=normal",
        "sqlite://host/x.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
    ]
    for url in bad_urls:
        with pytest.raises(ConfigurationError) as info:
            StateManager.from_url(url)
        assert str(info.value), url
    with pytest.raises(ConfigurationError, match=r"synchronous.*busy_timeout.*read_cache.*page_cache_mib"):
        StateManager.from_url(url_of(path), colour="red")
    with pytest.raises(ConfigurationError, match="accepted options"):
        StateManager.with_sqlite(path, colour="red")
    with pytest.raises(ConfigurationError, match="'normal'"):
        StateManager.with_sqlite(path, synchronous="off")
    with pytest.raises(ConfigurationError):
        StateManager.with_sqlite(path, busy_timeout=math.inf)
    with pytest.raises(ConfigurationError):
        StateManager.with_sqlite(path, read_cache=True)
    with pytest.raises(StateTypeError):
        StateManager.with_sqlite(b"/tmp/x.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        StateManager.with_sqlite("")
    assert not path.exists()  # nothing was created by a refused configuration


# -- durability ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_every_acknowledged_write_survives_kill_9(path: Path, workers: Workers, synchronous: str) -> None:
    writer = workers.spawn("durable", url_of(path) + f"?synchronous={synchronous}")
    assert writer.stdout is not None
    lines: list[str] = []
    while sum(line.startswith("audit") for line in lines) < 300:
        line = writer.stdout.readline()
        assert line, writer.stderr.read() if writer.stderr else "the writer died"
        lines.append(line)
    os.kill(writer.pid, signal.SIGKILL)  # mid-stream: it is writing as fast as it can
    rest, _ = workers.rest_of(writer)
    assert writer.returncode == -signal.SIGKILL
    lines.extend(piece + "\n" for piece in rest.split("\n")[:-1])  # a cut-off last line is dropped

    acked = [line.split() for line in lines if line.endswith("\n")]
    with StateManager.with_sqlite(path) as manager:
        spender = next(AgentId(w[1]) for w in acked if w[0] == "spender")
        states = [w for w in acked if w[0] == "state"]
        spends = [float(w[1]) for w in acked if w[0] == "spend"]
        audits = {int(w[1]): w[2] for w in acked if w[0] == "audit"}
        assert len(states) > 50
        for _, agent, i in states:
            state = manager.get_agent_state(agent)
            assert state is not None, f"acknowledged save of {agent} was lost"
            assert (state.budget_spent, state.pii_detections) == (float(i), int(i) % 7)
        final = manager.get_agent_state(spender)
        assert final is not None
        # Every acknowledged spend is there, and at most one unacknowledged one.
        assert max(spends) <= final.budget_spent <= max(spends) + 1.0
        stored = {r.seq: r.event.details for r in manager.audit_log()}
        missing = {seq: d for seq, d in audits.items() if stored.get(seq) != d}
        assert not missing, f"acknowledged audit records lost: {sorted(missing)[:10]}"
        report = manager.verify_audit_log()
        assert report.ok, report
        assert manager.stats().total in (len(states) + 1, len(states) + 2)


def test_changes_and_their_events_survive_kill_9_together(path: Path, workers: Workers) -> None:
    # A PII count and its pii_detected event, a status change and its status_changed event, a
    # refused spend and its budget_exceeded event are each one transaction: a process killed at
    # any moment leaves both or neither.
    url = url_of(path)
    agents = [AgentId.generate() for _ in range(2)]
    limited = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_states([AgentState(a, AgentStatus.RUNNING) for a in agents])
        manager.save_agent_state(AgentState(limited, AgentStatus.RUNNING, budget_limit=0.0))
    rng = random.Random(14)
    refusals = 0
    for _ in range(20):
        procs = [workers.spawn("changes", url, agent_id, limited) for agent_id in agents]
        for proc in procs:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line == "ready\n", proc.stderr.read() if proc.stderr else line
        time.sleep(rng.uniform(0.05, 0.3))  # mid-loop: they change things as fast as they can
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            rest, _ = workers.rest_of(proc)
            assert proc.returncode == -signal.SIGKILL
            refusals += rest.count("refused\n")  # acknowledged: BudgetExceeded was raised
    with StateManager.with_sqlite(path) as manager:
        total = 0
        for agent_id in agents:
            state = manager.get_agent_state(agent_id)
            assert state is not None
            detected = manager.audit_log(agent_id=agent_id, event_type="pii_detected")
            counted = sum(json.loads(r.event.details)["count"] for r in detected)
            assert state.pii_detections == counted, "a PII count was kept without its event"
            total += counted
            changes = [
                json.loads(r.event.details)
                for r in manager.audit_log(agent_id=agent_id, event_type="status_changed")
            ]
            assert len(changes) > 20
            status = "running"
            for change in changes:  # each event starts where the one before ended
                assert change["from"] == status, "a status change was kept without its event"
                status = change["to"]
            assert state.status.value == status
        assert manager.stats().pii_detections == total
        assert len(manager.audit_log(agent_id=limited, event_type="budget_exceeded")) >= refusals > 0
        report = manager.verify_audit_log()
        assert report.ok, report


# -- processes and threads --------------------------------------------------------------------------


def test_four_processes_spending_reach_the_exact_total(path: Path, workers: Workers) -> None:
    agent_id = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING))
    procs = [workers.spawn("spend", url_of(path), agent_id, 500) for _ in range(4)]
    workers.start_together(procs)
    for proc in procs:
        assert workers.finish(proc) == ["done"]
    with StateManager.with_sqlite(path) as manager:
        state = manager.get_agent_state(agent_id)
        assert state is not None
        assert state.budget_spent == 2000.0
        assert manager.stats().budget_spent == 2000.0


def test_eight_processes_reading_and_writing_never_see_locked(path: Path, workers: Workers) -> None:
    shared = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(AgentState(shared, AgentStatus.RUNNING))
    procs = [workers.spawn("mixed", url_of(path), shared, seed, 240) for seed in range(8)]
    workers.start_together(procs)
    spent = 0.0
    pii = audits = 0
    for proc in procs:
        ((_, s, p, a),) = (line.split() for line in workers.finish(proc))
        spent, pii, audits = spent + float(s), pii + int(p), audits + int(a)
    with StateManager.with_sqlite(path) as manager:
        state = manager.get_agent_state(shared)
        assert state is not None
        assert (state.budget_spent, state.pii_detections) == (spent, pii)
        # Every spend and commit left its ledger record: they sum to what was charged.
        records = manager.audit_log(agent_id=shared, event_type="spend")
        assert len(manager.audit_log(agent_id=shared)) == audits + len(records)
        assert sum(to_micros(json.loads(r.event.details)["amount"]) for r in records) == to_micros(spent)
        assert manager.verify_audit_log().ok
        assert manager.stats().total == len(manager.list_agents())


def test_eight_processes_create_one_new_file_at_once(path: Path, workers: Workers) -> None:
    procs = [workers.spawn("create", url_of(path), f"p{i}") for i in range(8)]
    workers.start_together(procs)
    for proc in procs:
        workers.finish(proc)
    with StateManager.with_sqlite(path) as manager:
        assert len(manager.list_agents()) == 8
        assert sorted(r.event.details for r in manager.audit_log()) == [f"p{i}" for i in range(8)]
        assert manager.verify_audit_log().ok
    assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)


def test_a_schema_created_while_a_new_file_is_checked_is_not_mistaken_for_a_stranger(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another opener creates the schema in the middle of this opener's identity check (after it
    # read the version and application id, before it lists the tables). The check reads one
    # snapshot, so it sees either the empty file or the finished schema, never tables without
    # a version (which it would refuse as a stranger's database).
    real_connect = sqlite3.connect
    other: list[threading.Thread] = []
    failures: list[BaseException] = []

    def create_elsewhere() -> None:
        try:
            StateManager.with_sqlite(path).close()
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def on_statement(sql: str) -> None:
        if sql == sqlite_schema.SQL_OBJECTS and not other:
            other.append(threading.Thread(target=create_elsewhere))
            other[0].start()
            time.sleep(0.5)  # the other opener's schema is committed by now, unless it must wait

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = real_connect(*args, **kwargs)  # type: ignore[call-overload]
        if threading.current_thread() is threading.main_thread():
            db.set_trace_callback(on_statement)
        return db  # type: ignore[no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect)
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(running())
    other[0].join()
    assert failures == []
    monkeypatch.undo()
    with StateManager.with_sqlite(path) as manager:
        assert manager.stats().total == 1
    assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)


def test_sixteen_threads_share_one_manager(path: Path) -> None:
    manager = StateManager.with_sqlite(path)
    shared = running()
    manager.save_agent_state(shared)
    errors: list[BaseException] = []
    rounds = 60

    def work(n: int) -> None:
        try:
            own = running()
            for i in range(rounds):
                manager.save_agent_state(AgentState(own.agent_id, AgentStatus.RUNNING, float(i)))
                manager.record_spend(shared.agent_id, 1.0)
                manager.update_agent_state(shared.agent_id, lambda s: _with_pii(s, s.pii_detections + 1))
                manager.save_audit_log(AuditEvent(shared.agent_id, "tick", i, str(n)))
                got = manager.get_agent_state(own.agent_id)
                assert got is not None
                assert got.budget_spent == float(i)  # a thread reads its own write
                manager.stats()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    final = manager.get_agent_state(shared.agent_id)
    assert final is not None
    assert (final.budget_spent, final.pii_detections) == (16.0 * rounds, 16 * rounds)
    stats = manager.stats()
    assert stats.total == 17
    assert stats.budget_spent == 16.0 * rounds + sum(float(rounds - 1) for _ in range(16))
    assert manager.verify_audit_log().checked == 2 * 16 * rounds  # the ticks and the spends' records
    backend = manager.backend
    assert isinstance(backend, SQLiteBackend)
    connections = [c.db for c in backend._connections.open]
    assert 1 <= len(connections) <= 17  # one per thread at most (ended threads' are closed)
    manager.close()
    for db in connections:
        with pytest.raises(sqlite3.ProgrammingError):
            db.execute("SELECT 1")
    with pytest.raises(BackendError, match="closed"):
        manager.get_agent_state(shared.agent_id)
    manager.close()  # twice is harmless


def _with_pii(state: AgentState, pii: int) -> AgentState:
    state.pii_detections = pii
    return state


def test_connections_of_ended_threads_are_closed(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        backend = manager.backend
        assert isinstance(backend, SQLiteBackend)
        for _ in range(3):
            batch = [threading.Thread(target=manager.list_agents) for _ in range(10)]
            for t in batch:
                t.start()
            for t in batch:
                t.join()
        assert len(backend._connections.open) <= 11


def test_a_forked_child_gets_its_own_connection(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        state = running()
        manager.save_agent_state(state)
        assert manager.get_agent_state(state.agent_id) == state  # the parent's connection is open
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                manager.record_spend(state.agent_id, 2.0)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got = manager.get_agent_state(state.agent_id)
        assert got is not None
        assert got.budget_spent == 2.0  # the parent's read cache saw the child's commit


def test_read_cache_sees_other_processes_threads_and_raw_edits(path: Path, workers: Workers) -> None:
    with StateManager.with_sqlite(path) as manager:
        state = running()
        manager.save_agent_state(state)
        assert manager.get_agent_state(state.agent_id) == state  # now cached
        proc = workers.spawn("spend", url_of(path), state.agent_id, 3)
        workers.start_together([proc])
        workers.finish(proc)
        got = manager.get_agent_state(state.agent_id)
        assert got is not None
        assert got.budget_spent == 3.0
        other = threading.Thread(target=manager.record_spend, args=(state.agent_id, 1.0))
        other.start()
        other.join()
        assert manager.get_agent_states([state.agent_id])[0].budget_spent == 4.0  # type: ignore[union-attr]
        db = raw(path)
        db.execute("UPDATE iron_agents SET pii_detections = 9 WHERE agent_id = ?", (str(state.agent_id),))
        db.close()
        got = manager.get_agent_state(state.agent_id)
        assert got is not None
        assert got.pii_detections == 9
        assert manager.stats().pii_detections == 9  # the aggregate trigger saw the raw edit too


def test_locked_store_is_unavailable_after_busy_timeout(path: Path) -> None:
    with StateManager.with_sqlite(path, busy_timeout=0.3) as manager:
        state = running()
        manager.save_agent_state(state)
        blocker = raw(path)
        blocker.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                manager.record_spend(state.agent_id, 1.0)
            assert time.monotonic() - started >= 0.25
            assert str(path) in str(info.value)
            assert "busy_timeout" in str(info.value)
            assert isinstance(info.value, ConnectionError)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            assert manager.get_agent_state(state.agent_id) == state  # readers are never blocked
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert manager.record_spend(state.agent_id, 1.0).budget_spent == 1.0


# -- reservations across processes ------------------------------------------------------------------


def test_reservations_across_processes_never_pass_the_limit(path: Path, workers: Workers) -> None:
    agent_id = AgentId.generate()
    limit = 30.0
    manager = StateManager.with_sqlite(path)
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=limit))
    procs = [workers.spawn("reserve", url_of(path), agent_id, limit, 120, seed) for seed in range(4)]
    workers.start_together(procs)
    worst = 0
    while any(proc.poll() is None for proc in procs):  # watch from outside too
        state, held = manager.backend.reserved(agent_id, time.time())  # held: micro-units
        worst = max(worst, to_micros(state.budget_spent) + held)
    commits = [float(line.split()[1]) for proc in procs for line in workers.finish(proc) if "commit" in line]
    assert worst <= to_micros(limit)
    final = manager.get_agent_state(agent_id)
    assert final is not None
    assert final.budget_spent == sum(commits)  # amounts are binary fractions: exact
    assert final.budget_spent <= limit
    assert manager.budget_available(agent_id) == limit - final.budget_spent
    assert len(manager.audit_log(agent_id=agent_id, event_type="budget_exceeded")) > 0  # it was contended
    manager.close()


def test_holds_of_a_killed_process_lapse_after_their_ttl(path: Path, workers: Workers) -> None:
    agent_id = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
        holder = workers.spawn("hold", url_of(path), agent_id, 6.0, 2.0)
        assert holder.stdout is not None
        held = [holder.stdout.readline().split() for _ in range(2)]
        assert [h[0] for h in held] == ["held", "held"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        expires_at = min(float(h[2]) for h in held)
        if time.time() < expires_at - 0.3:
            assert manager.budget_available(agent_id) == pytest.approx(4.0)
        time.sleep(max(0.0, expires_at - time.time()) + 0.1)
        assert manager.budget_available(agent_id) == 10.0
        hold = manager.reserve_budget(agent_id, 10.0)  # the dead process's holds are gone
        for _, reservation_id, expires in held:
            with pytest.raises(ReservationError):
                manager.commit_reservation(Reservation(reservation_id, agent_id, 3.0, float(expires)), 3.0)
        assert manager.commit_reservation(hold, 10.0).budget_spent == 10.0


def test_holds_expire_by_one_clock(path: Path, workers: Workers) -> None:
    # Each process's own clock is two minutes off. A hold lasts its ttl by the database's clock,
    # so a process that is ahead does not drop another's open hold, and one that is behind does
    # not make a hold that has lapsed for everyone else.
    agent_id = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=10.0))
        mine = manager.reserve_budget(agent_id, 6.0, ttl=60.0)
        assert abs(mine.expires_at - (time.time() + 60.0)) < 5.0
        ahead = workers.spawn("hold_ahead", url_of(path), agent_id, 6.0, 120)
        assert workers.finish(ahead) == ["refused 4.0"]
        behind = workers.spawn("hold_ahead", url_of(path), agent_id, 4.0, -120)
        assert workers.finish(behind) == ["held 4.0"]
        assert manager.budget_available(agent_id) == 0.0  # both holds are open
        backend = manager.backend
        assert isinstance(backend, SQLiteBackend)
        assert backend.reserved(agent_id, time.time() + 3600.0)[1] == 10_000_000  # whatever now says


# -- the audit trail ------------------------------------------------------------------------------


def test_chain_follows_append_order_across_processes(path: Path, workers: Workers) -> None:
    count = 70
    tags = [f"p{i}" for i in range(4)]
    procs = [workers.spawn("append", url_of(path), tag, count) for tag in tags]
    workers.start_together(procs)
    for proc in procs:
        workers.finish(proc)
    with StateManager.with_sqlite(path) as manager:
        records = manager.audit_log()
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        assert len(records) == 4 * 70
        report = manager.verify_audit_log()
        assert report.ok, report
        assert report.checked == len(records)
        for tag in tags:  # each process's records are in the order it appended them
            numbers = [int(r.event.details.split(":")[1]) for r in records if r.event.details.startswith(tag)]
            assert numbers == list(range(count))


def test_bulk_append_is_one_transaction(path: Path) -> None:
    class FailsAt500(AuditChain):
        def seal(
            self, prev_hash: str, seq: int, agent_id: str, event_type: str, timestamp: int, details: str
        ) -> str:
            if seq == 500:
                raise RuntimeError("seal failed")
            return super().seal(prev_hash, seq, agent_id, event_type, timestamp, details)

    with StateManager.with_sqlite(path) as manager:
        agent_id = AgentId.generate()
        manager.save_audit_logs([AuditEvent(agent_id, "first", 1, "")])
        marks = manager.backend.audit_marks()
        batch = [AuditEvent(agent_id, "bulk", i, str(i)) for i in range(1000)]
        with pytest.raises(RuntimeError):
            manager.backend.append_audit(batch, FailsAt500())
        assert manager.audit_count() == 1
        assert manager.backend.audit_marks() == marks
        records = manager.save_audit_logs(batch)
        assert [r.seq for r in records] == list(range(2, 1002))
        assert manager.verify_audit_log().checked == 1001


def test_chain_trigger_refuses_records_that_do_not_extend_the_head(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        record = manager.save_audit_log(AuditEvent(AgentId.generate(), "note", 1, ""))
    db = raw(path)
    try:
        insert = "INSERT INTO iron_audit VALUES (?, 'agent_x', 'note', 1, '', ?, ?)"
        with pytest.raises(sqlite3.IntegrityError, match="does not extend the chain head"):
            db.execute(insert, (record.seq + 2, record.hash, "f" * 64))  # a gap
        with pytest.raises(sqlite3.IntegrityError, match="does not extend the chain head"):
            db.execute(insert, (record.seq + 1, "0" * 64, "f" * 64))  # a fork
    finally:
        db.close()


def test_prune_and_head_persist_across_reopening(path: Path) -> None:
    agent_id = AgentId.generate()
    with StateManager.with_sqlite(path) as manager:
        records = manager.save_audit_logs([AuditEvent(agent_id, "e", 100 + i, "") for i in range(10)])
        assert manager.prune_audit_log(before=1000) == 10
    with StateManager.with_sqlite(path) as manager:
        marks = manager.backend.audit_marks()
        assert marks.head == marks.anchor == (records[-1].seq, records[-1].hash)
        assert marks.count == 0
        nxt = manager.save_audit_log(AuditEvent(agent_id, "e", 2000, "x\x00y"))
        assert (nxt.seq, nxt.prev_hash) == (11, records[-1].hash)
        assert manager.audit_log()[0].event.details == "x\x00y"
        assert manager.verify_audit_log().ok


@pytest.fixture
def filled(path: Path) -> Path:
    """A store with 3,000 records of 30 agents and 3 event types, for query plans."""
    agents = [AgentId.test_fixture(i) for i in range(30)]
    kinds = ["pii_detected", "tool_call", "status_changed"]
    with StateManager.with_sqlite(path) as manager:
        manager.save_audit_logs(
            [AuditEvent(agents[i % 30], kinds[i % 3], 1_000 + i, "") for i in range(3_000)]
        )
    return path


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (AuditQuery(agent_id=AgentId.test_fixture(3)), "iron_audit_by_agent"),
        (AuditQuery(agent_id=AgentId.test_fixture(3), after_seq=100, limit=50), "iron_audit_by_agent"),
        (AuditQuery(event_type="tool_call", limit=10), "iron_audit_by_type"),
        (AuditQuery(event_type="tool_call", after_seq=5, limit=10), "iron_audit_by_type"),
        (AuditQuery(since=1_200, until=1_300), "iron_audit_by_time"),
        (AuditQuery(until=1_010, limit=5), "iron_audit_by_time"),
        (AuditQuery(after_seq=2_000, limit=100), "INTEGER PRIMARY KEY"),
    ],
)
def test_audit_queries_use_indexes(filled: Path, query: AuditQuery, index: str) -> None:
    sql, params = audit_select(query)
    db = raw(filled)
    try:
        plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))
    finally:
        db.close()
    assert index in plan, plan
    assert "SCAN iron_audit" not in plan.replace("SCAN iron_audit USING", ""), plan
    with StateManager.with_sqlite(filled) as manager:  # and the answers are right
        got = manager.backend.query_audit(query)
        everything = manager.backend.query_audit(AuditQuery())
        expected = [
            r
            for r in everything
            if query.matches(r.seq, r.event.agent_id.as_str(), r.event.event_type, r.event.timestamp)
        ][: query.limit]
        assert got == expected


# -- aggregates ----------------------------------------------------------------------------------------


def test_stats_triggers_match_a_full_recount(path: Path) -> None:
    rng = random.Random(7)
    with StateManager.with_sqlite(path) as manager:
        ids = [AgentId.generate() for _ in range(25)]
        for step in range(600):
            agent_id = rng.choice(ids)
            action = rng.randrange(7)
            try:
                if action == 0:
                    status = rng.choice(list(AgentStatus))
                    manager.save_agent_state(
                        AgentState(agent_id, status, rng.randrange(100) / 4, rng.randrange(9))
                    )
                elif action == 1:
                    manager.record_spend(agent_id, 0.25)
                elif action == 2:
                    manager.record_pii_detection(agent_id, 2)
                elif action == 3:
                    manager.set_status(agent_id, rng.choice(list(AgentStatus)))
                elif action == 4:
                    manager.remove_agent_state(agent_id)
                elif action == 5:
                    manager.save_agent_states(
                        [AgentState(a, AgentStatus.STOPPED, 1.0, step) for a in ids[:3]]
                    )
                else:
                    manager.update_agent_state(agent_id, lambda s: _with_pii(s, 0))
            except (AgentNotFound, AgentNotRunning):
                pass  # the random agent was removed, or is not running
        db = raw(path)
        count = db.execute(
            "SELECT count(*), total(status = 0), total(status = 1), total(status = 2), "
            "sum(budget_spent), total(pii_detections) FROM iron_agents"
        ).fetchone()
        db.close()
        stats = manager.stats()
        assert (stats.total, stats.running, stats.stopped, stats.failed) == tuple(int(c) for c in count[:4])
        assert stats.budget_spent == from_micros(count[4] or 0)  # integers: exact
        assert stats.pii_detections == count[5]


# -- schema versions ---------------------------------------------------------------------------------


def test_schema_version_is_recorded(path: Path) -> None:
    StateManager.with_sqlite(path).close()
    assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)
    assert len(MIGRATIONS) == SCHEMA_VERSION


def test_newer_schema_is_refused_untouched(path: Path) -> None:
    make_store(path)
    db = raw(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before, mtime = digest(path), path.stat().st_mtime_ns
    with pytest.raises(SchemaError, match="newer") as info:
        StateManager.with_sqlite(path)
    assert str(path) in str(info.value)
    assert "upgrade" in str(info.value)
    assert (digest(path), path.stat().st_mtime_ns) == (before, mtime)
    assert not Path(f"{path}-wal").exists()
    assert not Path(f"{path}-shm").exists()


def test_newer_schema_still_in_the_wal_is_refused(path: Path) -> None:
    make_store(path)
    keeper = raw(path)  # holds the file open, so the bump stays in the WAL, not the header
    keeper.execute("PRAGMA user_version = 99")
    try:
        before = digest(path)
        with pytest.raises(SchemaError, match="newer"):
            StateManager.with_sqlite(path)
        assert digest(path) == before
    finally:
        keeper.close()


def test_migrations_are_applied_in_order(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(path, agents=2)
    later = (
        ("CREATE TABLE iron_test_later (step INTEGER NOT NULL)", "INSERT INTO iron_test_later VALUES (2)"),
        ("INSERT INTO iron_test_later SELECT max(step) + 1 FROM iron_test_later",),  # needs step 2 first
    )
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", MIGRATIONS + later)
    with StateManager.with_sqlite(path) as manager:
        assert len(manager.list_agents()) == 2  # the data came through
    assert header_of(path) == (SCHEMA_VERSION + 2, APPLICATION_ID)
    db = raw(path)
    assert [r[0] for r in db.execute("SELECT step FROM iron_test_later ORDER BY step")] == [2, 3]
    db.close()
    # A fresh file gets every migration, in one go.
    fresh = path.with_name("fresh.db")
    StateManager.with_sqlite(fresh).close()
    assert header_of(fresh)[0] == SCHEMA_VERSION + 2


def test_a_failing_migration_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(path)
    broken = (("CREATE TABLE iron_test_half (x)", "INSERT INTO no_such_table VALUES (1)"),)
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", MIGRATIONS + broken)
    with pytest.raises(BackendError, match=str(path)):
        StateManager.with_sqlite(path)
    assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)
    db = raw(path)
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'iron_test_half'").fetchone()[0] == 0
    db.close()
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", MIGRATIONS)
    with StateManager.with_sqlite(path) as manager:
        assert len(manager.list_agents()) == 3


def test_databases_of_other_applications_are_refused_untouched(tmp_path: Path) -> None:
    theirs = tmp_path / "app.db"
    db = raw(theirs)
    db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    other_app = tmp_path / "other.db"
    db = raw(other_app)
    db.execute("PRAGMA application_id = 42")
    db.execute("CREATE TABLE t (x)")
    db.close()
    for target in (theirs, other_app):
        before = digest(target)
        with pytest.raises(SchemaError) as info:
            StateManager.with_sqlite(target)
        assert str(target) in str(info.value)
        assert digest(target) == before
        assert not Path(f"{target}-wal").exists()


DATA = Path(__file__).with_name("data")


@pytest.mark.parametrize(("name", "key"), [("store-0.4.db", None), ("store-0.4-keyed.db", "k" * 32)])
def test_a_store_written_by_0_4_opens_migrates_and_verifies(path: Path, name: str, key: str | None) -> None:
    # Written by commit 2b0e376 (schema version 1, no seals): tests/data/make_stores_0_4.py.
    shutil.copy(DATA / name, path)
    assert header_of(path) == (1, APPLICATION_ID)
    chain = AuditChain(None if key is None else key.encode())
    with StateManager.with_sqlite(path, audit_key=key) as manager:
        assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)
        marks = manager.backend.audit_marks()
        assert (marks.head[0], marks.anchor[0], marks.count) == (7, 2, 5)
        assert (marks.head_seal, marks.anchor_seal) == (None, None)  # an old store has none
        rows = manager.backend.iter_audit_rows(0, 100)
        report = chain.verify(rows, anchor_seq=2, anchor_hash=marks.anchor[1], head=marks.head)
        assert (report.ok, report.checked, report.last_seq) == (True, 5, 7), report
        if key is None:  # with a key, verify_audit_log also wants the marks sealed: see below
            report = manager.verify_audit_log()
            assert (report.ok, report.checked, report.anchor_seq) == (True, 5, 2), report
        a, b, c = manager.get_agent_states([AgentId.test_fixture(n) for n in (1, 2, 3)])
        assert a == AgentState(AgentId.test_fixture(1), AgentStatus.RUNNING, 4.0, 0, 10.0)
        assert b == AgentState(AgentId.test_fixture(2), AgentStatus.RUNNING, 2.5, 3)
        assert c == AgentState(AgentId.test_fixture(3), AgentStatus.FAILED)
        assert manager.stats().total == 3
        record = manager.save_audit_log(AuditEvent(AgentId.test_fixture(1), "note", 2_000_000_001, "new"))
        assert record.seq == 8
        assert manager.prune_audit_log(before=200) == 2  # now the head and the anchor are sealed
        marks = manager.backend.audit_marks()
        assert marks.head_seal == chain.seal_mark("head", *marks.head)
        assert marks.anchor_seal == chain.seal_mark("anchor", *marks.anchor)
        assert manager.verify_audit_log().ok
    with StateManager.with_sqlite(path, audit_key=key) as manager:
        assert manager.verify_audit_log().checked == 4


def test_a_head_seal_belongs_to_one_head(path: Path) -> None:
    # The chain's trigger clears the seal as it moves the head, so a writer without the key
    # (or a hand-made record) cannot leave the last sealed head's seal on its own head.
    with StateManager.with_sqlite(path, audit_key="k" * 32) as manager:
        trail = manager.save_audit_logs(
            [AuditEvent(AgentId.test_fixture(1), "note", i, "") for i in range(3)]
        )
        assert manager.backend.audit_marks().head_seal is not None
    with StateManager.with_sqlite(path) as manager:
        manager.save_audit_log(AuditEvent(AgentId.test_fixture(1), "note", 9, "unkeyed"))
        marks = manager.backend.audit_marks()
        assert marks.head[0] == trail[-1].seq + 1
        assert marks.head_seal is None


def test_a_store_missing_a_table_is_refused(path: Path) -> None:
    make_store(path)
    db = raw(path)
    db.execute("DROP TRIGGER iron_agents_updated")
    db.close()
    with pytest.raises(SchemaError, match="iron_agents_updated"):
        StateManager.with_sqlite(path)


# -- the file ----------------------------------------------------------------------------------------


def test_files_are_owner_only(path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        with StateManager.with_sqlite(path) as manager:
            manager.save_agent_state(running())
            for suffix in ("", "-wal", "-shm"):
                mode = stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
                assert mode == 0o600, (suffix, oct(mode))
    finally:
        os.umask(old)


def test_an_empty_file_becomes_a_store(path: Path) -> None:
    path.touch()
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_state(running())
    assert header_of(path) == (SCHEMA_VERSION, APPLICATION_ID)


def test_create_false_opens_only_an_existing_store(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(BackendError, match="does not exist") as info:
        SQLiteBackend(missing, create=False)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(BackendError, match="is empty"):
        SQLiteBackend(empty, create=False)
    bare = tmp_path / "bare.db"  # a SQLite database without any table
    db = raw(bare)
    db.execute("CREATE TABLE t (x)")
    db.execute("DROP TABLE t")
    db.close()
    before = digest(bare)
    with pytest.raises(BackendError, match="empty SQLite database"):
        open_sqlite(url_of(bare), create=False)
    assert digest(bare) == before
    theirs = tmp_path / "theirs.db"
    db = raw(theirs)
    db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    with pytest.raises(SchemaError):
        SQLiteBackend(theirs, create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.db", "empty.db", "theirs.db"]
    assert empty.stat().st_size == 0
    with pytest.raises(StateTypeError):
        SQLiteBackend(tmp_path / "x.db", create="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        StateManager.from_url(url_of(tmp_path / "x.db") + "?create=false")  # a keyword, not a URL option
    store = tmp_path / "store.db"
    make_store(store)
    old = tmp_path / "old.db"
    shutil.copy(DATA / "store-0.4.db", old)
    for target in (store, old):  # a store of this or an older version opens (and migrates)
        with StateManager(SQLiteBackend(target, create=False)) as manager:
            assert manager.stats().total == 3
    assert header_of(old) == (SCHEMA_VERSION, APPLICATION_ID)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "folder.db"
    folder.mkdir()
    with pytest.raises(BackendError, match="directory") as info:
        StateManager.with_sqlite(folder)
    assert str(folder) in str(info.value)
    assert isinstance(info.value.__cause__, IsADirectoryError)
    assert list(folder.iterdir()) == []


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "nowhere" / "state.db"
    with pytest.raises(BackendError, match="does not exist") as info:
        StateManager.with_sqlite(target)
    assert str(target) in str(info.value)
    assert not target.parent.exists()


def test_a_file_that_is_not_a_database_is_refused_untouched(path: Path) -> None:
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    before = digest(path)
    with pytest.raises(BackendError, match="not a SQLite database") as info:
        StateManager.with_sqlite(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert digest(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    path.write_bytes(b"tiny")
    with pytest.raises(BackendError, match="not a SQLite database"):
        StateManager.with_sqlite(path)


def test_a_corrupted_schema_page_is_refused_untouched(path: Path) -> None:
    make_store(path)
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xab" * (4096 - 100)  # page 1 after the header: the schema table
    path.write_bytes(bytes(data))
    before = digest(path)
    with pytest.raises(BackendError) as info:
        StateManager.with_sqlite(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert digest(path) == before


def test_corruption_found_later_names_the_file(path: Path) -> None:
    make_store(path, agents=50)
    db = raw(path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'iron_agents'").fetchone()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    data[start : start + page_size] = b"\xcd" * page_size
    path.write_bytes(bytes(data))
    with StateManager.with_sqlite(path) as manager:
        with pytest.raises(BackendError, match="corrupted") as info:
            manager.get_agent_state(AgentId.test_fixture(1))
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_read_only_locations_are_refused_untouched(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    existing = locked / "state.db"
    make_store(existing)
    before = digest(existing)
    read_only_file = tmp_path / "ro.db"
    make_store(read_only_file)
    read_only_file.chmod(0o400)
    locked.chmod(0o555)
    try:
        for target, words in [
            (locked / "new.db", "read-only"),  # cannot create the file
            (existing, "writable"),  # cannot create its -wal and -shm
            (read_only_file, "read-only"),  # cannot write the file
        ]:
            outcome = open_without_privileges(target)
            assert outcome["error"] == "BackendError", (target, outcome)
            message = outcome["message"] or ""
            assert str(target) in message, message
            assert words in message, message
            assert outcome["cause"] is not None
        assert not (locked / "new.db").exists()
        assert digest(existing) == before
        assert sorted(p.name for p in locked.iterdir()) == ["state.db"]
    finally:
        locked.chmod(0o755)


def test_open_backend_builds_sqlite(path: Path) -> None:
    backend = open_backend(url_of(path), read_cache=0)
    try:
        assert isinstance(backend, SQLiteBackend)
        assert backend.path == str(path)
        assert backend.url == url_of(path)
        assert repr(backend).startswith("SQLiteBackend(")
    finally:
        backend.close()


# -- record_spend in one statement, the status index ----------------------------------------------


def _spend_story(manager: StateManager) -> None:
    """Spends that pass and one that open holds refuse; missing and stopped agents."""
    agent_id = AgentId.generate()
    manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, 1, budget_limit=10))
    hold = manager.reserve_budget(agent_id, 6.0)
    state = manager.record_spend(agent_id, 2)
    # Whole numbers come back as floats, as from any other read.
    assert (state.budget_spent, state.budget_limit) == (3.0, 10.0)
    assert type(state.budget_spent) is float
    assert type(state.budget_limit) is float
    with pytest.raises(BudgetExceeded) as refused:
        manager.record_spend(agent_id, 1.5)  # 3 spent + 6 held + 1.5 > 10
    assert (refused.value.spent, refused.value.reserved, refused.value.requested) == (3.0, 6.0, 1.5)
    assert manager.get_agent_state(agent_id) == AgentState(agent_id, AgentStatus.RUNNING, 3.0, 0, 10.0)
    [event] = manager.audit_log(agent_id=agent_id, event_type="budget_exceeded")
    assert "spend" in event.event.details
    manager.release_reservation(hold)
    assert manager.record_spend(agent_id, 7.0).budget_spent == 10.0  # exactly the limit passes
    unlimited = AgentId.generate()
    manager.save_agent_state(AgentState(unlimited, AgentStatus.RUNNING))
    assert manager.record_spend(unlimited, 1e9).budget_spent == 1e9
    with pytest.raises(AgentNotFound):
        manager.record_spend(AgentId.generate(), 1.0)
    manager.set_status(unlimited, AgentStatus.STOPPED)
    with pytest.raises(AgentNotRunning):
        manager.record_spend(unlimited, 1.0)
    assert manager.stats().budget_spent == 1e9 + 10.0


def test_a_spend_that_passes_is_one_short_transaction(path: Path) -> None:
    with StateManager.with_sqlite(path) as manager:
        _spend_story(manager)
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=5.0))
        backend = manager.backend
        assert isinstance(backend, SQLiteBackend)
        statements: list[str] = []
        connection = backend._connections.get().db
        connection.set_trace_callback(statements.append)
        try:
            manager.record_spend(agent_id, 1.0)
        finally:
            connection.set_trace_callback(None)
        # The checked UPDATE, then the spend's record with its ledger row: one transaction (the
        # trace repeats a statement for the triggers it runs).
        words = [text.split()[0] for text in dict.fromkeys(statements)]
        assert words == ["BEGIN", "UPDATE", "SELECT", "INSERT", "INSERT", "COMMIT"], statements
        assert "iron_ledger" in [text for text in statements if text.startswith("INSERT")][-1]
        assert not connection.in_transaction
        other = raw(path)
        try:
            spent = other.execute("SELECT budget_spent FROM iron_agents WHERE agent_id = ?", (str(agent_id),))
            assert spent.fetchone() == (1_000_000,)  # micro-units
        finally:
            other.close()


def test_spends_take_the_transaction_where_sqlite_lacks_returning(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iron_runtime_state.backends.sqlite import spending, store

    monkeypatch.setattr(store, "_SPEND_IN_ONE_STATEMENT", False)
    monkeypatch.setattr(spending, "_TAKE_IN_ONE_STATEMENT", False)
    with StateManager.with_sqlite(path) as manager:
        _spend_story(manager)
        agent_id = AgentId.generate()
        manager.save_agent_state(AgentState(agent_id, AgentStatus.RUNNING, budget_limit=1.0))
        hold = manager.reserve_budget(agent_id, 1.0)
        assert manager.commit_reservation(hold, 0.5).budget_spent == 0.5
        with pytest.raises(ReservationError):
            manager.commit_reservation(hold, 0.5)


def test_stopped_and_failed_agents_are_read_from_their_index(path: Path) -> None:
    from iron_runtime_state.backends.sqlite import store

    rng = random.Random(3)
    with StateManager.with_sqlite(path) as manager:
        states = [AgentState(AgentId.generate(), rng.choice(list(AgentStatus))) for _ in range(300)]
        manager.save_agent_states(states)
        for state in rng.sample(states, 60):
            manager.set_status(state.agent_id, rng.choice(list(AgentStatus)))
        for state in rng.sample(states, 20):
            manager.remove_agent_state(state.agent_id)
        for status in AgentStatus:
            expected = sorted(s.agent_id.as_str() for s in manager.iter_agent_states() if s.status is status)
            got = [s.agent_id.as_str() for s in manager.iter_agent_states(status=status, batch_size=7)]
            assert got == expected
        db = raw(path)
        try:
            for status in (AgentStatus.STOPPED, AgentStatus.FAILED):
                sql = store._SQL_PAGE_STATUS[sqlite_schema.STATUS_CODE[status.value]]
                plan = db.execute("EXPLAIN QUERY PLAN " + sql, ("", 10)).fetchall()
                assert "USING INDEX iron_agents_finished" in plan[0][3], plan
        finally:
            db.close()
        failed = sorted(s.agent_id.as_str() for s in manager.iter_agent_states(status=AgentStatus.FAILED))
        assert sorted(manager.purge_agents(older_than=0, status=[AgentStatus.FAILED])) == failed
        assert not any(s.status is AgentStatus.FAILED for s in manager.iter_agent_states())
        assert manager.stats().failed == 0
