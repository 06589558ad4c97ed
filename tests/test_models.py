"""AgentState, AuditEvent and friends: validation, copies and round trips."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    IdError,
    StateError,
    StateTypeError,
    ValidationError,
)


def test_defaults_match_the_seed() -> None:
    agent_id = AgentId.generate()
    state = AgentState(agent_id, AgentStatus.RUNNING)
    assert (state.budget_spent, state.pii_detections, state.budget_limit) == (0.0, 0, None)
    assert [s.value for s in AgentStatus] == ["running", "stopped", "failed"]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("agent_id", "agent_550e8400-e29b-41d4-a716-446655440000", StateTypeError),
        ("status", "running", StateTypeError),
        ("budget_spent", -0.01, ValidationError),
        ("budget_spent", math.inf, ValidationError),
        ("budget_spent", math.nan, ValidationError),
        ("budget_spent", "one", ValidationError),
        ("budget_spent", b"1", StateTypeError),
        ("budget_spent", 1e9 + 1, ValidationError),
        ("budget_spent", True, StateTypeError),
        ("pii_detections", -1, ValidationError),
        ("pii_detections", 1.0, StateTypeError),
        ("pii_detections", False, StateTypeError),
        ("pii_detections", 2**63, ValidationError),
        ("budget_limit", -1.0, ValidationError),
        ("budget_limit", math.nan, ValidationError),
        ("budget_limit", "ten", ValidationError),
        ("budget_limit", [10], StateTypeError),
    ],
)
def test_invalid_fields(field: str, value: object, error: type[Exception]) -> None:
    kwargs: dict[str, object] = {"agent_id": AgentId.generate(), "status": AgentStatus.RUNNING}
    kwargs[field] = value
    with pytest.raises(error) as info:
        AgentState(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, StateError)
    assert field.split("_")[0] in str(info.value)


def test_plain_string_id_message_names_parse() -> None:
    with pytest.raises(TypeError, match=r"AgentId\.parse"):
        AgentState("agent_550e8400-e29b-41d4-a716-446655440000", AgentStatus.RUNNING)  # type: ignore[arg-type]


def test_ints_are_accepted_and_normalised() -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 5, 0, 10)
    assert type(state.budget_spent) is float
    assert type(state.budget_limit) is float


def test_validate_catches_later_mutation() -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING)
    state.budget_spent = -1.0
    with pytest.raises(ValidationError):
        state.validate()


def test_copy_is_independent() -> None:
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 1.0)
    other = state.copy()
    other.budget_spent = 2.0
    assert state.budget_spent == 1.0
    assert other.agent_id == state.agent_id


def test_budget_remaining() -> None:
    assert AgentState(AgentId.generate(), AgentStatus.RUNNING).budget_remaining == math.inf
    assert AgentState(AgentId.generate(), AgentStatus.RUNNING, 12.0, 0, 10.0).budget_remaining == 0.0


def test_dict_round_trip_through_json() -> None:
    state = AgentState(AgentId.generate(), AgentStatus.FAILED, 0.1 + 0.2, 3, 7.5)
    assert AgentState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_from_dict_errors() -> None:
    good = AgentState(AgentId.generate(), AgentStatus.RUNNING).to_dict()
    with pytest.raises(ValidationError, match="unknown"):
        AgentState.from_dict({**good, "colour": "red"})
    with pytest.raises(ValidationError, match="missing"):
        AgentState.from_dict({"status": "running"})
    with pytest.raises(IdError):
        AgentState.from_dict({**good, "agent_id": "nope"})
    with pytest.raises(ValidationError, match="status"):
        AgentState.from_dict({**good, "status": "paused"})
    with pytest.raises(StateTypeError):
        AgentState.from_dict([1, 2])  # type: ignore[arg-type]


def test_status_parse() -> None:
    assert AgentStatus.parse("RUNNING") is AgentStatus.RUNNING
    assert AgentStatus.parse(AgentStatus.FAILED) is AgentStatus.FAILED
    with pytest.raises(ValidationError, match="running"):
        AgentStatus.parse("paused")


def test_audit_event_fields_in_seed_order() -> None:
    agent_id = AgentId.generate()
    event = AuditEvent(agent_id, "pii_detected", 1234567890, "Email address found in output")
    assert list(event.__dataclass_fields__) == ["agent_id", "event_type", "timestamp", "details"]
    with pytest.raises(AttributeError):
        event.details = "x"  # type: ignore[misc]
    default = AuditEvent(agent_id, "x")
    assert default.details == ""
    assert default.timestamp > 1_700_000_000


@pytest.mark.parametrize("event_type", ["a", "pii_detected", "budget.exceeded", "x:y-z", "9lives", "a" * 64])
def test_valid_event_types(event_type: str) -> None:
    AuditEvent(AgentId.generate(), event_type, 1)


@pytest.mark.parametrize("event_type", ["", "A", "_x", ".x", "a b", "a/b", "a" * 65, "é"])
def test_invalid_event_types(event_type: str) -> None:
    with pytest.raises(ValidationError, match="event_type"):
        AuditEvent(AgentId.generate(), event_type, 1)


def test_event_details_limit_counts_utf8_bytes() -> None:
    agent_id = AgentId.generate()
    AuditEvent(agent_id, "x", 1, "a" * 65536)
    with pytest.raises(ValidationError, match="64 KiB"):
        AuditEvent(agent_id, "x", 1, "a" * 65537)
    AuditEvent(agent_id, "x", 1, "€" * (65536 // 3))
    with pytest.raises(ValidationError):
        AuditEvent(agent_id, "x", 1, "€" * (65536 // 3 + 1))
    with pytest.raises(ValidationError, match="UTF-8"):
        AuditEvent(agent_id, "x", 1, "\ud800")


def test_event_timestamp_checks() -> None:
    agent_id = AgentId.generate()
    with pytest.raises(StateTypeError):
        AuditEvent(agent_id, "x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(StateTypeError):
        AuditEvent(agent_id, "x", True)
    with pytest.raises(ValidationError):
        AuditEvent(agent_id, "x", 2**60)


@given(
    spent=st.floats(min_value=0, max_value=1e9, allow_infinity=False, allow_nan=False),
    pii=st.integers(min_value=0, max_value=2**63 - 1),
    limit=st.none() | st.floats(min_value=0, max_value=1e9, allow_infinity=False, allow_nan=False),
    status=st.sampled_from(AgentStatus),
)
def test_any_valid_state_round_trips(
    spent: float, pii: int, limit: float | None, status: AgentStatus
) -> None:
    state = AgentState(AgentId.generate(), status, spent, pii, limit)
    assert AgentState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
