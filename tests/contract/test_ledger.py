"""The spend ledger, on every store and both managers: one ``spend`` record per settled spend, in
the hash chain, summing to what the budgets show; and the reports read from it.
"""

from __future__ import annotations

import random
import threading
from datetime import date, datetime, timezone
from decimal import Decimal

import pytest

from iron_runtime_state import (
    AgentState,
    AgentStatus,
    AuditEvent,
    BudgetExceeded,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.ledger import SpendQuery, aggregate, entry_of

from .helpers import FakeClock, agent_on, at, details, events, micros, state_of
from .stores import StoreHandle


def test_each_settled_spend_writes_one_spend_record(manager: StateManager) -> None:
    manager.set_budget("team:a", limit=100)
    manager.set_budget("org:x", limit=None)
    agent = agent_on(manager, "team:a", "org:x", limit=50, labels={"team": "a"})
    manager.record_spend(agent, 1.25, tags={"run": "nightly"})
    committed = manager.reserve_budget(agent, 5)
    manager.commit_reservation(committed, 2.5)
    released = manager.reserve_budget(agent, 5)
    manager.release_reservation(released)  # no spend: no record
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 60)  # refused: no record
    spends = events(manager, "spend", agent)
    assert len(spends) == 2
    first, second = (details(r) for r in spends)
    assert first == {
        "amount": 1.25,
        "scopes": ["team:a", "org:x"],
        "labels": {"team": "a"},
        "tags": {"run": "nightly"},
    }
    assert second["amount"] == 2.5
    assert second["reservation"] == committed.reservation_id
    assert second["scopes"] == ["team:a", "org:x"]
    assert manager.verify_audit_log().ok


def test_plain_agent_spend_record_is_small(manager: StateManager, agent: object) -> None:
    manager.record_spend(agent, 0.5)  # type: ignore[arg-type]
    (record,) = events(manager, "spend")
    assert details(record) == {"amount": 0.5}
    assert record.event.agent_id == agent


def test_ledger_sums_to_budgets_after_a_concurrent_run(store: StoreHandle) -> None:
    manager = store.open()
    manager.set_budget("team:a", limit=None)
    manager.set_budget("org:x", limit=10_000)
    agents = [agent_on(manager, "team:a", "org:x", limit=1_000) for _ in range(3)]
    agents.append(agent_on(manager, "org:x"))
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                agent = rng.choice(agents)
                amount = rng.randint(1, 999_999) / 1_000_000
                if rng.random() < 0.5:
                    manager.record_spend(agent, amount)
                else:
                    hold = manager.reserve_budget(agent, amount * 2)
                    manager.commit_reservation(hold, amount)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    by_agent = {row.group["agent"]: row for row in manager.spend_report(group_by=("agent",))}
    assert sum(row.calls for row in by_agent.values()) == 8 * 15
    for agent in agents:
        assert micros(by_agent[agent.as_str()].amount) == micros(state_of(manager, agent).budget_spent)
    by_scope = {row.group["scope"]: row for row in manager.spend_report(group_by=("scope",))}
    for scope in ("team:a", "org:x"):
        budget = manager.get_budget(scope)
        assert budget is not None
        assert micros(by_scope[scope].amount) == micros(budget.spent)
    assert micros(sum(r.amount for r in manager.spend_report(group_by=()))) == micros(
        manager.stats().budget_spent
    )
    assert manager.verify_audit_log().ok


def test_report_groups_and_filters(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 3, 1, 10))
    manager = store.open(
        clock=clock, prices={"m-a": {"input": 1, "output": 2}, "m-b": {"input": 3, "output": 4}}
    )
    manager.set_budget("team:a", limit=None)
    one = agent_on(manager, "team:a", labels={"team": "a"})
    two = agent_on(manager, labels={"team": "b"})
    manager.record_usage(one, model="m-a", input_tokens=1_000_000, output_tokens=0)  # 1.0
    manager.record_usage(two, model="m-b", input_tokens=0, output_tokens=500_000, tags={"job": "j1"})  # 2.0
    clock.set(at(2027, 3, 2, 23, 59))
    manager.record_spend(one, 0.25)
    clock.set(at(2027, 3, 3, 0, 30))
    manager.record_usage(one, model="m-a", input_tokens=10, output_tokens=10, cached_input_tokens=4)

    rows = manager.spend_report(group_by=("day",))
    assert [(r.group["day"], r.amount, r.calls) for r in rows] == [
        ("2027-03-01", 3.0, 2),
        ("2027-03-02", 0.25, 1),
        ("2027-03-03", 0.00003, 1),
    ]
    rows = manager.spend_report(group_by="model,day", since="2027-03-02")
    assert [(r.group["model"], r.group["day"], r.amount) for r in rows] == [
        ("m-a", "2027-03-03", 0.00003),
        (None, "2027-03-02", 0.25),
    ]
    (row,) = manager.spend_report(group_by=("model",), model="m-a")
    assert (row.calls, row.input_tokens, row.output_tokens, row.cached_input_tokens) == (2, 1_000_010, 10, 4)
    assert row.amount_exact == Decimal("1.00003")
    # A day in another zone: 2 March 23:59 UTC is 3 March in Tokyo.
    rows = manager.spend_report(group_by=("day",), tz="Asia/Tokyo", since=date(2027, 3, 2))
    assert [(r.group["day"], r.amount) for r in rows] == [("2027-03-03", 0.25003)]
    assert [r.group for r in manager.spend_report(group_by=("label:team",))] == [
        {"label:team": "a"},
        {"label:team": "b"},
    ]
    (row,) = manager.spend_report(group_by=("agent",), labels={"team": "b"})
    assert row.group == {"agent": two.as_str()}
    assert row.amount == 2.0
    (row,) = manager.spend_report(group_by=("tag:job",), tags={"job": "j1"})
    assert row.group == {"tag:job": "j1"}
    assert row.calls == 1
    (row,) = manager.spend_report(group_by=("scope",), scope="team:a")
    assert row.group == {"scope": "team:a"}
    assert micros(row.amount) == micros(1.25003)
    assert manager.spend_report(agent_id=one, until=datetime(2027, 3, 1, 10, tzinfo=timezone.utc)) == []
    (row,) = manager.spend_report(group_by=("month",), since=at(2027, 3, 1), until=at(2027, 4, 1))
    assert row.group == {"month": "2027-03"}
    assert row.calls == 4
    (row,) = manager.spend_report(group_by=("week",))
    assert row.group == {"week": "2027-03-01"}
    assert row.to_dict()["calls"] == 4


def test_store_totals_match_reading_the_records(manager: StateManager) -> None:
    """Whatever index a store answers from, it agrees with the chained records themselves."""
    rng = random.Random(7)
    manager.set_budget("team:a", limit=None)
    manager.set_budget("team:b", limit=None)
    agents = [
        agent_on(manager, *rng.sample(["team:a", "team:b"], rng.randint(0, 2)), labels={"k": str(i % 2)})
        for i in range(4)
    ]
    for _ in range(40):
        manager.record_spend(rng.choice(agents), rng.randint(1, 10**6) / 10**6, tags={"t": rng.choice("xy")})
    records = manager.audit_log(event_type="spend")
    for keys in [("bucket",), ("agent", "scope"), ("label:k", "tag:t"), ("scope",), ()]:
        for query in (
            SpendQuery(keys=keys),
            SpendQuery(keys=keys, scope="team:a"),
            SpendQuery(keys=keys, labels={"k": "1"}),
        ):
            want = sorted(
                ((t.key, t.amount, t.calls) for t in aggregate(map(entry_of, records), query)), key=repr
            )
            got = sorted(((t.key, t.amount, t.calls) for t in manager.backend.spend_totals(query)), key=repr)
            assert got == want, (keys, query)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"group_by": ("daily",)}, ValidationError),
        ({"group_by": ("day", "month")}, ValidationError),
        ({"group_by": ("model", "model")}, ValidationError),
        ({"group_by": ("label:Team",)}, ValidationError),
        ({"group_by": 7}, StateTypeError),
        ({"since": "yesterday"}, ValidationError),
        ({"since": "2027-03-02", "until": "2027-03-01"}, ValidationError),
        ({"since": [1]}, StateTypeError),
        ({"tz": "Mars/Olympus"}, StateError),
        ({"agent_id": "nope"}, StateError),
        ({"scope": "Not A Scope"}, ValidationError),
        ({"tags": {"Bad Key": "x"}}, ValidationError),
        ({"model": 5}, StateTypeError),
    ],
)
def test_report_bad_input(manager: StateManager, kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        manager.spend_report(**kwargs)  # type: ignore[arg-type]


def test_bad_tags_change_nothing(manager: StateManager, agent: object) -> None:
    for tags in ({"Bad": "x"}, {"k": 5}, "k=v"):
        with pytest.raises(StateError):
            manager.record_spend(agent, 1.0, tags=tags)  # type: ignore[arg-type]
    assert state_of(manager, agent).budget_spent == 0.0  # type: ignore[arg-type]
    assert events(manager, "spend") == []


def test_pruned_records_leave_the_reports(store: StoreHandle) -> None:
    clock = FakeClock(at(2027, 3, 1))
    manager = store.open(clock=clock)
    agent = agent_on(manager)
    manager.record_spend(agent, 1.0)
    clock.set(at(2027, 3, 5))
    manager.record_spend(agent, 2.0)
    assert manager.prune_audit_log(before=int(at(2027, 3, 2))) >= 1
    assert [(r.group["day"], r.amount) for r in manager.spend_report()] == [("2027-03-05", 2.0)]


def test_stopped_agent_spend_writes_nothing(manager: StateManager) -> None:
    agent = agent_on(manager, status=AgentStatus.STOPPED)
    with pytest.raises(StateError):
        manager.record_spend(agent, 1.0)
    assert events(manager, "spend") == []
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
    manager.record_spend(agent, 1.0)
    assert len(events(manager, "spend")) == 1


def test_programs_cannot_append_ledger_records(manager: StateManager, agent: object) -> None:
    for kind in ("spend", "budget_threshold"):
        with pytest.raises(ValidationError, match="record_spend"):
            manager.save_audit_log(AuditEvent(agent, kind, details='{"amount":1.0}'))  # type: ignore[arg-type]
    assert manager.audit_count() == 0
    assert manager.spend_report() == []


def test_a_copied_trail_carries_the_ledger(store: StoreHandle) -> None:
    """``iron-state copy`` appends the source's records with ``ledger=True``: they count in the
    destination's reports, whatever index it keeps."""
    source = StateManager()
    agent = agent_on(source, labels={"team": "a"})
    source.record_spend(agent, 1.5, tags={"job": "x"})
    source.record_spend(agent, 0.25)
    destination = store.open()
    destination.save_audit_logs((r.event for r in source.audit_log()), ledger=True)
    assert [
        (r.group, r.amount, r.calls) for r in destination.spend_report(group_by=("label:team", "tag:job"))
    ] == [
        ({"label:team": "a", "tag:job": "x"}, 1.5, 1),
        ({"label:team": "a", "tag:job": None}, 0.25, 1),
    ]
    assert destination.verify_audit_log().ok


KEY = "k" * 32


def test_a_keyed_ledger_verifies_and_shows_an_edited_amount(store: StoreHandle) -> None:
    """With an audit key the ledger's records are HMAC-sealed like the rest of the trail: a
    spend record whose amount is edited in the store is found by verify_audit_log."""
    manager = store.open(audit_key=KEY, prices={"m": {"input": 1, "output": 2}})
    manager.set_budget("team:a", limit=10)
    agent = agent_on(manager, "team:a", limit=4)
    manager.record_spend(agent, 1)
    manager.record_usage(agent, model="m", input_tokens=1_000_000, output_tokens=500_000)  # 2.0
    with manager.reserve_for_call(agent, model="m", input_tokens=10, max_output_tokens=10) as hold:
        hold.commit_usage(input_tokens=10, output_tokens=5)
    assert [r.event.event_type for r in manager.audit_log()].count("budget_threshold") == 1  # agent: 3 of 4
    assert manager.verify_audit_log().ok
    (row,) = manager.spend_report(group_by=())
    assert row.calls == 3
    first = events(manager, "spend")[0]
    store.tamper_edit_details(manager, first.seq, '{"amount":0.01}')
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == first.seq


def test_verify_finds_a_ledger_index_changed_in_the_store(store: StoreHandle) -> None:
    """The SQL stores answer reports from an index beside the records: verify_audit_log checks
    it against the chained records, so editing, removing or adding an index row is found."""
    manager = store.open()
    agent = agent_on(manager)
    manager.record_spend(agent, 1.5)
    manager.record_spend(agent, 2.5)
    assert manager.verify_audit_log().ok
    first, second = events(manager, "spend")
    if not store.ledger_index:
        pytest.skip(f"{store.name} reads its reports from the records themselves")
    db = store.tamper_ledger
    db("UPDATE {ledger} SET amount = 1 WHERE seq = " + str(second.seq))
    report = manager.verify_audit_log()
    assert not report.ok
    assert report.first_bad_seq == second.seq
    assert "ledger" in (report.reason or "")
    db("UPDATE {ledger} SET amount = 2500000 WHERE seq = " + str(second.seq))
    assert manager.verify_audit_log().ok
    db("DELETE FROM {ledger} WHERE seq = " + str(first.seq))
    assert manager.verify_audit_log().first_bad_seq == first.seq
