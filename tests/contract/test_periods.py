"""Budget periods (day, week, month in a time zone), on every store, with an injectable clock.

Spend resets lazily and atomically at the first operation after a boundary, with one
``budget_reset`` event however many callers race past it; reads show the new period without
writing; open holds carry over; a reset never changes an agent's status.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from iron_runtime_state import AgentId, AgentState, AgentStatus, BudgetExceeded, BudgetState, StateManager

from .helpers import BOUNDARY, SYSTEM, FakeClock, agent_on, at, details, events, state_of
from .stores import StoreHandle

DAY = 86_400.0
UTC = timezone.utc


def budget_of(manager: StateManager, scope: str) -> BudgetState:
    budget = manager.get_budget(scope)
    assert budget is not None, scope
    return budget


def next_real_midnight() -> float:
    """The next midnight UTC by the real clock (at most a day ahead).

    Tests with holds move the fake clock just past it: ahead of the real clock by less than a
    day, so a hold with a long ttl is open by any store's clock.
    """
    today = datetime.now(UTC).date()
    return datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp() + DAY


def resets(
    manager: StateManager, scope: str | None = None, agent_id: AgentId | None = None
) -> list[dict[str, object]]:
    """The ``budget_reset`` details of one scope (or of one agent's own budget)."""
    found = []
    for record in events(manager, "budget_reset"):
        info = details(record)
        if scope is not None and info.get("scope") == scope:
            assert record.event.agent_id == SYSTEM
            found.append(info)
        elif agent_id is not None and record.event.agent_id == agent_id:
            assert "scope" not in info
            found.append(info)
    return found


# -- where a period starts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "tz", "expected"),
    [
        ("day", "UTC", datetime(2027, 1, 13, tzinfo=UTC)),
        ("week", "UTC", datetime(2027, 1, 11, tzinfo=UTC)),  # weeks start on Monday
        ("month", "UTC", datetime(2027, 1, 1, tzinfo=UTC)),
        ("day", "Asia/Tokyo", datetime(2027, 1, 14, tzinfo=ZoneInfo("Asia/Tokyo"))),  # 00:30 there
        ("week", "Pacific/Kiritimati", datetime(2027, 1, 11, tzinfo=ZoneInfo("Pacific/Kiritimati"))),
        ("month", "America/New_York", datetime(2027, 1, 1, tzinfo=ZoneInfo("America/New_York"))),
        (None, "UTC", None),
    ],
)
def test_a_new_scope_starts_in_the_current_calendar_period(
    store: StoreHandle, period: str | None, tz: str, expected: datetime | None
) -> None:
    manager = store.open(clock=FakeClock(at(2027, 1, 13, 15, 30)))  # a Wednesday, 15:30 UTC
    made = manager.set_budget("team:p", limit=10.0, period=period, tz=tz)
    for budget in (made, budget_of(manager, "team:p"), manager.list_budgets()[0]):
        assert (budget.period, budget.tz) == (period, tz)
        assert budget.period_start == expected
        if expected is not None:
            assert budget.period_start is not None
            assert budget.period_start.utcoffset() == expected.utcoffset()  # shown in the budget's zone


def test_an_agents_period_start_is_set_on_save(store: StoreHandle) -> None:
    manager = store.open(clock=FakeClock(at(2027, 1, 13, 15, 30)))
    weekly = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_period="week", period_start=123.0)
    manager.save_agent_state(weekly)  # a given period_start is replaced by the current one
    assert state_of(manager, weekly.agent_id).period_start == at(2027, 1, 11)
    tokyo = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_period="day", budget_tz="Asia/Tokyo")
    manager.save_agent_state(tokyo)
    got = state_of(manager, tokyo.agent_id)
    assert (got.budget_period, got.budget_tz, got.period_start) == (
        "day",
        "Asia/Tokyo",
        at(2027, 1, 14, tz="Asia/Tokyo"),
    )
    plain = AgentState(AgentId.generate(), AgentStatus.RUNNING, period_start=5.0)
    manager.save_agent_state(plain)
    assert state_of(manager, plain.agent_id).period_start is None


# -- the reset at a boundary -------------------------------------------------------------------------


def test_an_agents_spend_resets_at_the_boundary(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    agent = agent_on(manager, limit=10.0, period="day")
    manager.record_spend(agent, 6.0)
    assert state_of(manager, agent).period_start == BOUNDARY - DAY
    clock.set(BOUNDARY + 1)
    assert manager.record_spend(agent, 5.0).budget_spent == 5.0  # 6 + 5 would pass 10
    got = state_of(manager, agent)
    assert (got.budget_spent, got.period_start) == (5.0, BOUNDARY)
    manager.record_spend(agent, 1.0)
    assert resets(manager, agent_id=agent) == [
        {"period": "day", "tz": "UTC", "period_start": int(BOUNDARY - DAY), "spent": 6.0}
    ]
    assert manager.stats().budget_spent == 6.0
    assert manager.verify_audit_log().ok


def test_a_scopes_spend_resets_once_with_the_closed_total(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:m", limit=10.0, period="month")
    agent = agent_on(manager, "team:m")  # the agent's own budget has no period
    manager.record_spend(agent, 7.0)
    assert budget_of(manager, "team:m").period_start == datetime(2027, 1, 1, tzinfo=UTC)
    clock.set(BOUNDARY + 1)
    manager.record_spend(agent, 8.0)
    manager.record_spend(agent, 1.0)
    budget = budget_of(manager, "team:m")
    assert (budget.spent, budget.period_start) == (9.0, datetime(2027, 2, 1, tzinfo=UTC))
    assert state_of(manager, agent).budget_spent == 16.0  # no period of its own: never reset
    assert resets(manager, scope="team:m") == [
        {"scope": "team:m", "period": "month", "tz": "UTC", "period_start": int(at(2027, 1, 1)), "spent": 7.0}
    ]
    assert len(events(manager, "budget_reset")) == 1


def test_reads_after_a_boundary_show_the_new_period_and_write_nothing(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:w", limit=20.0, period="week")
    agent = agent_on(manager, "team:w", limit=10.0, period="day", labels={"team": "w"})
    manager.record_spend(agent, 4.0)
    clock.set(BOUNDARY + 1)
    count = manager.audit_count()
    states = [
        state_of(manager, agent),
        *manager.get_agent_states([agent]),
        *manager.iter_agent_states(),
        *manager.iter_agent_states(labels={"team": "w"}),
    ]
    for state in states:
        assert state is not None
        assert (state.budget_spent, state.period_start) == (0.0, BOUNDARY)
    assert manager.budget_available(agent) == 10.0
    for budget in (budget_of(manager, "team:w"), *manager.list_budgets()):
        assert (budget.spent, budget.available) == (0.0, 20.0)
        assert budget.period_start == datetime(2027, 2, 1, tzinfo=UTC)
    assert manager.audit_count() == count
    assert events(manager, "budget_reset") == []


def test_a_refusal_past_a_boundary_keeps_the_reset(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    agent = agent_on(manager, limit=2.0, period="day")
    manager.record_spend(agent, 2.0)
    clock.set(BOUNDARY + 1)
    with pytest.raises(BudgetExceeded) as info:
        manager.record_spend(agent, 3.0)
    assert (info.value.spent, info.value.scope) == (0.0, None)
    got = state_of(manager, agent)
    assert (got.budget_spent, got.period_start) == (0.0, BOUNDARY)
    kinds = [r.event.event_type for r in manager.audit_log(agent_id=agent)]
    assert [kind for kind in kinds if kind in ("budget_reset", "budget_exceeded")] == [
        "budget_reset",
        "budget_exceeded",
    ]
    assert details(manager.audit_log(event_type="budget_exceeded")[0])["spent"] == 0.0


def test_skipped_periods_reset_once_into_the_current_one(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:d", limit=None, period="day")
    agent = agent_on(manager, "team:d")
    manager.record_spend(agent, 1.5)
    clock.set(BOUNDARY + 3 * DAY + 5)  # nothing happened for three days
    manager.record_spend(agent, 0.5)
    budget = budget_of(manager, "team:d")
    assert (budget.spent, budget.period_start) == (0.5, datetime(2027, 2, 4, tzinfo=UTC))
    assert resets(manager, scope="team:d") == [
        {"scope": "team:d", "period": "day", "tz": "UTC", "period_start": int(BOUNDARY - DAY), "spent": 1.5}
    ]


def test_a_clock_behind_never_goes_back(store: StoreHandle) -> None:
    ahead, behind = FakeClock(BOUNDARY - 10), FakeClock(BOUNDARY - 5)
    fast, slow = store.open(clock=ahead), store.open(clock=behind)
    fast.set_budget("team:s", limit=None, period="day")
    agent = agent_on(fast, "team:s", period="day")
    fast.record_spend(agent, 2.0)
    ahead.set(BOUNDARY + 1)
    fast.record_spend(agent, 1.0)  # starts the new period
    slow.record_spend(agent, 1.0)  # a client whose clock is behind: no reset back to yesterday
    assert len(events(fast, "budget_reset")) == 2  # the agent's and the scope's, once each
    for manager in (fast, slow):
        got = state_of(manager, agent)
        assert (got.budget_spent, got.period_start) == (2.0, BOUNDARY)
        budget = budget_of(manager, "team:s")
        assert (budget.spent, budget.period_start) == (2.0, datetime(2027, 2, 1, tzinfo=UTC))


def test_update_after_a_boundary_writes_the_reset(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    agent = agent_on(manager, limit=10.0, period="day")
    manager.record_spend(agent, 2.0)
    clock.set(BOUNDARY + 1)
    seen: list[tuple[float, float | None]] = []

    def bump(state: AgentState) -> AgentState:
        seen.append((state.budget_spent, state.period_start))
        state.pii_detections += 1
        return state

    new = manager.update_agent_state(agent, bump)
    assert set(seen) == {(0.0, BOUNDARY)}  # fn got the new period
    assert (new.budget_spent, new.pii_detections, new.period_start) == (0.0, 1, BOUNDARY)
    manager.update_agent_state(agent, bump)
    assert resets(manager, agent_id=agent) == [
        {"period": "day", "tz": "UTC", "period_start": int(BOUNDARY - DAY), "spent": 2.0}
    ]
    assert manager.stats().budget_spent == 0.0


def test_a_reset_never_changes_status(store: StoreHandle) -> None:
    clock = FakeClock(BOUNDARY - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:st", limit=5.0, period="day")
    stopped = agent_on(manager, "team:st", limit=1.0, period="day")
    manager.record_spend(stopped, 1.0)
    manager.set_status(stopped, AgentStatus.STOPPED)  # stopped at its limit, by its operator
    failed = agent_on(manager, "team:st", status=AgentStatus.FAILED)
    spender = agent_on(manager, "team:st")
    manager.record_spend(spender, 4.0)
    clock.set(BOUNDARY + 1)
    manager.record_spend(spender, 1.0)  # rolls the scope the others draw on too
    after = manager.update_agent_state(stopped, lambda s: s)  # rolls the stopped agent's own budget
    assert (after.status, after.budget_spent) == (AgentStatus.STOPPED, 0.0)
    assert state_of(manager, failed).status is AgentStatus.FAILED
    assert state_of(manager, spender).status is AgentStatus.RUNNING
    assert events(manager, "status_changed")[-1].event.agent_id == stopped  # the operator's, only
    assert len(events(manager, "status_changed")) == 1
    assert len(events(manager, "budget_reset")) == 2


# -- calendars --------------------------------------------------------------------------------------


def spend_at(manager: StateManager, clock: FakeClock, agent: AgentId, when: float) -> None:
    clock.set(when)
    manager.record_spend(agent, 1.0)


def test_a_day_ends_at_midnight_in_the_budgets_zone(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 1, 31, 14, 59, 58))  # 23:59:58 in Tokyo
    manager = store.open(clock=clock)
    manager.set_budget("team:tokyo", limit=None, period="day", tz="Asia/Tokyo")
    agent = agent_on(manager, "team:tokyo")
    spend_at(manager, clock, agent, at(2027, 1, 31, 14, 59, 59))
    spend_at(manager, clock, agent, at(2027, 1, 31, 15, 0, 0))  # midnight in Tokyo: a new day
    spend_at(manager, clock, agent, at(2027, 2, 1, 0, 0, 1))  # midnight UTC: nothing happens
    (reset,) = resets(manager, scope="team:tokyo")
    assert (reset["period_start"], reset["spent"], reset["tz"]) == (
        int(at(2027, 1, 31, tz="Asia/Tokyo")),
        1.0,
        "Asia/Tokyo",
    )
    budget = budget_of(manager, "team:tokyo")
    assert (budget.spent, budget.period_start) == (2.0, datetime(2027, 2, 1, tzinfo=ZoneInfo("Asia/Tokyo")))


def test_a_day_across_a_clock_change_has_its_own_length(store: StoreHandle) -> None:
    # Paris moves to summer time on Sunday 28 March 2027: that day lasts 23 hours.
    clock = FakeClock(at(2027, 3, 27, 23, 0, 30))
    manager = store.open(clock=clock)
    made = manager.set_budget("team:paris", limit=None, period="day", tz="Europe/Paris")
    assert made.period_start == datetime(2027, 3, 28, tzinfo=ZoneInfo("Europe/Paris"))
    assert made.period_start is not None
    assert made.period_start.utcoffset() == timedelta(hours=1)
    agent = agent_on(manager, "team:paris")
    spend_at(manager, clock, agent, at(2027, 3, 28, 21, 59, 59))  # 23:59:59 summer time
    assert resets(manager, scope="team:paris") == []
    spend_at(manager, clock, agent, at(2027, 3, 28, 22, 0, 0))  # midnight: the boundary itself
    (reset,) = resets(manager, scope="team:paris")
    assert (reset["period_start"], reset["spent"]) == (int(at(2027, 3, 27, 23)), 1.0)
    start = budget_of(manager, "team:paris").period_start
    assert start == datetime(2027, 3, 29, tzinfo=ZoneInfo("Europe/Paris"))
    assert start is not None
    assert start.utcoffset() == timedelta(hours=2)


def test_weeks_start_on_monday(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 2, 3, 12))  # a Wednesday
    manager = store.open(clock=clock)
    assert manager.set_budget("team:wk", limit=None, period="week").period_start == datetime(
        2027, 2, 1, tzinfo=UTC
    )
    agent = agent_on(manager, "team:wk")
    spend_at(manager, clock, agent, at(2027, 2, 7, 23, 59, 59))  # Sunday night: the same week
    assert resets(manager, scope="team:wk") == []
    spend_at(manager, clock, agent, at(2027, 2, 8))  # Monday
    (reset,) = resets(manager, scope="team:wk")
    assert (reset["period_start"], reset["spent"]) == (int(at(2027, 2, 1)), 1.0)


def test_months_have_their_own_lengths(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 2, 10))
    manager = store.open(clock=clock)
    manager.set_budget("org:mo", limit=None, period="month")
    agent = agent_on(manager, "org:mo")
    spend_at(manager, clock, agent, at(2027, 2, 28, 23, 59, 59))
    spend_at(manager, clock, agent, at(2027, 3, 1))
    spend_at(manager, clock, agent, at(2027, 3, 31, 23, 59, 59))
    spend_at(manager, clock, agent, at(2027, 4, 1, 0, 0, 1))
    assert [(r["period_start"], r["spent"]) for r in resets(manager, scope="org:mo")] == [
        (int(at(2027, 2, 1)), 1.0),
        (int(at(2027, 3, 1)), 2.0),
    ]


def test_changing_a_period_keeps_the_spend(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 1, 13, 12))
    manager = store.open(clock=clock)
    manager.set_budget("team:ch", limit=10.0)
    agent = agent_on(manager, "team:ch")
    manager.record_spend(agent, 3.0)
    monthly = manager.set_budget("team:ch", limit=10.0, period="month")
    assert (monthly.spent, monthly.period_start) == (3.0, datetime(2027, 1, 1, tzinfo=UTC))
    paris = manager.set_budget("team:ch", limit=10.0, period="month", tz="Europe/Paris")
    assert (paris.spent, paris.period_start) == (3.0, datetime(2027, 1, 1, tzinfo=ZoneInfo("Europe/Paris")))
    clock.set(at(2027, 2, 1, tz="Europe/Paris") + 1)
    manager.record_spend(agent, 1.0)
    (reset,) = resets(manager, scope="team:ch")
    assert (reset["period_start"], reset["spent"], reset["tz"]) == (
        int(at(2027, 1, 1, tz="Europe/Paris")),
        3.0,
        "Europe/Paris",
    )
    assert budget_of(manager, "team:ch").spent == 1.0


# -- holds across a boundary (near the real clock: stores may time holds by their own) --------------


def test_open_holds_carry_into_the_new_period(store: StoreHandle) -> None:
    midnight = next_real_midnight()
    clock = FakeClock(midnight - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:h", limit=10.0, period="day")
    agent = agent_on(manager, "team:h", limit=10.0, period="day")
    manager.record_spend(agent, 3.0)
    hold = manager.reserve_budget(agent, 4.0, ttl=600)
    clock.set(midnight + 1)
    budget = budget_of(manager, "team:h")
    assert (budget.spent, budget.held, budget.available) == (0.0, 4.0, 6.0)
    assert manager.budget_available(agent) == 6.0
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 7.0)  # 0 spent + 4 held + 7 passes 10
    manager.record_spend(agent, 6.0)
    manager.commit_reservation(hold, 4.0)
    assert state_of(manager, agent).budget_spent == 10.0
    budget = budget_of(manager, "team:h")
    assert (budget.spent, budget.held) == (10.0, 0.0)
    assert [info["spent"] for info in resets(manager, scope="team:h")] == [3.0]
    assert [info["spent"] for info in resets(manager, agent_id=agent)] == [3.0]


def test_a_commit_after_a_boundary_charges_the_new_period(store: StoreHandle) -> None:
    midnight = next_real_midnight()
    clock = FakeClock(midnight - 10)
    manager = store.open(clock=clock)
    manager.set_budget("team:cm", limit=5.0, period="day")
    agent = agent_on(manager, "team:cm", period="day")
    manager.record_spend(agent, 4.0)
    hold = manager.reserve_budget(agent, 1.0, ttl=600)
    clock.set(midnight + 1)
    manager.commit_reservation(hold, 1.0)  # the first operation of the new day: it rolls
    assert state_of(manager, agent).budget_spent == 1.0
    assert budget_of(manager, "team:cm").spent == 1.0
    assert [info["spent"] for info in resets(manager, scope="team:cm")] == [4.0]
    assert [info["spent"] for info in resets(manager, agent_id=agent)] == [4.0]


# -- a race past the boundary -----------------------------------------------------------------------


def test_many_threads_racing_past_a_boundary_reset_once(store: StoreHandle) -> None:
    """16 threads on 4 managers, all with a clock just past the boundary, spend at once."""
    before = store.open(clock=FakeClock(BOUNDARY - 10))
    before.set_budget("org:race", limit=None, period="month")
    before.set_budget("team:race", limit=1000.0, period="week")
    agents = [agent_on(before, "org:race", "team:race", limit=100.0, period="day") for _ in range(3)]
    for agent in agents:
        before.record_spend(agent, 1.5)
    managers = [store.open(clock=FakeClock(BOUNDARY + 1)) for _ in range(4)]
    rounds = max(3, int(10 * store.scale))
    start = threading.Barrier(16)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        manager, agent = managers[i % 4], agents[i % 3]
        try:
            start.wait()
            for _ in range(rounds):
                manager.record_spend(agent, 0.25)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    spends = [sum(1 for i in range(16) if i % 3 == n) * rounds for n in range(3)]
    for agent, count in zip(agents, spends, strict=True):
        assert resets(before, agent_id=agent) == [
            {"period": "day", "tz": "UTC", "period_start": int(BOUNDARY - DAY), "spent": 1.5}
        ]
        got = state_of(managers[0], agent)
        assert (got.budget_spent, got.period_start) == (count * 0.25, BOUNDARY)
    assert resets(before, scope="org:race") == [
        {
            "scope": "org:race",
            "period": "month",
            "tz": "UTC",
            "period_start": int(at(2027, 1, 1)),
            "spent": 4.5,
        }
    ]
    assert resets(before, scope="team:race") == [
        {
            "scope": "team:race",
            "period": "week",
            "tz": "UTC",
            "period_start": int(at(2027, 1, 25)),
            "spent": 4.5,
        }
    ]
    assert len(events(before, "budget_reset")) == 5
    for scope in ("org:race", "team:race"):
        assert budget_of(managers[1], scope).spent == sum(spends) * 0.25
    assert managers[2].verify_audit_log().ok
