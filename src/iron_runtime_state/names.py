"""The names an agent carries beyond its id: labels (who it works for) and budget scopes.

Their shapes and checks, written once; :class:`~iron_runtime_state.models.AgentState` and the
managers use them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from .errors import StateTypeError, ValidationError

__all__ = ["MAX_LABELS", "MAX_SCOPES", "check_labels", "check_scope", "check_scopes"]

#: Labels an agent may carry, and their shape.
MAX_LABELS: Final = 16
LABEL_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
MAX_LABEL_VALUE: Final = 128
#: Budget scopes an agent may draw on, and the shape of a scope's name.
MAX_SCOPES: Final = 8
SCOPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,127}")


def check_labels(value: object) -> dict[str, str]:
    """``value`` as a new dict of labels, if it is a small str -> str mapping of valid keys."""
    if not isinstance(value, Mapping):
        raise StateTypeError(f"AgentState.labels must be a mapping of str to str, got {type(value).__name__}")
    if len(value) > MAX_LABELS:
        raise ValidationError(
            f"AgentState.labels holds {len(value)} entries; at most {MAX_LABELS} are allowed"
        )
    labels: dict[str, str] = {}
    for key, label in value.items():
        if not isinstance(key, str) or LABEL_KEY_RE.fullmatch(key) is None:
            raise ValidationError(
                f"label key {str(key)[:40]!r} is invalid: use 1 to 32 of a-z 0-9 _ . -, "
                "starting with a letter (e.g. 'team')"
            )
        if not isinstance(label, str):
            raise StateTypeError(f"label {key!r} must be a str, got {type(label).__name__}")
        if len(label) > MAX_LABEL_VALUE:
            raise ValidationError(
                f"label {key!r} is {len(label)} characters long; the limit is {MAX_LABEL_VALUE}"
            )
        labels[key] = label
    return labels


def check_scope(value: object, what: str = "budget scope") -> str:
    """``value`` if it is a valid budget scope name (``team:support``, ``org:acme``)."""
    if not isinstance(value, str):
        raise StateTypeError(f"{what} must be a str, got {type(value).__name__}")
    if SCOPE_RE.fullmatch(value) is None:
        raise ValidationError(
            f"{what} {value[:64]!r} is invalid: use 1 to 128 of a-z 0-9 _ . : -, starting with a "
            "letter or digit (e.g. 'team:support')"
        )
    return value


def check_scopes(value: object) -> tuple[str, ...]:
    """``value`` as a tuple of distinct scope names (a list or tuple of them)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise StateTypeError(
            "AgentState.budget_scopes must be a tuple of scope names, e.g. ('org:acme', 'team:support'), "
            f"got {type(value).__name__}"
        )
    scopes = tuple(check_scope(scope, "a budget scope in AgentState.budget_scopes") for scope in value)
    if len(scopes) > MAX_SCOPES:
        raise ValidationError(f"an agent may draw on at most {MAX_SCOPES} budget scopes, got {len(scopes)}")
    if len(set(scopes)) != len(scopes):
        raise ValidationError(f"AgentState.budget_scopes names a scope twice: {list(scopes)}")
    return scopes
