"""Exact money on every store: amounts are whole micro-units (0.000001), never float sums."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    BudgetExceeded,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.models import MAX_AMOUNT

from .helpers import agent_on, details, events, is_positive_zero, state_of
from .stores import StoreHandle


def test_ten_tenths_are_exactly_one(manager: StateManager) -> None:
    manager.set_budget("team:t", limit=1.0)
    agent = agent_on(manager, "team:t", limit=1.0)
    for _ in range(10):
        manager.record_spend(agent, 0.1)
    state = state_of(manager, agent)
    assert state.budget_spent == 1.0  # not 0.9999999999999999
    assert state.spent_exact == Decimal("1")
    budget = manager.get_budget("team:t")
    assert budget is not None
    assert (budget.spent, budget.spent_exact, budget.available) == (1.0, Decimal("1"), 0.0)
    assert manager.stats().budget_spent == 1.0
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 0.000001)


def test_the_smallest_amounts_add_up_exactly(store: StoreHandle) -> None:
    manager = store.open()
    manager.set_budget("team:u", limit=None)
    agent = agent_on(manager, "team:u")
    count = max(100, int(2000 * store.scale))
    for _ in range(count):
        manager.record_spend(agent, 0.000001)
    expected = Decimal(count).scaleb(-6)
    assert state_of(manager, agent).spent_exact == expected
    assert state_of(manager, agent).budget_spent == float(expected)
    budget = manager.get_budget("team:u")
    assert budget is not None
    assert budget.spent_exact == expected
    assert manager.stats().budget_spent == float(expected)


def test_a_million_millionths_are_exactly_one(store: StoreHandle, api: str) -> None:
    if store.name != "memory" or api != "sync":
        pytest.skip("a million calls: on the in-memory store only (the others add the same integers)")
    manager = store.open()
    agent = agent_on(manager)
    spend = manager.record_spend
    for _ in range(1_000_000):
        spend(agent, 0.000001)
    assert state_of(manager, agent).budget_spent == 1.0
    assert manager.stats().budget_spent == 1.0


def test_every_numeric_type_is_an_amount(manager: StateManager) -> None:
    manager.set_budget("team:n", limit="10")
    agent = agent_on(manager, "team:n", limit=Decimal("10"))  # type: ignore[arg-type]
    manager.record_spend(agent, 1)
    manager.record_spend(agent, 0.1)
    manager.record_spend(agent, Decimal("0.2"))
    manager.record_spend(agent, "0.3")
    manager.record_spend(agent, "1e-6")
    hold = manager.reserve_budget(agent, Decimal("2.5"))
    manager.commit_reservation(hold, "2.000001")
    state = state_of(manager, agent)
    assert state.spent_exact == Decimal("3.600002")
    assert state.budget_spent == 3.600002
    assert state.budget_limit == 10.0
    budget = manager.get_budget("team:n")
    assert budget is not None
    assert (budget.spent_exact, budget.held) == (Decimal("3.600002"), 0.0)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("0.0000025", Decimal("0.000002")),  # half to even: down
        ("0.0000035", Decimal("0.000004")),  # half to even: up
        (Decimal("1.0000005"), Decimal("1")),
        ("0.00000151", Decimal("0.000002")),
        (0.1 + 0.2, Decimal("0.3")),  # a float is read by its value to the micro-unit
    ],
)
def test_amounts_finer_than_a_micro_unit_round_half_to_even(
    manager: StateManager, amount: object, expected: Decimal
) -> None:
    agent = agent_on(manager)
    assert manager.record_spend(agent, amount).spent_exact == expected  # type: ignore[arg-type]
    assert state_of(manager, agent).spent_exact == expected


@pytest.mark.parametrize("amount", ["0.0000004", Decimal("0.0000005"), 4e-7, "0", 0])
def test_a_spend_of_no_micro_unit_is_refused(manager: StateManager, amount: object) -> None:
    agent = agent_on(manager)
    with pytest.raises(ValidationError):
        manager.record_spend(agent, amount)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        manager.reserve_budget(agent, amount)  # type: ignore[arg-type]
    assert state_of(manager, agent).budget_spent == 0.0
    assert manager.audit_count() == 0


@pytest.mark.parametrize(
    "amount",
    [
        math.nan,
        math.inf,
        -math.inf,
        -1.0,
        -0.000001,
        "nan",
        "inf",
        "-1",
        "abc",
        "",
        "1,5",
        Decimal("NaN"),
        Decimal("-2"),
        Decimal("Infinity"),
    ],
)
def test_bad_amounts_are_a_validation_error(manager: StateManager, amount: object) -> None:
    agent = agent_on(manager, limit=5.0)
    hold = manager.reserve_budget(agent, 1.0)
    for call in (
        lambda: manager.record_spend(agent, amount),  # type: ignore[arg-type]
        lambda: manager.reserve_budget(agent, amount),  # type: ignore[arg-type]
        lambda: manager.commit_reservation(hold, amount),  # type: ignore[arg-type]
        lambda: manager.set_budget("team:bad", limit=amount),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValidationError):
            call()
    assert manager.get_budget("team:bad") is None
    assert state_of(manager, agent).budget_spent == 0.0
    manager.commit_reservation(hold, 1.0)  # still open
    assert [r.event.event_type for r in manager.audit_log()] == ["spend"]  # of that commit alone


@pytest.mark.parametrize("amount", [True, False, None, b"1", [1], complex(1, 0), object()])
def test_other_types_are_a_type_error(manager: StateManager, amount: object) -> None:
    agent = agent_on(manager)
    with pytest.raises(StateTypeError):
        manager.record_spend(agent, amount)  # type: ignore[arg-type]
    with pytest.raises(StateTypeError):
        manager.reserve_budget(agent, amount)  # type: ignore[arg-type]
    if amount is not None:  # None is a scope without a limit
        with pytest.raises(StateTypeError):
            manager.set_budget("team:bad", limit=amount)  # type: ignore[arg-type]
    assert manager.get_budget("team:bad") is None
    assert state_of(manager, agent).budget_spent == 0.0


def test_a_total_that_goes_up_and_down_is_exactly_zero(manager: StateManager) -> None:
    manager.set_budget("team:z", limit=1.0)
    agent = agent_on(manager, "team:z", limit=1.0)
    holds = [manager.reserve_budget(agent, amount) for amount in (0.1, 0.2, 0.3, "0.000007")]
    budget = manager.get_budget("team:z")
    assert budget is not None
    assert (budget.held, budget.available) == (0.600007, 0.399993)
    for hold in holds:
        manager.release_reservation(hold)
    budget = manager.get_budget("team:z")
    assert budget is not None
    assert is_positive_zero(budget.held)
    assert is_positive_zero(budget.spent)
    assert (budget.available, manager.budget_available(agent)) == (1.0, 1.0)
    hold = manager.reserve_budget(agent, 0.3)
    manager.commit_reservation(hold, 0.1)
    budget = manager.get_budget("team:z")
    assert budget is not None
    assert (budget.spent, budget.available) == (0.1, 0.9)
    assert is_positive_zero(budget.held)


def test_what_is_left_is_exact(manager: StateManager) -> None:
    manager.set_budget("team:l", limit=1.0)
    agent = agent_on(manager, "team:l", limit=1.0)
    for _ in range(3):
        manager.record_spend(agent, 0.1)
    assert manager.budget_available(agent) == 0.7  # not 0.7000000000000001
    budget = manager.get_budget("team:l")
    assert budget is not None
    assert budget.available == 0.7
    assert state_of(manager, agent).budget_remaining == 0.7


def test_a_limit_of_a_float_sum_fits_it_exactly(manager: StateManager) -> None:
    agent = agent_on(manager, limit=0.3)
    manager.record_spend(agent, 0.1)
    manager.record_spend(agent, 0.2)  # 0.1 + 0.2 is 0.30000000000000004 in floats: still fits
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(agent, 0.000001)
    assert (info.value.spent, info.value.limit, info.value.requested) == (0.3, 0.3, 0.000001)
    (record,) = events(manager, "budget_exceeded")
    assert (details(record)["spent"], details(record)["requested"]) == (0.3, 0.000001)


def test_saved_amounts_are_kept_to_the_micro_unit(manager: StateManager) -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 0.1 + 0.2, 0, "7.0000004")  # type: ignore[arg-type]
    manager.save_agent_state(state)
    got = state_of(manager, state.agent_id)
    assert (got.budget_spent, got.budget_limit) == (0.3, 7.0)
    assert manager.stats().budget_spent == 0.3


def test_fleet_totals_are_exact(manager: StateManager) -> None:
    agents = [agent_on(manager) for _ in range(3)]
    for agent in agents:
        manager.record_spend(agent, 0.1)
    assert manager.stats().budget_spent == 0.3  # a float sum would be 0.30000000000000004
    manager.set_status(agents[0], AgentStatus.STOPPED)
    manager.remove_agent_state(agents[0])
    assert manager.stats().budget_spent == 0.2
    for agent in agents[1:]:
        manager.remove_agent_state(agent)
    assert is_positive_zero(manager.stats().budget_spent)


def test_the_largest_amount_is_a_billion(manager: StateManager) -> None:
    assert MAX_AMOUNT == 1e9
    agent = agent_on(manager)
    assert manager.record_spend(agent, MAX_AMOUNT).budget_spent == 1e9
    count = manager.audit_count()
    with pytest.raises(ValidationError, match="largest amount"):
        manager.record_spend(agent, 0.000001)
    assert state_of(manager, agent).budget_spent == 1e9
    assert manager.audit_count() == count
    with pytest.raises(ValidationError):
        manager.set_budget("team:big", limit=MAX_AMOUNT + 1)
    manager.set_budget("team:big", limit=MAX_AMOUNT)


def test_a_scope_total_past_the_largest_amount_changes_nothing(manager: StateManager) -> None:
    manager.set_budget("org:big", limit=None)
    first, second = agent_on(manager, "org:big"), agent_on(manager, "org:big")
    manager.record_spend(first, 6e8)
    count = manager.audit_count()
    with pytest.raises(ValidationError):
        manager.record_spend(second, 6e8)  # the agent could, the scope cannot
    assert state_of(manager, second).budget_spent == 0.0
    budget = manager.get_budget("org:big")
    assert budget is not None
    assert budget.spent == 6e8
    assert manager.audit_count() == count
    manager.record_spend(second, 4e8)
    assert manager.stats().budget_spent == 1e9
