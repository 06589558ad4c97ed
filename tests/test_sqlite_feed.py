"""The SQLite store behind the dashboard: ``wait_audit`` (what ``watch()`` blocks on) and
``page_agents`` (the agents table), on real files and across processes.

``wait_audit`` polls ``PRAGMA data_version``, which changes when another connection commits;
``page_agents`` answers from indexes (checked with ``EXPLAIN QUERY PLAN``) and must give exactly
what the contract's default (read every match, sort in Python) gives.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, AuditEvent, StateManager
from iron_runtime_state.audit_chain import AuditChain
from iron_runtime_state.backends.base import AGENT_ORDERS, AgentPage, Backend
from iron_runtime_state.backends.sqlite import SQLiteBackend, paging
from iron_runtime_state.backends.sqlite.rows import label_pattern, labels_text

from .sqlite_support import Workers, url_of, worker_group

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="worker subprocesses use POSIX pipes")

workers = pytest.fixture(worker_group, name="workers")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def backend(path: Path) -> Iterator[SQLiteBackend]:
    store = SQLiteBackend(path)
    yield store
    store.close()


def note(i: int = 0) -> AuditEvent:
    return AuditEvent(AgentId.test_fixture(1), "note", 1_700_000_000, f"n{i}")


# -- wait_audit ------------------------------------------------------------------------------------


def test_a_watch_gets_what_another_process_appends_within_100_ms(path: Path, workers: Workers) -> None:
    manager = StateManager.with_sqlite(path)
    count = 40
    proc = workers.spawn("tick", url_of(path), count, 0.03)
    Workers.start_together([proc])
    latencies: list[float] = []
    seqs: list[int] = []
    for record in manager.watch(after_seq=0, idle_timeout=30):
        # details: the appender's clock just before its append (the same machine's clock).
        latencies.append(time.time() - float(record.event.details))
        seqs.append(record.seq)
        if len(seqs) == count:
            break
    assert workers.finish(proc)[-1] == "saved"
    manager.close()
    assert seqs == list(range(1, count + 1))
    assert statistics.median(latencies) < 0.1, sorted(latencies)


def test_wait_audit_wakes_for_another_thread_and_times_out_on_other_commits(path: Path) -> None:
    waiting, other = SQLiteBackend(path), SQLiteBackend(path)
    chain = AuditChain()
    head = waiting.audit_marks().head[0]

    def save_agents() -> None:  # commits that append nothing: the head stays where it was
        for i in range(20):
            other.save(AgentState(AgentId.test_fixture(i + 1), AgentStatus.RUNNING), time.time())
            time.sleep(0.01)

    saver = threading.Thread(target=save_agents)
    started = time.monotonic()
    saver.start()
    assert waiting.wait_audit(head, 0.4) is False
    waited = time.monotonic() - started
    saver.join()
    assert 0.4 <= waited < 1.0

    def append_later() -> None:
        time.sleep(0.1)
        other.append_audit([note()], chain)

    appender = threading.Thread(target=append_later)
    started = time.monotonic()
    appender.start()
    assert waiting.wait_audit(head, 10) is True
    assert time.monotonic() - started < 1.0
    appender.join()
    waiting.close()
    other.close()


def test_wait_audit_sees_an_append_of_its_own_connection(backend: SQLiteBackend) -> None:
    # A connection's own commits leave its data_version as it was: the first look reads the head.
    chain = AuditChain()
    head = backend.audit_marks().head[0]
    backend.append_audit([note()], chain)
    started = time.monotonic()
    assert backend.wait_audit(head, 10) is True
    assert backend.wait_audit(head + 1, 0) is False
    assert time.monotonic() - started < 0.5


def test_wait_audit_costs_little_cpu(backend: SQLiteBackend) -> None:
    head = backend.audit_marks().head[0]
    cpu = time.process_time()
    assert backend.wait_audit(head, 1.0) is False
    # ~100 looks at the data version in a second: a few ms of CPU at most (a busy loop: 1 s).
    assert time.process_time() - cpu < 0.05


# -- page_agents ------------------------------------------------------------------------------------

VALUES = ("a", "b", 'q"uote', "back\\slash", "é", '"env":"a"', "", "a,b")
KEYS = ("team", "env", "x.y")


def random_fleet(rng: random.Random, count: int) -> list[AgentState]:
    """Agents with few distinct spends and PII counts (many ties) and labels that look alike."""
    states = []
    for _ in range(count):
        labels = {key: rng.choice(VALUES) for key in KEYS if rng.random() < 0.6}
        states.append(
            AgentState(
                AgentId.test_fixture(rng.randrange(10**9)),
                rng.choice(list(AgentStatus)),
                rng.choice([0.0, 1.5, 2.0, 3.25, round(rng.random() * 10, 6)]),
                rng.randrange(4),
                labels=labels,
            )
        )
    return states


def random_page(rng: random.Random) -> AgentPage:
    keys = rng.sample(KEYS, rng.randrange(0, 3))
    return AgentPage(
        rng.choice([None, *AgentStatus]),
        {key: rng.choice(VALUES) for key in keys} or None,
        rng.choice(AGENT_ORDERS),
        rng.random() < 0.5,
        rng.choice([0, 0, 1, 5, 50, 400, 1_200, 5_000]),
        rng.choice([1, 7, 50, 1_000]),
    )


@pytest.mark.parametrize("plan", ["labels drive", "table drives"])
def test_pages_match_the_contract_default_exactly(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch, plan: str
) -> None:
    rng = random.Random(19)
    states = random_fleet(rng, 3_000)
    backend.save_many(states, time.time())
    # Force each way of reading a sorted page: any label is "rare", or none is.
    if plan == "labels drive":
        monkeypatch.setattr(paging, "_RARE_SHARE", 1)
        monkeypatch.setattr(paging, "_RARE_AT_LEAST", 10**9)
        monkeypatch.setattr(paging, "_WALK_COUNT", 10**9)
    else:
        monkeypatch.setattr(paging, "_RARE_AT_LEAST", 1)
        monkeypatch.setattr(paging, "_RARE_SHARE", 10**9)
        monkeypatch.setattr(paging, "_WALK_COUNT", 1)
    for _ in range(400):
        page = random_page(rng)
        assert backend.page_agents(page) == Backend.page_agents(backend, page), page


def test_a_page_reads_one_snapshot_while_others_write(path: Path) -> None:
    # Counts (to skip a status) and rows come from one read transaction.
    reader, writer = SQLiteBackend(path), SQLiteBackend(path)
    ids = [AgentId.test_fixture(i + 1) for i in range(300)]
    statuses = list(AgentStatus)
    writer.save_many([AgentState(a, statuses[i % 3]) for i, a in enumerate(ids)], time.time())
    stop = threading.Event()

    def flip() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            writer.save(AgentState(rng.choice(ids), rng.choice(statuses)), time.time())

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        for offset in range(0, 300, 25):
            page = reader.page_agents(AgentPage(order_by="status", offset=offset, limit=50))
            keys = [(s.status.value, s.agent_id.as_str()) for s in page]
            assert keys == sorted(keys)
            assert len(keys) == min(50, 300 - offset)
            assert len(set(keys)) == len(keys)
    finally:
        stop.set()
        thread.join()
        reader.close()
        writer.close()


def test_label_patterns_find_exactly_the_labels() -> None:
    tricky = {"a": '"b":"c"', "b": "c", "k": 'x\\"y', "z": "é,}"}
    text = labels_text(tricky)
    assert text is not None
    for key, value in tricky.items():
        assert label_pattern(key, value) in text
    for key, value in [("b", '"c"'), ("a", "b"), ("c", ""), ("b", "c\\"), ("k", 'x"y'), ("z", "é")]:
        assert label_pattern(key, value) not in text, (key, value)


def plans(path: Path, page: AgentPage) -> list[str]:
    """The query plan of every statement ``page_agents`` runs for ``page``."""
    backend = SQLiteBackend(path)
    statements: list[str] = []
    db = backend._connections.get().db
    db.set_trace_callback(statements.append)  # the statements with their parameters written in
    backend.page_agents(page)
    db.set_trace_callback(None)
    found = []
    for sql in statements:
        if sql.startswith("SELECT"):
            found.append(" | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)))
    backend.close()
    return found


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 20,000 agents, 2% of them with a rare label, a tenth stopped or failed."""
    path = tmp_path_factory.mktemp("fleet") / "fleet.db"
    rng = random.Random(5)
    with StateManager.with_sqlite(path) as manager:
        manager.save_agent_states(
            AgentState(
                AgentId.test_fixture(i + 1),
                AgentStatus.RUNNING if i % 10 else rng.choice([AgentStatus.STOPPED, AgentStatus.FAILED]),
                rng.random(),
                labels={"team": f"t{i % 4}", **({"rare": "yes"} if i % 50 == 0 else {})},
            )
            for i in range(20_000)
        )
    return path


LABEL_RANGE = "SEARCH l USING COVERING INDEX iron_labels_by_value (key=? AND value=?)"
AGENT_ROW = "SEARCH a USING PRIMARY KEY (agent_id=?)"
SORTED = "USE TEMP B-TREE FOR ORDER BY"
FINISHED = "SEARCH a USING INDEX iron_agents_finished (status=?)"
# A label counted up to a bound: the range of its index entries only.
COUNTED = "SEARCH iron_labels USING COVERING INDEX iron_labels_by_value (key=? AND value=?)"


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        # Id order: read in order from an index, only as far as the page goes (no sort).
        (AgentPage(), ["SCAN a"]),
        (AgentPage(descending=True, offset=100), ["SCAN a"]),
        (AgentPage(status=AgentStatus.STOPPED), [FINISHED]),
        (AgentPage(labels={"team": "t1"}), [f"{LABEL_RANGE} | {AGENT_ROW}"]),
        # Two labels: both counted through their index, the rarer one read.
        (
            AgentPage(labels={"team": "t1", "rare": "yes"}),
            [COUNTED] * 2 + [f"{LABEL_RANGE} | {AGENT_ROW}"],
        ),
        # By status: the count of each status from iron_stats, then each status in id order
        # (failed, running, stopped), from where the page starts.
        (AgentPage(order_by="status", offset=900, limit=1_000), ["SCAN iron_stats", FINISHED, "SCAN a"]),
        (AgentPage(order_by="status", offset=19_500), ["SCAN iron_stats", FINISHED]),
        # Sorted by spend: a bounded sort of a scan, or of a rare label's agents.
        (AgentPage(order_by="budget_spent"), ["SCAN iron_stats", f"SCAN a | {SORTED}"]),
        (
            AgentPage(order_by="budget_spent", status=AgentStatus.FAILED),
            ["SCAN iron_stats", f"{FINISHED} | {SORTED}"],
        ),
        (
            AgentPage(order_by="pii_detections", labels={"rare": "yes"}),
            ["SCAN iron_stats", COUNTED, f"{LABEL_RANGE} | {AGENT_ROW} | {SORTED}"],
        ),
        (
            AgentPage(order_by="budget_spent", labels={"team": "t2"}),
            ["SCAN iron_stats", COUNTED, f"SCAN a | {SORTED}"],
        ),
    ],
)
def test_pages_are_read_from_indexes(fleet: Path, page: AgentPage, expected: list[str]) -> None:
    found = plans(fleet, page)
    assert len(found) == len(expected), found
    for plan, wanted in zip(found, expected, strict=True):
        # Every step expected is there, and a sort only where one is expected.
        assert all(step in plan for step in wanted.split(" | ")), (plan, wanted)
        assert (SORTED in plan) == (SORTED in wanted), (plan, wanted)
