"""AgentId: parsing, the error codes and hints, and the properties ids must keep."""

from __future__ import annotations

import copy
import pickle
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iron_runtime_state import AgentId, IdError, IdErrorCode, StateError

CANON = "agent_550e8400-e29b-41d4-a716-446655440000"


def test_parse_canonical() -> None:
    agent_id = AgentId.parse(CANON)
    assert agent_id.as_str() == CANON
    assert str(agent_id) == CANON
    assert agent_id.uuid == uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
    assert AgentId(CANON) == agent_id
    assert repr(agent_id) == f"AgentId({CANON!r})"


def test_generate_is_v4_and_unique() -> None:
    ids = {AgentId.generate() for _ in range(1000)}
    assert len(ids) == 1000
    for agent_id in list(ids)[:10]:
        assert agent_id.uuid.version == 4
        assert AgentId.parse(agent_id.as_str()) == agent_id


def test_any_uuid_version_parses() -> None:
    for u in (uuid.uuid1(), uuid.uuid3(uuid.NAMESPACE_DNS, "x"), uuid.uuid5(uuid.NAMESPACE_DNS, "x")):
        assert AgentId.parse(f"agent_{u}").uuid == u


def test_from_uuid_and_fixture() -> None:
    u = uuid.uuid4()
    assert AgentId.from_uuid(u).as_str() == f"agent_{u}"
    assert AgentId.test_fixture(1).as_str() == "agent_00000000-0000-0000-0000-000000000001"
    assert AgentId.test_fixture(0xABC).as_str() == "agent_00000000-0000-0000-0000-000000000abc"
    assert AgentId.test_fixture(16**12 - 1).as_str().endswith("ffffffffffff")
    with pytest.raises(IdError):
        AgentId.test_fixture(16**12)
    with pytest.raises(IdError):
        AgentId.test_fixture(-1)
    with pytest.raises(TypeError):
        AgentId.test_fixture("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AgentId.from_uuid(str(u))  # type: ignore[arg-type]


def test_parse_flexible_normalises_legacy_prefix() -> None:
    legacy = "agent-550e8400-e29b-41d4-a716-446655440000"
    assert AgentId.parse_flexible(legacy).as_str() == CANON
    assert AgentId.parse_flexible(CANON).as_str() == CANON
    with pytest.raises(IdError) as info:
        AgentId.parse(legacy)
    assert info.value.code == IdErrorCode.INVALID_PREFIX
    assert info.value.suggestion is not None
    assert "agent_" in info.value.suggestion


@pytest.mark.parametrize(
    ("value", "code", "hint"),
    [
        ("", "EMPTY_ID", "generate"),
        ("   ", "EMPTY_ID", "generate"),
        ("agent_", "MISSING_UUID", "UUID"),
        ("user_550e8400-e29b-41d4-a716-446655440000", "INVALID_PREFIX", "agent_"),
        ("AGENT_550e8400-e29b-41d4-a716-446655440000", "INVALID_PREFIX", "lowercase"),
        (" " + CANON, "INVALID_PREFIX", "strip"),
        ("agent_550E8400-E29B-41D4-A716-446655440000", "INVALID_UUID", "lowercase"),
        ("agent_550e8400-e29b-41d4-a716-44665544000", "INVALID_UUID", "36 characters"),
        ("agent_550e8400e29b41d4a716446655440000", "INVALID_UUID", "36 characters"),
        ("agent_550e8400-e29b-41d4-a716-44665544000g", "INVALID_UUID", "hex"),
        ("agent_550e8400_e29b-41d4-a716-446655440000", "INVALID_UUID", "hyphens"),
    ],
)
def test_error_codes_and_hints(value: str, code: str, hint: str) -> None:
    with pytest.raises(IdError) as info:
        AgentId.parse(value)
    err = info.value
    assert err.code == code
    assert isinstance(err, ValueError)
    assert isinstance(err, StateError)
    assert err.suggestion is not None
    assert hint in err.suggestion
    assert hint in str(err)


def test_non_str_is_type_error() -> None:
    for value in (None, 123, b"agent_x", uuid.uuid4()):
        with pytest.raises(TypeError):
            AgentId.parse(value)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            AgentId(value)  # type: ignore[arg-type]


def test_messages_never_repeat_more_than_64_input_characters() -> None:
    payload = "agent_" + "Z" * 10_000
    with pytest.raises(IdError) as info:
        AgentId.parse(payload)
    assert "Z" * 65 not in str(info.value)
    assert len(str(info.value)) < 400
    evil = "agent-" + "\n<script>" * 1000
    with pytest.raises(IdError) as info2:
        AgentId.parse(evil)
    assert str(info2.value).count("<script>") <= 8
    assert "\n" not in str(info2.value)


def test_immutable_hashable_and_equal_by_string() -> None:
    a, b = AgentId.parse(CANON), AgentId.parse(CANON)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != CANON  # an id is not equal to a plain string
    with pytest.raises(AttributeError):
        a._value = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a._value
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a) == a
    assert sorted([AgentId.test_fixture(2), AgentId.test_fixture(1)])[0] == AgentId.test_fixture(1)


@given(st.uuids())
def test_round_trip_any_uuid(u: uuid.UUID) -> None:
    agent_id = AgentId.from_uuid(u)
    assert AgentId.parse(agent_id.as_str()) == agent_id
    assert agent_id.uuid == u


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_id_error(value: str) -> None:
    try:
        agent_id = AgentId.parse(value)
    except IdError as err:
        code = err.code
        assert code in set(IdErrorCode)
    else:
        assert agent_id.as_str() == value


def test_the_canonical_parse_agrees_with_parse_and_key_of_passes_only_canonical_lengths() -> None:
    from iron_runtime_state import ids

    agent_id = AgentId.generate()
    text = agent_id.as_str()
    for value in [text, text.upper(), "agent-" + text[6:], text[:-1], "", "x" * 42, text + " "]:
        found = ids.parse_canonical(value)
        try:
            assert found == AgentId.parse(value)
        except IdError:
            assert found is None
    parsed = ids.parse_canonical(text)
    assert parsed is not None
    assert (parsed.as_str(), parsed.uuid) == (text, agent_id.uuid)
    assert ids.key_of(agent_id) == text
    assert ids.key_of(text) == text
    assert ids.key_of("x" * 42) == "x" * 42  # the store finds nothing for it
    assert ids.key_of(text + " ") is None
    assert ids.key_of(12) is None
