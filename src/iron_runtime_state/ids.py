"""Agent identifiers: ``agent_`` followed by a lowercase hyphenated UUID.

An :class:`AgentId` can only hold a valid id: every way of making one validates, so code that
receives an ``AgentId`` never checks the format again.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

from .errors import IdError, IdErrorCode, StateTypeError

__all__ = ["AgentId"]

PREFIX: Final = "agent_"
LEGACY_PREFIX: Final = "agent-"
_UUID_LEN: Final = 36
#: Characters in a canonical id: the prefix and a hyphenated UUID.
CANONICAL_LENGTH: Final = len(PREFIX) + _UUID_LEN
_CANONICAL = re.compile(r"agent_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_ANY_CASE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EXAMPLE: Final = "agent_550e8400-e29b-41d4-a716-446655440000"
_MAX_ECHO: Final = 64
_FIXTURE_MAX: Final = 16**12 - 1


def _echo(value: str) -> str:
    """The rejected input as it may appear in a message: at most 64 of its characters."""
    if len(value) <= _MAX_ECHO:
        return repr(value)
    return f"{value[:_MAX_ECHO]!r}... ({len(value) - _MAX_ECHO} more characters)"


def _diagnose(value: str) -> IdError:
    """Explain why ``value`` is not a canonical id (called only once the fast check failed)."""
    if not value.strip():
        return IdError(
            "agent id is empty",
            IdErrorCode.EMPTY_ID,
            f"pass an id such as {_EXAMPLE!r}, or make one with AgentId.generate()",
        )
    if value != value.strip():
        return IdError(
            f"agent id {_echo(value)} has surrounding whitespace",
            IdErrorCode.INVALID_PREFIX,
            "strip the string before parsing it",
        )
    if value.startswith(LEGACY_PREFIX):
        return IdError(
            f"agent id {_echo(value)} uses the legacy prefix 'agent-'",
            IdErrorCode.INVALID_PREFIX,
            "use the underscore form 'agent_<uuid>', or AgentId.parse_flexible() to convert it",
        )
    if not value.startswith(PREFIX):
        if value.lower().startswith(PREFIX):
            hint = "the prefix must be lowercase 'agent_'"
        else:
            hint = f"an agent id is 'agent_' followed by a UUID, e.g. {_EXAMPLE!r}"
        return IdError(
            f"agent id {_echo(value)} does not start with 'agent_'",
            IdErrorCode.INVALID_PREFIX,
            hint,
        )
    rest = value[len(PREFIX) :]
    if not rest:
        return IdError(
            "agent id 'agent_' has no UUID after the prefix",
            IdErrorCode.MISSING_UUID,
            f"append a UUID, e.g. {_EXAMPLE!r}",
        )
    if len(rest) != _UUID_LEN:
        return IdError(
            f"agent id {_echo(value)} has a UUID part of {len(rest)} characters",
            IdErrorCode.INVALID_UUID,
            "expected 36 characters: 32 hex digits in groups 8-4-4-4-12 separated by hyphens",
        )
    if _UUID_ANY_CASE.fullmatch(rest):
        return IdError(
            f"agent id {_echo(value)} has uppercase hex digits",
            IdErrorCode.INVALID_UUID,
            f"lowercase hex is required: {PREFIX + rest.lower()!r}",
        )
    return IdError(
        f"agent id {_echo(value)} does not hold a valid UUID",
        IdErrorCode.INVALID_UUID,
        "expected 32 lowercase hex digits in groups 8-4-4-4-12 separated by hyphens",
    )


class AgentId:
    """A validated agent identifier such as ``agent_550e8400-e29b-41d4-a716-446655440000``.

    Immutable and hashable; two ids are equal when their canonical strings are equal.
    ``AgentId(s)`` is the same as :meth:`AgentId.parse`. It holds only the canonical text, so
    a store that reads an id back builds one without parsing (:meth:`_trusted`).
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", AgentId.parse(value)._value)

    @classmethod
    def _trusted(cls, canonical: str) -> AgentId:
        """Build from a string already known to be canonical (store reads, generation)."""
        new = object.__new__(cls)
        _set_value(new, canonical)  # the slot's own setter: AgentId.__setattr__ refuses
        return new

    @staticmethod
    def parse(value: str) -> AgentId:
        """Parse the canonical form; raise :class:`IdError` (or ``TypeError`` for a non-str)."""
        if type(value) is not str:
            if isinstance(value, str):
                value = str.__str__(value)
            else:
                raise StateTypeError(
                    f"AgentId.parse expects a str, got {type(value).__name__}; "
                    "pass the id's text, e.g. AgentId.parse('agent_<uuid>')"
                )
        found = parse_canonical(value)
        if found is None:
            raise _diagnose(value)
        return found

    @staticmethod
    def parse_flexible(value: str) -> AgentId:
        """Like :meth:`parse`, but also accept the legacy ``agent-<uuid>`` form and normalise it."""
        if isinstance(value, str) and value.startswith(LEGACY_PREFIX):
            value = PREFIX + value[len(LEGACY_PREFIX) :]
        return AgentId.parse(value)

    @staticmethod
    def generate() -> AgentId:
        """A new random id (UUID version 4)."""
        return AgentId._trusted(PREFIX + str(uuid.uuid4()))

    @staticmethod
    def from_uuid(value: uuid.UUID) -> AgentId:
        """The id of a :class:`uuid.UUID` of any version."""
        if not isinstance(value, uuid.UUID):
            raise StateTypeError(
                f"AgentId.from_uuid expects a uuid.UUID, got {type(value).__name__}; "
                "use AgentId.parse() for strings"
            )
        return AgentId._trusted(PREFIX + str(value))

    @staticmethod
    def test_fixture(n: int) -> AgentId:
        """A deterministic id for tests: ``test_fixture(1)`` is ``agent_00000000-...-000000000001``."""
        if type(n) is not int:
            raise StateTypeError(f"AgentId.test_fixture expects an int, got {type(n).__name__}")
        if not 0 <= n <= _FIXTURE_MAX:
            raise IdError(
                f"test fixture number {n} does not fit in the last UUID group",
                IdErrorCode.INVALID_UUID,
                f"use a number from 0 to {_FIXTURE_MAX} (12 hex digits)",
            )
        return AgentId._trusted(PREFIX + str(uuid.UUID(int=n)))

    def as_str(self) -> str:
        """The canonical string."""
        return self._value

    @property
    def uuid(self) -> uuid.UUID:
        """The UUID part."""
        return uuid.UUID(self._value[len(PREFIX) :])

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"AgentId({self._value!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AgentId):
            return self._value == other._value
        return NotImplemented

    def __lt__(self, other: AgentId) -> bool:
        if isinstance(other, AgentId):
            return self._value < other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("AgentId is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("AgentId is immutable")

    def __reduce__(self) -> tuple[type[AgentId], tuple[str]]:
        return (AgentId, (self._value,))

    def __copy__(self) -> AgentId:
        return self

    def __deepcopy__(self, memo: object) -> AgentId:
        return self


_set_value = AgentId.__dict__["_value"].__set__


def parse_canonical(value: str) -> AgentId | None:
    """The id for a canonical string, or ``None``."""
    if len(value) != CANONICAL_LENGTH or _CANONICAL.fullmatch(value) is None:
        return None
    return AgentId._trusted(value)


def key_of(value: object) -> str | None:
    """The text a store is keyed by for ``value`` (an ``AgentId`` or a string), or ``None``.

    Stores hold canonical ids only, so a read needs no parse: a string that is not canonical
    simply finds nothing. Only text of the canonical length is passed on, so a store is never
    asked to look up anything larger.
    """
    if type(value) is str:
        return value if len(value) == CANONICAL_LENGTH else None
    if isinstance(value, AgentId):
        return value._value
    return None


def try_parse(value: object) -> AgentId | None:
    """The id for ``value`` (an ``AgentId`` or canonical string), or ``None`` if it is neither."""
    if type(value) is AgentId:
        return value
    if type(value) is str:
        return parse_canonical(value)
    if isinstance(value, AgentId):
        return value
    return None


def coerce(value: str | AgentId) -> AgentId:
    """The id for ``value`` (an ``AgentId`` or canonical string); raise :class:`IdError` if invalid."""
    if type(value) is AgentId:
        return value
    if isinstance(value, AgentId):
        return value
    return AgentId.parse(value)
