"""Pricing model calls and settling them by usage, on every store and both managers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from iron_runtime_state import (
    BudgetExceeded,
    PricingError,
    ReservationError,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)

from .helpers import agent_on, details, events, state_of
from .stores import StoreHandle

PRICES = {
    "small": {"input": "0.15", "output": "0.60"},
    "big": {"input": 5, "output": 15, "cached_input": 2.5},
}


@pytest.fixture
def metered(store: StoreHandle) -> StateManager:
    return store.open(prices=PRICES)


def test_cost_is_exact_and_rounds_up(metered: StateManager) -> None:
    assert metered.cost("small", input_tokens=1_000_000, output_tokens=1_000_000) == Decimal("0.75")
    assert metered.cost("big", input_tokens=1000, output_tokens=100, cached_input_tokens=400) == Decimal(
        "0.0055"
    )
    assert metered.cost("small", input_tokens=1, output_tokens=0) == Decimal("0.000001")  # 0.00000015 up
    with pytest.raises(PricingError, match="no-such-model"):
        metered.cost("no-such-model", input_tokens=1, output_tokens=1)


def test_record_usage_charges_and_notes_the_call(metered: StateManager) -> None:
    metered.set_budget("team:a", limit=10)
    agent = agent_on(metered, "team:a", limit=5)
    state = metered.record_usage(
        agent, model="big", input_tokens=1000, output_tokens=100, cached_input_tokens=400, tags={"run": "r"}
    )
    assert state.budget_spent == 0.0055
    budget = metered.get_budget("team:a")
    assert budget is not None
    assert budget.spent == 0.0055
    (record,) = events(metered, "spend", agent)
    assert details(record) == {
        "amount": 0.0055,
        "scopes": ["team:a"],
        "model": "big",
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_input_tokens": 400,
        "tags": {"run": "r"},
    }
    with pytest.raises(BudgetExceeded):
        metered.record_usage(agent, model="big", input_tokens=10**6, output_tokens=0)
    assert state_of(metered, agent).budget_spent == 0.0055


def test_reserve_for_call_holds_the_worst_case_and_commits_usage(metered: StateManager) -> None:
    agent = agent_on(metered, limit=1)
    with metered.reserve_for_call(
        agent, model="small", input_tokens=1000, max_output_tokens=1000, tags={"k": "v"}
    ) as hold:
        assert hold.reservation.amount == 0.00075
        assert metered.budget_available(agent) == 1 - 0.00075
        hold.commit_usage(input_tokens=1000, output_tokens=10)
    assert state_of(metered, agent).budget_spent == 0.000156
    (record,) = events(metered, "spend", agent)
    assert details(record)["model"] == "small"
    assert details(record)["tags"] == {"k": "v"}
    assert details(record)["reservation"] == hold.reservation.reservation_id
    with pytest.raises(ReservationError):
        hold.commit_usage(input_tokens=1, output_tokens=1)


def test_refused_call_holds_nothing(metered: StateManager) -> None:
    agent = agent_on(metered, limit=0.01)
    with pytest.raises(BudgetExceeded):
        metered.reserve_for_call(agent, model="big", input_tokens=1000, max_output_tokens=4000)
    assert metered.budget_available(agent) == 0.01
    assert events(metered, "budget_exceeded", agent)


def test_commit_reservation_with_usage(metered: StateManager) -> None:
    agent = agent_on(metered)
    hold = metered.reserve_budget(agent, 1)
    metered.commit_reservation(hold, usage={"model": "small", "input_tokens": 2_000_000, "output_tokens": 0})
    assert state_of(metered, agent).budget_spent == 0.3
    hold = metered.reserve_budget(agent, 1)
    with pytest.raises(ValidationError):
        metered.commit_reservation(hold, 0.5, usage={"model": "small", "input_tokens": 1, "output_tokens": 1})
    with pytest.raises(ValidationError):
        metered.commit_reservation(hold)
    with pytest.raises(PricingError):
        metered.commit_reservation(hold, usage={"model": "unknown-x", "input_tokens": 1, "output_tokens": 1})
    assert state_of(metered, agent).budget_spent == 0.3  # nothing of the bad commits
    metered.commit_reservation(hold, usage={"model": "big", "prompt_tokens": 100, "completion_tokens": 10})
    assert state_of(metered, agent).budget_spent == 0.30065


def test_hold_without_model_needs_one(metered: StateManager) -> None:
    agent = agent_on(metered)
    with metered.budget(agent, 1) as hold:
        with pytest.raises(ValidationError, match="model"):
            hold.commit_usage(input_tokens=1, output_tokens=1)
        hold.commit_usage(input_tokens=1_000_000, output_tokens=0, model="small")
    assert state_of(metered, agent).budget_spent == 0.15


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "small", "input_tokens": -1, "output_tokens": 0},
        {"model": "small", "input_tokens": 1.5, "output_tokens": 0},
        {"model": "small", "input_tokens": True, "output_tokens": 0},
        {"model": "small", "input_tokens": 1, "output_tokens": 0, "cached_input_tokens": 2},
        {"model": "", "input_tokens": 1, "output_tokens": 0},
        {"model": 3, "input_tokens": 1, "output_tokens": 0},
        {"model": "small", "input_tokens": 2**60, "output_tokens": 0},
        {"model": "nobody-prices-this", "input_tokens": 1, "output_tokens": 0},
    ],
)
def test_bad_usage_changes_nothing(metered: StateManager, kwargs: dict[str, object]) -> None:
    agent = agent_on(metered, limit=10)
    with pytest.raises(StateError):
        metered.record_usage(agent, **kwargs)  # type: ignore[arg-type]
    if "cached_input_tokens" in kwargs:  # a hold has no cached tokens
        kwargs = {**kwargs, "input_tokens": -1}
    with pytest.raises(StateError):
        metered.reserve_for_call(
            agent, model=kwargs["model"], input_tokens=kwargs["input_tokens"], max_output_tokens=1
        )  # type: ignore[arg-type]
    assert state_of(metered, agent).budget_spent == 0.0
    assert metered.budget_available(agent) == 10
    assert events(metered, "spend") == []


def test_default_price(store: StoreHandle) -> None:
    manager = store.open(
        prices={"known": {"input": 1, "output": 1}}, default_price={"input": 10, "output": 10}
    )
    assert manager.cost("anything-at-all", input_tokens=100_000, output_tokens=0) == Decimal("1")
    assert manager.cost("known", input_tokens=100_000, output_tokens=0) == Decimal("0.1")


def test_bad_price_tables(store: StoreHandle) -> None:
    for prices in ({"m": {"input": -1, "output": 1}}, {"m": {"input": "x", "output": 1}}, {"m": 5}, "m"):
        with pytest.raises((StateError, StateTypeError)):
            store.open(prices=prices)
