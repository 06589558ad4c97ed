"""Labels (who an agent works for) and the new state fields, stored and filtered by every store."""

from __future__ import annotations

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    StateError,
    StateManager,
    StateTypeError,
    ValidationError,
)

from .helpers import agent_on, state_of
from .stores import StoreHandle


def ids(states: object) -> set[AgentId]:
    return {s.agent_id for s in states}  # type: ignore[attr-defined]


def test_new_fields_round_trip(manager: StateManager) -> None:
    state = AgentState(
        AgentId.generate(),
        AgentStatus.RUNNING,
        budget_limit=50.0,
        labels={"team": "support", "user.id": "u-42", "project_x": "é ü"},
        budget_scopes=("org:acme", "team:support"),
        budget_period="month",
        budget_tz="Europe/Paris",
    )
    manager.save_agent_state(state)
    got = state_of(manager, state.agent_id)
    assert got.labels == {"team": "support", "user.id": "u-42", "project_x": "é ü"}
    assert type(got.labels) is dict
    assert got.budget_scopes == ("org:acme", "team:support")
    assert type(got.budget_scopes) is tuple
    assert (got.budget_period, got.budget_tz) == ("month", "Europe/Paris")
    assert got.period_start is not None
    got.labels["team"] = "changed"  # a copy: the store is not touched
    assert state_of(manager, state.agent_id).labels["team"] == "support"
    assert manager.get_agent_states([state.agent_id]) == [state_of(manager, state.agent_id)]
    plain = AgentState(AgentId.generate(), AgentStatus.STOPPED)
    manager.save_agent_state(plain)
    got = state_of(manager, plain.agent_id)
    assert (got.labels, got.budget_scopes, got.budget_period, got.budget_tz, got.period_start) == (
        {},
        (),
        None,
        "UTC",
        None,
    )


def test_iterate_by_label(manager: StateManager) -> None:
    support = {agent_on(manager, labels={"team": "support", "env": "prod"}) for _ in range(3)}
    billing = {agent_on(manager, labels={"team": "billing", "env": "prod"}) for _ in range(2)}
    staging = agent_on(manager, labels={"team": "support", "env": "staging"})
    bare = agent_on(manager)
    assert ids(manager.iter_agent_states(labels={"team": "support"})) == support | {staging}
    assert ids(manager.iter_agent_states(labels={"team": "support", "env": "prod"})) == support
    assert ids(manager.iter_agent_states(labels={"env": "prod"}, batch_size=1)) == support | billing
    assert ids(manager.iter_agent_states(labels={"team": "nobody"})) == set()
    assert ids(manager.iter_agent_states(labels={"owner": "support"})) == set()  # a value is not a key
    assert ids(manager.iter_agent_states(labels={})) == support | billing | {staging, bare}
    every = list(manager.iter_agent_states(labels={"team": "support"}))
    assert len(every) == 4  # each once
    assert all(s.labels["team"] == "support" for s in every)


def test_iterate_by_label_and_status(manager: StateManager) -> None:
    running = agent_on(manager, labels={"team": "a"})
    stopped = agent_on(manager, labels={"team": "a"}, status=AgentStatus.STOPPED)
    agent_on(manager, labels={"team": "b"}, status=AgentStatus.STOPPED)
    assert ids(manager.iter_agent_states(status="stopped", labels={"team": "a"})) == {stopped}
    assert ids(manager.iter_agent_states(status=AgentStatus.RUNNING, labels={"team": "a"})) == {running}
    assert ids(manager.iter_agent_states(status="failed", labels={"team": "a"})) == set()


# Characters that mean something to a store's index: glob patterns (Redis), LIKE wildcards and
# quotes (SQL), separators a key might be built with, and text beyond ASCII.
AWKWARD = [
    "a*",
    "a?",
    "[a]",
    "a%",
    "a_b",
    "a:b",
    "a=b",
    "a,b",
    "a|b",
    "a b",
    "'a'",
    '"a"',
    "a\\b",
    "",
    "équipe",
    "a\nb",
    "x" * 128,
]


def test_label_values_match_exactly(manager: StateManager) -> None:
    agents = {value: agent_on(manager, labels={"team": value}) for value in AWKWARD}
    plain = agent_on(manager, labels={"team": "a"})
    for value, agent in agents.items():
        assert ids(manager.iter_agent_states(labels={"team": value})) == {agent}, value
        assert state_of(manager, agent).labels == {"team": value}
    assert ids(manager.iter_agent_states(labels={"team": "a"})) == {plain}
    assert ids(manager.iter_agent_states(labels={"team": "*"})) == set()
    assert ids(manager.iter_agent_states(labels={"team": "%"})) == set()


def test_label_keys_do_not_run_into_values(manager: StateManager) -> None:
    first = agent_on(manager, labels={"a": "b=c"})
    second = agent_on(manager, labels={"a.b": "c"})
    third = agent_on(manager, labels={"a": "b", "c": ""})
    assert ids(manager.iter_agent_states(labels={"a": "b=c"})) == {first}
    assert ids(manager.iter_agent_states(labels={"a.b": "c"})) == {second}
    assert ids(manager.iter_agent_states(labels={"a": "b"})) == {third}
    assert ids(manager.iter_agent_states(labels={"c": ""})) == {third}


def test_the_label_index_follows_every_change(manager: StateManager) -> None:
    agent = agent_on(manager, labels={"team": "a", "env": "prod"})
    moved = state_of(manager, agent)
    moved.labels = {"team": "b"}
    manager.save_agent_state(moved)
    assert ids(manager.iter_agent_states(labels={"team": "a"})) == set()
    assert ids(manager.iter_agent_states(labels={"env": "prod"})) == set()
    assert ids(manager.iter_agent_states(labels={"team": "b"})) == {agent}

    def relabel(state: AgentState) -> AgentState:
        state.labels = {"team": "c", "env": "dev"}
        return state

    manager.update_agent_state(agent, relabel)
    assert ids(manager.iter_agent_states(labels={"team": "b"})) == set()
    assert ids(manager.iter_agent_states(labels={"team": "c", "env": "dev"})) == {agent}
    manager.record_spend(agent, 1.0)  # other changes keep the labels
    manager.set_status(agent, AgentStatus.STOPPED)
    assert state_of(manager, agent).labels == {"team": "c", "env": "dev"}
    assert ids(manager.iter_agent_states(labels={"team": "c"})) == {agent}
    assert manager.remove_agent_state(agent)
    assert ids(manager.iter_agent_states(labels={"team": "c"})) == set()


def test_bulk_saves_index_labels(store: StoreHandle) -> None:
    manager = store.open()
    count = max(30, int(200 * store.scale))
    states = [
        AgentState(AgentId.generate(), AgentStatus.RUNNING, labels={"team": f"t{i % 3}", "n": str(i)})
        for i in range(count)
    ]
    assert manager.save_agent_states(states) == count
    for team in range(3):
        wanted = {s.agent_id for i, s in enumerate(states) if i % 3 == team}
        assert ids(manager.iter_agent_states(labels={"team": f"t{team}"}, batch_size=7)) == wanted
    assert ids(manager.iter_agent_states(labels={"team": "t1", "n": "4"})) == {states[4].agent_id}
    assert manager.stats().total == count


@pytest.mark.parametrize(
    ("labels", "error"),
    [
        ({f"k{i}": "v" for i in range(17)}, ValidationError),
        ({"Team": "a"}, ValidationError),
        ({"1team": "a"}, ValidationError),
        ({"": "a"}, ValidationError),
        ({"k" * 33: "a"}, ValidationError),
        ({"team": "x" * 129}, ValidationError),
        ({"team": 5}, StateTypeError),
        ({"team": None}, StateTypeError),
        ({5: "a"}, ValidationError),
        ([("team", "a")], StateTypeError),
        ("team=a", StateTypeError),
    ],
)
def test_bad_labels_are_never_stored(manager: StateManager, labels: object, error: type[StateError]) -> None:
    agent = agent_on(manager, labels={"team": "a"})
    state = state_of(manager, agent)
    state.labels = labels  # type: ignore[assignment]
    with pytest.raises(error):
        manager.save_agent_state(state)
    with pytest.raises(error):
        manager.update_agent_state(agent, lambda s: state)
    assert state_of(manager, agent).labels == {"team": "a"}
    assert ids(manager.iter_agent_states(labels={"team": "a"})) == {agent}


@pytest.mark.parametrize(
    ("scopes", "error"),
    [
        (("Team:A",), ValidationError),
        (("",), ValidationError),
        (("team:a", "team:a"), ValidationError),
        (tuple(f"s{i}" for i in range(9)), ValidationError),
        (("x" * 129,), ValidationError),
        ("team:a", StateTypeError),
        ((5,), StateTypeError),
    ],
)
def test_bad_scope_lists_are_never_stored(
    manager: StateManager, scopes: object, error: type[StateError]
) -> None:
    agent = agent_on(manager, "team:a")
    state = state_of(manager, agent)
    state.budget_scopes = scopes  # type: ignore[assignment]
    with pytest.raises(error):
        manager.save_agent_state(state)
    assert state_of(manager, agent).budget_scopes == ("team:a",)


def test_bad_periods_are_never_stored(manager: StateManager) -> None:
    agent = agent_on(manager, period="day")
    for field, value, error in [
        ("budget_period", "year", ValidationError),
        ("budget_period", 7, StateTypeError),
        ("budget_tz", "Mars/Olympus", ValidationError),
        ("budget_tz", None, StateTypeError),
    ]:
        state = state_of(manager, agent)
        setattr(state, field, value)
        with pytest.raises(error):
            manager.save_agent_state(state)
    got = state_of(manager, agent)
    assert (got.budget_period, got.budget_tz) == ("day", "UTC")


def test_a_list_of_scopes_is_kept_as_a_tuple(manager: StateManager) -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_scopes=["org:o", "team:t"])  # type: ignore[arg-type]
    manager.save_agent_state(state)
    assert state_of(manager, state.agent_id).budget_scopes == ("org:o", "team:t")
