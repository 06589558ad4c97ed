"""Budgets shared by processes: never overspent, holds of a killed process expire, one reset.

Every store several processes can share (``multiprocess`` in tests/contract/stores.py: SQLite,
Redis, Redis Cluster, and any store added there) runs these with real processes
(tests/budget_worker.py) and a real SIGKILL; nothing is mocked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, StateManager
from iron_runtime_state.money import to_micros

from .contract.helpers import BOUNDARY, FakeClock, at, details
from .contract.stores import PROVISIONERS, StoreHandle
from .sqlite_support import Workers as SqliteWorkers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

WORKER = Path(__file__).with_name("budget_worker.py")


@pytest.fixture(params=sorted(name for name in PROVISIONERS if name != "memory"))
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHandle]:
    """An empty store of each kind that several processes can share."""
    handle = PROVISIONERS[request.param](request, tmp_path)
    if not handle.multiprocess:
        pytest.skip(f"{handle.name} is not shared between processes")
    try:
        yield handle
    finally:
        handle.close_all()


class Workers(SqliteWorkers):
    """The SQLite tests' group of worker processes, running tests/budget_worker.py instead."""

    def spawn(self, job: str, *args: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), job, *(str(a) for a in args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def said(self, proc: subprocess.Popen[str]) -> str:
        """The worker's next line (it must still be running to say it)."""
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            out, err = self.rest_of(proc)
            raise AssertionError(f"worker exited ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        return line

    def result(self, proc: subprocess.Popen[str]) -> dict[str, dict[str, int]]:
        """The worker's JSON report, once it exited; fails on a non-zero exit."""
        report: dict[str, dict[str, int]] = json.loads(self.finish(proc)[-1])
        return report


@pytest.fixture
def workers() -> Iterator[Workers]:
    group = Workers()
    try:
        yield group
    finally:
        group.kill_all()


def save(
    manager: StateManager, scopes: tuple[str, ...], limit: float | None = None, period: str | None = None
) -> str:
    agent_id = AgentId.generate()
    manager.save_agent_state(
        AgentState(
            agent_id, AgentStatus.RUNNING, budget_limit=limit, budget_scopes=scopes, budget_period=period
        )
    )
    return agent_id.as_str()


# Limits chosen so that all three kinds of budget refuse during the run: the capped agents
# early, then team:a, then the org (team:b never fills: the org stops it first). Agents list
# their scopes in both orders, so a full org and a full team each get to refuse first.
LIMITS = {"org:o": 150.0, "team:a": 50.0, "team:b": 200.0}
AGENT_LIMIT = 10.0
PROCESSES, THREADS, ROUNDS = 4, 8, 40
HOLDER_TTL, HOLDER_HOLDS, HOLDER_AMOUNT = 4.0, 3, 2.0


def test_processes_never_overspend_an_agent_or_a_scope(shared: StoreHandle, workers: Workers) -> None:
    manager = shared.open()
    for scope, scope_limit in LIMITS.items():
        manager.set_budget(scope, limit=scope_limit)
    teams: dict[str, list[str]] = {"team:a": [], "team:b": []}
    limits: dict[str, float | None] = {}
    for team, agents in teams.items():
        for i in range(4):
            scopes = ("org:o", team) if i % 2 == 0 else (team, "org:o")
            limit: float | None = AGENT_LIMIT if i < 2 else None
            agent = save(manager, scopes, limit)
            agents.append(agent)
            limits[agent] = limit
    every = teams["team:a"] + teams["team:b"]
    capped = [agent for agent in every if limits[agent] is not None]
    holder_agent = save(manager, ("org:o", "team:a"))
    hammers = [
        workers.spawn("hammer", shared.url, seed, THREADS, ROUNDS, *every) for seed in range(PROCESSES)
    ]

    # One more process takes holds and is killed while holding them.
    spawned = time.time()
    holder = workers.spawn("hold", shared.url, holder_agent, HOLDER_TTL, HOLDER_HOLDS, HOLDER_AMOUNT)
    assert workers.said(holder) == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    held = to_micros(HOLDER_HOLDS * HOLDER_AMOUNT)
    assert manager.backend.reserved(AgentId(holder_agent), time.time())[1] == held
    for scope in ("org:o", "team:a"):
        budget = manager.get_budget(scope)
        assert budget is not None
        assert to_micros(budget.held) == held

    # Watch from outside while they run: each read is one atomic view of one budget.
    workers.start_together(hammers)
    violations: list[tuple[str, float, float]] = []
    holds_gone_at: float | None = None

    def look() -> None:
        nonlocal holds_gone_at
        for scope, limit in LIMITS.items():
            budget = manager.get_budget(scope)
            assert budget is not None
            if to_micros(budget.spent) + to_micros(budget.held) > to_micros(limit):
                violations.append((scope, budget.spent, budget.held))
        for agent in capped:
            state, reserved = manager.backend.reserved(AgentId(agent), time.time())
            if to_micros(state.budget_spent) + reserved > to_micros(AGENT_LIMIT):
                violations.append((agent, state.budget_spent, reserved))
        if holds_gone_at is None and manager.backend.reserved(AgentId(holder_agent), time.time())[1] == 0:
            holds_gone_at = time.time()

    while any(p.poll() is None for p in hammers):
        look()
        time.sleep(0.02)
    reports = [workers.result(p) for p in hammers]
    deadline = time.monotonic() + HOLDER_TTL + 15
    while holds_gone_at is None and time.monotonic() < deadline:
        look()
        time.sleep(0.05)
    assert not violations, violations[:10]

    # The killed process's holds lasted their ttl, then went by themselves.
    assert holds_gone_at is not None, "the killed process's holds never expired"
    assert holds_gone_at >= spawned + HOLDER_TTL
    for scope in LIMITS:
        budget = manager.get_budget(scope)
        assert budget is not None
        assert budget.held == 0.0, scope

    # No budget passed its limit, and every charge is counted once everywhere.
    charged = sum((Counter(r["charged"]) for r in reports), Counter())
    spent = {}
    for agent in [*every, holder_agent]:
        state = manager.get_agent_state(agent)
        assert state is not None
        spent[agent] = to_micros(state.budget_spent)
        assert spent[agent] == charged[agent], agent
        if limits.get(agent) is not None:
            assert state.budget_spent <= AGENT_LIMIT
    assert spent[holder_agent] == 0
    budgets = {b.scope: b for b in manager.list_budgets()}
    for scope, limit in LIMITS.items():
        assert budgets[scope].spent <= limit, scope
    assert to_micros(budgets["team:a"].spent) == sum(spent[a] for a in teams["team:a"])
    assert to_micros(budgets["team:b"].spent) == sum(spent[a] for a in teams["team:b"])
    assert to_micros(budgets["org:o"].spent) == sum(spent.values())
    assert to_micros(manager.stats().budget_spent) == sum(spent.values())

    # Every refusal wrote one budget_exceeded event naming the budget that refused; no commit
    # went past a limit (each commits at most its hold).
    refused = sum((Counter(r["refused"]) for r in reports), Counter())
    calls = sum((Counter(r["calls"]) for r in reports), Counter())
    recorded = [details(r) for r in manager.audit_log(event_type="budget_exceeded")]
    assert all(info["action"] in ("spend", "reserve") for info in recorded)
    assert Counter(info.get("scope", "") for info in recorded) == refused
    print(
        f"{shared.name}: calls {dict(calls)}, refused by {dict(refused)}, spent",
        {s: b.spent for s, b in budgets.items()},
    )
    assert refused["org:o"] > 0
    assert refused["team:a"] > 0
    assert refused[""] > 0
    assert calls["expired"] == 0
    assert sum(calls.values()) + sum(refused.values()) == PROCESSES * THREADS * ROUNDS

    # The ledger: one spend record per charge, summing to every budget (issue 17); each
    # threshold of each budget alerted at most once.
    ledger = {row.group["agent"]: row for row in manager.spend_report(group_by=("agent",))}
    assert {a: to_micros(row.amount) for a, row in ledger.items()} == {a: n for a, n in spent.items() if n}
    by_scope = {row.group["scope"]: row for row in manager.spend_report(group_by=("scope",))}
    for scope in LIMITS:
        assert to_micros(by_scope[scope].amount) == to_micros(budgets[scope].spent), scope
    alerts = Counter(
        (record.event.agent_id.as_str() if "scope" not in info else info["scope"], info["threshold"])
        for record in manager.audit_log(event_type="budget_threshold")
        for info in [details(record)]
    )
    assert alerts, "no threshold was crossed"
    assert set(alerts.values()) == {1}, alerts
    assert manager.verify_audit_log().ok


def test_processes_racing_past_a_period_boundary_reset_once(shared: StoreHandle, workers: Workers) -> None:
    before = shared.open(clock=FakeClock(BOUNDARY - 10))
    before.set_budget("org:race", limit=None, period="month")
    before.set_budget("team:race", limit=1000.0, period="week")
    agents = [save(before, ("org:race", "team:race"), 100.0, "day") for _ in range(3)]
    for agent in agents:
        before.record_spend(agent, 1.5)
    racers = [workers.spawn("race", shared.url, BOUNDARY + 1, 4, 10, *agents) for _ in range(6)]
    workers.start_together(racers)
    spends = sum((Counter(workers.result(p)) for p in racers), Counter())
    assert sum(spends.values()) == 6 * 4 * 10

    found: Counter[str] = Counter()
    for record in before.audit_log(event_type="budget_reset"):
        info = details(record)
        key = info.get("scope") or record.event.agent_id.as_str()
        found[key] += 1
        if "scope" not in info:
            assert info == {
                "period": "day",
                "tz": "UTC",
                "period_start": int(BOUNDARY - 86_400),
                "spent": 1.5,
            }
        elif info["scope"] == "org:race":
            assert (info["period"], info["period_start"], info["spent"]) == (
                "month",
                int(at(2027, 1, 1)),
                4.5,
            )
        else:
            assert (info["period"], info["period_start"], info["spent"]) == (
                "week",
                int(at(2027, 1, 25)),
                4.5,
            )
    assert found == Counter([*agents, "org:race", "team:race"])

    after = shared.open(clock=FakeClock(BOUNDARY + 2))
    for agent in agents:
        state = after.get_agent_state(agent)
        assert state is not None
        assert (state.budget_spent, state.period_start) == (spends[agent] * 0.25, BOUNDARY)
    for scope in ("org:race", "team:race"):
        budget = after.get_budget(scope)
        assert budget is not None
        assert budget.spent == sum(spends.values()) * 0.25
    assert after.verify_audit_log().ok
