"""Budget scopes above agents (``team:support``, ``org:acme``), on every store.

A spend, a hold and a commit apply to the agent and to every scope it lists, all or nothing;
the scope that refuses is named; holds count against every scope until settled or expired.
"""

from __future__ import annotations

import math
import random
import threading
import time
from decimal import Decimal

import pytest

from iron_runtime_state import (
    AgentState,
    AgentStatus,
    BudgetExceeded,
    BudgetNotFound,
    BudgetState,
    ReservationError,
    StateError,
    StateManager,
)

from .helpers import SYSTEM, agent_on, details, events, micros, state_of
from .stores import StoreHandle


def budget_of(manager: StateManager, scope: str) -> BudgetState:
    budget = manager.get_budget(scope)
    assert budget is not None, scope
    return budget


# -- creating, reading, changing and removing scopes ------------------------------------------------


def test_set_get_list_remove(manager: StateManager) -> None:
    assert manager.list_budgets() == []
    assert manager.get_budget("team:support") is None
    made = manager.set_budget("team:support", limit=100.0)
    assert isinstance(made, BudgetState)
    assert (made.scope, made.limit, made.period, made.tz, made.period_start) == (
        "team:support",
        100.0,
        None,
        "UTC",
        None,
    )
    assert (made.spent, made.held, made.available, made.used) == (0.0, 0.0, 100.0, 0.0)
    assert manager.get_budget("team:support") == made
    manager.set_budget("org:acme", limit=None)
    manager.set_budget("team:billing", limit="25.5")
    assert [b.scope for b in manager.list_budgets()] == ["org:acme", "team:billing", "team:support"]
    assert manager.remove_budget("team:billing") is True
    assert manager.remove_budget("team:billing") is False
    assert manager.get_budget("team:billing") is None
    assert [b.scope for b in manager.list_budgets()] == ["org:acme", "team:support"]


def test_scopes_are_listed_in_code_point_order(store: StoreHandle) -> None:
    """Every store sorts names the same way, whatever a database's collation would do."""
    manager = store.open()
    names = ["team:b", "team-a", "team.a", "team_a", "team:a", "a", "0", "org:z", "z" * 128, "team:a:x"]
    names += [f"s{i:03d}" for i in range(0, 40, 3)]
    for name in names:
        manager.set_budget(name, limit=1.0)
    assert [b.scope for b in manager.list_budgets()] == sorted(names)
    assert all(manager.get_budget(name) is not None for name in names)


def test_scope_events(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10, period="week", tz="Europe/Paris")
    manager.set_budget("team:a", limit=None)
    agent = agent_on(manager, "team:a")
    manager.record_spend(agent, 2.5)
    assert manager.remove_budget("team:a")
    assert not manager.remove_budget("team:a")  # nothing removed: no event
    sets = events(manager, "budget_set")
    assert [r.event.agent_id for r in sets] == [SYSTEM, SYSTEM]
    assert details(sets[0]) == {"scope": "team:a", "limit": 10.0, "period": "week", "tz": "Europe/Paris"}
    assert details(sets[1]) == {"scope": "team:a", "limit": None, "period": None, "tz": "UTC"}
    (removed,) = events(manager, "budget_removed")
    assert removed.event.agent_id == SYSTEM
    assert details(removed) == {"scope": "team:a", "spent": 2.5}
    assert manager.verify_audit_log().ok


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(7, 7.0), (7.25, 7.25), (Decimal("12.345678"), 12.345678), ("0.1", 0.1), ("1e3", 1000.0), (0, 0.0)],
)
def test_limits_of_every_numeric_type(manager: StateManager, limit: object, expected: float) -> None:
    budget = manager.set_budget("team:x", limit=limit)  # type: ignore[arg-type]
    assert budget.limit == expected
    assert type(budget.limit) is float
    assert budget_of(manager, "team:x").limit == expected


def test_a_scope_without_a_limit_tracks_spend(manager: StateManager) -> None:
    manager.set_budget("org:free", limit=None)
    agent = agent_on(manager, "org:free")
    manager.record_spend(agent, 5_000.0)
    budget = budget_of(manager, "org:free")
    assert (budget.limit, budget.spent, budget.available, budget.used) == (None, 5_000.0, math.inf, 0.0)
    assert budget.to_dict()["available"] is None


def test_budget_state_reads(manager: StateManager) -> None:
    manager.set_budget("team:r", limit=8.0)
    agent = agent_on(manager, "team:r")
    manager.record_spend(agent, 2.0)
    manager.reserve_budget(agent, 4.0)
    budget = budget_of(manager, "team:r")
    assert (budget.spent, budget.held, budget.available, budget.used) == (2.0, 4.0, 2.0, 0.75)
    assert budget.spent_exact == Decimal("2")
    assert budget.to_dict() == {
        "scope": "team:r",
        "limit": 8.0,
        "period": None,
        "tz": "UTC",
        "period_start": None,
        "spent": 2.0,
        "held": 4.0,
        "available": 2.0,
        "thresholds": [0.5, 0.8, 1.0],
    }


def test_changing_a_limit_keeps_the_spend(manager: StateManager) -> None:
    manager.set_budget("team:c", limit=10.0)
    agent = agent_on(manager, "team:c")
    manager.record_spend(agent, 8.0)
    lowered = manager.set_budget("team:c", limit=5.0)  # below what is spent: allowed, and nothing fits
    assert (lowered.spent, lowered.available) == (8.0, 0.0)
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(agent, 0.5)
    assert (info.value.scope, info.value.limit, info.value.spent) == ("team:c", 5.0, 8.0)
    manager.set_budget("team:c", limit=None)
    manager.record_spend(agent, 0.5)
    assert budget_of(manager, "team:c").spent == 8.5


def test_scopes_are_not_agents(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=100.0)
    manager.set_budget("org:o", limit=100.0)
    agent = agent_on(manager, "org:o", "team:a")
    manager.record_spend(agent, 1.5)
    stats = manager.stats()
    assert (stats.total, stats.running) == (1, 1)
    assert stats.budget_spent == 1.5  # the scopes' spend is the agent's, counted once
    assert manager.list_agents() == [agent.as_str()]
    assert [s.agent_id for s in manager.iter_agent_states()] == [agent]


# -- spends and holds apply to the agent and every scope, all or nothing --------------------------


def test_a_spend_charges_the_agent_and_every_scope(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=100.0)
    manager.set_budget("team:a", limit=50.0)
    first = agent_on(manager, "org:o", "team:a", limit=20.0)
    second = agent_on(manager, "team:a")
    assert manager.record_spend(first, 2.5).budget_spent == 2.5
    manager.record_spend(second, "1.25")
    assert budget_of(manager, "org:o").spent == 2.5
    assert budget_of(manager, "team:a").spent == 3.75
    assert state_of(manager, second).budget_spent == 1.25


def test_a_scope_refusal_charges_nothing_and_names_the_scope(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=100.0)
    manager.set_budget("team:a", limit=5.0)
    agent = agent_on(manager, "org:o", "team:a", limit=50.0)
    manager.record_spend(agent, 4.0)
    before = manager.audit_count()
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(agent, 2.0)
    err = info.value
    assert (err.scope, err.agent_id, err.limit, err.spent, err.requested, err.reserved) == (
        "team:a",
        agent.as_str(),
        5.0,
        4.0,
        2.0,
        0.0,
    )
    assert "team:a" in str(err)
    assert state_of(manager, agent).budget_spent == 4.0
    assert budget_of(manager, "org:o").spent == 4.0
    assert budget_of(manager, "team:a").spent == 4.0
    assert manager.stats().budget_spent == 4.0
    assert manager.audit_count() == before + 1
    (record,) = events(manager, "budget_exceeded")
    assert record.event.agent_id == agent
    assert details(record) == {
        "action": "spend",
        "limit": 5.0,
        "spent": 4.0,
        "reserved": 0.0,
        "requested": 2.0,
        "scope": "team:a",
    }
    manager.record_spend(agent, 1.0)  # exactly to the scope's limit is allowed


def test_the_agents_own_limit_has_no_scope(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=100.0)
    agent = agent_on(manager, "team:a", limit=3.0)
    with pytest.raises(BudgetExceeded) as info:
        manager.reserve_budget(agent, 4.0)
    assert info.value.scope is None
    (record,) = events(manager, "budget_exceeded")
    assert "scope" not in details(record)
    assert details(record)["action"] == "reserve"
    assert budget_of(manager, "team:a").held == 0.0


def test_checks_run_agent_first_then_scopes_in_listed_order(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=1.0)
    manager.set_budget("team:b", limit=1.0)
    both = agent_on(manager, "team:a", "team:b", limit=1.0)
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(both, 2.0)
    assert info.value.scope is None
    forward = agent_on(manager, "team:a", "team:b")
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(forward, 2.0)
    assert info.value.scope == "team:a"
    backward = agent_on(manager, "team:b", "team:a")
    with pytest.raises(BudgetExceeded) as info:
        manager.reserve_budget(backward, 2.0)
    assert info.value.scope == "team:b"
    scopes = [details(r).get("scope") for r in events(manager, "budget_exceeded")]
    assert scopes == [None, "team:a", "team:b"]


def test_a_hold_counts_against_every_scope(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=20.0)
    manager.set_budget("team:a", limit=5.0)
    holder = agent_on(manager, "org:o", "team:a")
    other = agent_on(manager, "team:a")
    hold = manager.reserve_budget(holder, 3.0)
    assert hold.amount == 3.0
    assert sorted(hold.scopes) == ["org:o", "team:a"]
    assert (budget_of(manager, "org:o").held, budget_of(manager, "team:a").held) == (3.0, 3.0)
    assert budget_of(manager, "team:a").available == 2.0
    assert manager.budget_available(other) == 2.0  # the least of the agent's and its scopes'
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(other, 2.5)
    assert (info.value.scope, info.value.reserved, info.value.spent) == ("team:a", 3.0, 0.0)
    manager.record_spend(other, 2.0)
    state = manager.commit_reservation(hold, 2.5)
    assert state.budget_spent == 2.5
    org, team = budget_of(manager, "org:o"), budget_of(manager, "team:a")
    assert (org.spent, org.held, team.spent, team.held) == (2.5, 0.0, 4.5, 0.0)


def test_release_frees_every_scope(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=10.0)
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "org:o", "team:a")
    hold = manager.reserve_budget(agent, 10.0)
    manager.release_reservation(hold)
    for scope in ("org:o", "team:a"):
        budget = budget_of(manager, scope)
        assert (budget.spent, budget.held, budget.available) == (0.0, 0.0, 10.0)
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 1.0)
    assert budget_of(manager, "team:a").spent == 0.0


def test_the_budget_context_manager_applies_to_scopes(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "team:a")
    with manager.budget(agent, 6.0) as hold:
        assert budget_of(manager, "team:a").held == 6.0
        hold.commit(4.0)
    assert (budget_of(manager, "team:a").spent, budget_of(manager, "team:a").held) == (4.0, 0.0)
    with manager.budget(agent, 6.0):
        pass  # ended without a commit: released everywhere
    assert budget_of(manager, "team:a").held == 0.0
    with pytest.raises(BudgetExceeded) as info, manager.budget(agent, 6.5):
        pass
    assert info.value.scope == "team:a"


def test_an_overspending_commit_stands_and_is_audited_per_scope(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=100.0)
    manager.set_budget("team:a", limit=5.0)
    agent = agent_on(manager, "org:o", "team:a", limit=6.0)
    hold = manager.reserve_budget(agent, 4.0)
    state = manager.commit_reservation(hold, 7.0)  # the call cost more than estimated
    assert state.budget_spent == 7.0
    assert budget_of(manager, "team:a").spent == 7.0
    assert budget_of(manager, "org:o").spent == 7.0
    records = events(manager, "budget_exceeded")
    found = sorted((details(r).get("scope") or "", details(r)["limit"]) for r in records)
    assert found == [("", 6.0), ("team:a", 5.0)]  # the agent and the team passed; the org did not
    for record in records:
        info = details(record)
        assert record.event.agent_id == agent
        assert (info["action"], info["spent"], info["committed"], info["reserved"]) == (
            "commit",
            7.0,
            7.0,
            4.0,
        )
        assert info["reservation"] == hold.reservation_id


def test_an_expired_hold_leaves_every_scope(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "team:a")
    hold = manager.reserve_budget(agent, 9.0, ttl=0.3)
    assert budget_of(manager, "team:a").held == 9.0
    time.sleep(0.5)
    assert budget_of(manager, "team:a").held == 0.0
    manager.reserve_budget(agent, 10.0)
    with pytest.raises(ReservationError):
        manager.commit_reservation(hold, 1.0)
    assert budget_of(manager, "team:a").spent == 0.0


def test_removing_an_agent_drops_its_holds_on_scopes(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "team:a")
    manager.reserve_budget(agent, 7.0)
    manager.set_status(agent, AgentStatus.STOPPED)
    assert manager.remove_agent_state(agent)
    assert budget_of(manager, "team:a").held == 0.0


# -- scopes that do not exist -----------------------------------------------------------------------


def test_a_missing_scope_is_budget_not_found_and_changes_nothing(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=10.0)
    agent = agent_on(manager, "org:o", "team:nope", limit=5.0)  # saving names no scope check
    before = (manager.audit_count(), manager.stats())
    for call in (
        lambda: manager.record_spend(agent, 1.0),
        lambda: manager.reserve_budget(agent, 1.0),
    ):
        with pytest.raises(BudgetNotFound) as info:
            call()
        err = info.value
        assert isinstance(err, StateError)
        assert isinstance(err, KeyError)
        assert err.scope == "team:nope"
        assert "team:nope" in str(err)
        assert "set_budget" in str(err)
    with pytest.raises(BudgetNotFound), manager.budget(agent, 1.0):
        pass
    assert (manager.audit_count(), manager.stats()) == before
    assert state_of(manager, agent).budget_spent == 0.0
    org = budget_of(manager, "org:o")
    assert (org.spent, org.held) == (0.0, 0.0)
    manager.set_budget("team:nope", limit=None)
    manager.record_spend(agent, 1.0)
    assert budget_of(manager, "org:o").spent == 1.0


def test_removing_a_scope_with_an_open_hold(manager: StateManager) -> None:
    manager.set_budget("org:o", limit=10.0)
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "org:o", "team:a")
    hold = manager.reserve_budget(agent, 4.0)
    assert manager.remove_budget("team:a")
    with pytest.raises(BudgetNotFound):
        manager.record_spend(agent, 1.0)
    state = manager.commit_reservation(hold, 3.0)  # the removed scope is skipped
    assert state.budget_spent == 3.0
    org = budget_of(manager, "org:o")
    assert (org.spent, org.held) == (3.0, 0.0)
    again = manager.set_budget("team:a", limit=10.0)
    assert (again.spent, again.held) == (0.0, 0.0)  # a new scope: nothing of the old one
    manager.record_spend(agent, 1.0)
    assert budget_of(manager, "team:a").spent == 1.0


def test_a_removed_scope_drops_its_holds(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10.0)
    agent = agent_on(manager, "team:a")
    hold = manager.reserve_budget(agent, 6.0)
    manager.remove_budget("team:a")
    manager.set_budget("team:a", limit=10.0)
    assert budget_of(manager, "team:a").held == 0.0
    manager.release_reservation(hold)  # the agent's part of the hold is still open
    assert manager.budget_available(agent) == 10.0


def test_an_agent_can_change_its_scopes(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=10.0)
    manager.set_budget("team:b", limit=10.0)
    agent = agent_on(manager, "team:a")
    manager.record_spend(agent, 2.0)

    def move(state: AgentState) -> AgentState:
        state.budget_scopes = ("team:b",)
        return state

    assert manager.update_agent_state(agent, move).budget_scopes == ("team:b",)
    manager.record_spend(agent, 3.0)
    assert (budget_of(manager, "team:a").spent, budget_of(manager, "team:b").spent) == (2.0, 3.0)
    assert state_of(manager, agent).budget_spent == 5.0


# -- many threads on shared scopes -------------------------------------------------------------------


def test_threads_never_pass_a_shared_scope(store: StoreHandle) -> None:
    """8 threads spend, reserve, commit and release on 4 agents of one team and one org."""
    manager = store.open()
    limits = {"org:o": 30.0, "team:a": 20.0}
    for scope, limit in limits.items():
        manager.set_budget(scope, limit=limit)
    agents = [agent_on(manager, "org:o", "team:a", limit=8.0 if i % 2 else None) for i in range(4)]
    rounds = max(10, int(60 * store.scale))
    refused: list[str | None] = []
    violations: list[tuple[str, float, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                agent = rng.choice(agents)
                amount = rng.choice([0.1, 0.3, 0.7, 1.1])
                try:
                    if rng.random() < 0.4:
                        manager.record_spend(agent, amount)
                        continue
                    hold = manager.reserve_budget(agent, amount)
                except BudgetExceeded as exc:
                    with lock:
                        refused.append(exc.scope)
                    continue
                if rng.random() < 0.25:
                    manager.release_reservation(hold)
                else:
                    manager.commit_reservation(hold, rng.choice([amount, 0.05, 0.0]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def watch() -> None:
        while not done.is_set():
            for scope, limit in limits.items():
                budget = budget_of(manager, scope)
                if micros(budget.spent) + micros(budget.held) > micros(limit):
                    violations.append((scope, budget.spent, budget.held))
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors
    assert not violations
    spent = [micros(state_of(manager, a).budget_spent) for a in agents]
    for scope, limit in limits.items():
        budget = budget_of(manager, scope)
        assert budget.held == 0.0
        assert micros(budget.spent) == sum(spent)  # every agent draws on both scopes
        assert budget.spent <= limit
    for agent in agents[1::2]:
        assert state_of(manager, agent).budget_spent <= 8.0
    assert micros(manager.stats().budget_spent) == sum(spent)
    recorded = [details(r).get("scope") for r in events(manager, "budget_exceeded")]
    assert sorted(recorded, key=str) == sorted(refused, key=str)
