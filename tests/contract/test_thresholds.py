"""Budget threshold alerts, on every store and both managers: the spend that first takes a budget
(an agent's own, or a scope's) to a share of its limit writes one ``budget_threshold`` event,
exactly once per threshold per period, even when many callers race past it.
"""

from __future__ import annotations

import threading

import pytest

from iron_runtime_state import AgentState, AgentStatus, AuditRecord, StateError, StateManager
from iron_runtime_state.thresholds import DEFAULT_THRESHOLDS

from .helpers import BOUNDARY, FakeClock, agent_on, details, events, state_of
from .stores import StoreHandle


def crossings(manager: StateManager) -> list[tuple[str | None, float]]:
    return [(details(r).get("scope"), details(r)["threshold"]) for r in events(manager, "budget_threshold")]


def test_default_thresholds_on_the_agent(manager: StateManager) -> None:
    agent = agent_on(manager, limit=10)
    assert state_of(manager, agent).budget_thresholds == DEFAULT_THRESHOLDS
    manager.record_spend(agent, 4.99)
    assert crossings(manager) == []
    manager.record_spend(agent, 0.01)  # exactly 50%
    assert crossings(manager) == [(None, 0.5)]
    manager.record_spend(agent, 5)  # 80% and 100% in one spend
    assert crossings(manager) == [(None, 0.5), (None, 0.8), (None, 1.0)]
    record = events(manager, "budget_threshold")[-1]
    assert record.event.agent_id == agent
    assert details(record) == {"threshold": 1.0, "limit": 10.0, "spent": 10.0, "period_start": None}
    assert manager.verify_audit_log().ok


def test_scope_thresholds_and_custom_ones(manager: StateManager) -> None:
    made = manager.set_budget("team:a", limit=100, thresholds=[0.9, 0.25])
    assert made.thresholds == (0.25, 0.9)
    agent = agent_on(manager, "team:a")
    hold = manager.reserve_budget(agent, 30)
    assert crossings(manager) == []  # a hold is not a spend
    manager.commit_reservation(hold, 30)
    assert crossings(manager) == [("team:a", 0.25)]
    record = events(manager, "budget_threshold")[0]
    assert record.event.agent_id == agent
    assert details(record)["spent"] == 30.0
    state = state_of(manager, agent)
    state.budget_limit = 100.0
    state.budget_thresholds = (0.6,)
    manager.save_agent_state(state)
    assert state_of(manager, agent).budget_thresholds == (0.6,)
    manager.record_spend(agent, 60)
    assert crossings(manager) == [("team:a", 0.25), (None, 0.6), ("team:a", 0.9)]
    manager.set_budget("team:b", limit=1, thresholds=())
    quiet = agent_on(manager, "team:b")
    manager.record_spend(quiet, 1)
    assert len(crossings(manager)) == 3


def test_overspend_by_commit_crosses_higher_thresholds(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10, thresholds=(1.0, 1.5))
    agent = agent_on(manager, "team:a")
    hold = manager.reserve_budget(agent, 5)
    manager.commit_reservation(hold, 16)
    assert crossings(manager) == [("team:a", 1.0), ("team:a", 1.5)]
    types = [r.event.event_type for r in manager.audit_log()][-4:]
    assert types == ["spend", "budget_exceeded", "budget_threshold", "budget_threshold"]


def test_no_limit_no_alert_and_lowered_limit_alerts_at_next_spend(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=None)
    agent = agent_on(manager, "team:a")
    manager.record_spend(agent, 100)
    assert crossings(manager) == []
    manager.set_budget("team:a", limit=120)
    manager.record_spend(agent, 1)  # 101 of 120: past 50% and 80% at once
    assert crossings(manager) == [("team:a", 0.5), ("team:a", 0.8)]
    manager.set_budget("team:a", limit=1000)
    manager.record_spend(agent, 400)  # 50% of the new limit: already alerted this period
    assert crossings(manager) == [("team:a", 0.5), ("team:a", 0.8)]


def test_each_threshold_once_per_period(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 3600)
    manager = store.open(clock=clock)
    manager.set_budget("team:a", limit=10, period="day")
    agent = agent_on(manager, "team:a", limit=10, period="day")
    manager.record_spend(agent, 6)
    manager.record_spend(agent, 1)
    assert crossings(manager) == [(None, 0.5), ("team:a", 0.5)]
    clock.set(BOUNDARY + 60)
    manager.record_spend(agent, 5)
    assert crossings(manager) == [(None, 0.5), ("team:a", 0.5), (None, 0.5), ("team:a", 0.5)]
    last = events(manager, "budget_threshold")[-1]
    assert details(last)["period_start"] == int(BOUNDARY)


def test_racing_spends_alert_each_threshold_once(store: StoreHandle) -> None:
    manager = store.open()
    manager.set_budget("org:x", limit=100)
    agents = [agent_on(manager, "org:x", limit=40) for _ in range(4)]
    barrier = threading.Barrier(16)
    failures: list[BaseException] = []

    def spend(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(5):
                manager.record_spend(agents[i % 4], 1)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    found = crossings(manager)
    assert sorted(t for s, t in found if s == "org:x") == [0.5, 0.8]  # 80 of 100 spent
    assert sorted(t for s, t in found if s is None) == [0.5] * 4  # each agent: 20 of 40


def test_on_event_hook_sees_records(store: StoreHandle) -> None:
    seen: list[AuditRecord] = []
    manager = store.open(on_event=seen.append)
    agent = agent_on(manager, limit=2)
    manager.record_spend(agent, 1)
    assert [r.event.event_type for r in seen][-2:] == ["spend", "budget_threshold"]

    def broken(record: AuditRecord) -> None:
        raise RuntimeError("hook failed")

    quiet = store.open(on_event=broken)
    quiet.record_spend(agent, 0.5)  # the hook's error is logged, the spend stands
    assert state_of(quiet, agent).budget_spent == 1.5


@pytest.mark.parametrize(
    "bad",
    [(0,), (-0.5,), (11,), (float("nan"),), ("0.5",), 0.5, [True], tuple(0.1 * i for i in range(1, 13))],
)
def test_bad_thresholds_change_nothing(manager: StateManager, bad: object) -> None:
    manager.set_budget("team:a", limit=10)
    with pytest.raises(StateError):
        manager.set_budget("team:a", limit=20, thresholds=bad)  # type: ignore[arg-type]
    budget = manager.get_budget("team:a")
    assert budget is not None
    assert budget.limit == 10
    assert budget.thresholds == DEFAULT_THRESHOLDS
    with pytest.raises(StateError):
        AgentState(agent_on(manager), AgentStatus.RUNNING, budget_thresholds=bad)  # type: ignore[arg-type]


def test_on_event_must_be_callable(store: StoreHandle) -> None:
    with pytest.raises(StateError):
        store.open(on_event="print")
