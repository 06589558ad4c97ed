"""Budget thresholds: the shares of a limit whose crossing writes a ``budget_threshold`` event.

The rule, written once (the Redis scripts apply the same comparison in Lua). Each budget (an
agent's own limit, or a scope's) has thresholds, fractions of its limit: by default 50%, 80%
and 100% (``(0.5, 0.8, 1.0)``). A store keeps, beside the budget, the highest threshold it has
alerted in the current period (``alerted``, 0 when none; a new period starts it at 0 again).
A charge that leaves ``spent >= threshold * limit`` for thresholds above ``alerted`` writes one
``budget_threshold`` event for each, in the same atomic step as the charge, and raises
``alerted`` to the highest of them. So each threshold is alerted at most once per period,
however many processes race past it, and a limit lowered under the spend alerts at the next
charge. A budget without a limit (or with a limit of 0) has nothing to alert.

Thresholds are compared as doubles (``spent >= t * limit``, micro-units), the same in Python
and in Lua, so every store alerts at the same spend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from .errors import StateTypeError, ValidationError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MAX_THRESHOLD",
    "MAX_THRESHOLDS",
    "check_thresholds",
    "crossed",
    "parse_thresholds",
    "thresholds_text",
]

#: The thresholds of a budget that was given none: 50%, 80% and 100% of its limit.
DEFAULT_THRESHOLDS: Final[tuple[float, ...]] = (0.5, 0.8, 1.0)
#: How many thresholds a budget may have, and the largest (10 = 1000% of the limit: a commit may
#: take a budget past its limit, and a team may want to hear of it at 150%).
MAX_THRESHOLDS: Final = 10
MAX_THRESHOLD: Final = 10.0


def check_thresholds(value: object, what: str = "thresholds") -> tuple[float, ...]:
    """``value`` as sorted, distinct fractions of a limit in (0, 10]: ``(0.5, 0.8, 1.0)``.

    An empty sequence turns alerts off for the budget.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise StateTypeError(
            f"{what} must be a sequence of fractions of the limit such as (0.5, 0.8, 1.0), "
            f"got {type(value).__name__}"
        )
    if len(value) > MAX_THRESHOLDS:
        raise ValidationError(f"{what} holds {len(value)} thresholds; at most {MAX_THRESHOLDS} are allowed")
    out: set[float] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise StateTypeError(
                f"{what} must hold numbers (fractions of the limit, 0.8 for 80%), got {type(item).__name__}"
            )
        t = float(item)
        if not (math.isfinite(t) and 0.0 < t <= MAX_THRESHOLD):
            raise ValidationError(
                f"{what}: {item!r} is not a fraction of the limit in (0, {MAX_THRESHOLD:g}]; "
                "write 0.8 for 80%"
            )
        out.add(t)
    return tuple(sorted(out))


def crossed(thresholds: Sequence[float], alerted: float, limit: int | None, spent: int) -> tuple[float, ...]:
    """The thresholds above ``alerted`` that ``spent`` (micro-units, after the charge) reached.

    The store writes one ``budget_threshold`` event for each, and keeps the last as its new
    ``alerted``. Nothing without a limit or with a limit of 0.
    """
    if not limit:
        return ()
    return tuple(t for t in thresholds if t > alerted and spent >= t * limit)


def thresholds_text(thresholds: Sequence[float]) -> str | None:
    """How stores keep thresholds: ``"0.5,0.8,1.0"`` (``None`` for the default, ``""`` for none)."""
    if tuple(thresholds) == DEFAULT_THRESHOLDS:
        return None
    return ",".join(repr(float(t)) for t in thresholds)


def parse_thresholds(text: str | bytes | None) -> tuple[float, ...]:
    """The thresholds a store kept as :func:`thresholds_text` wrote them."""
    if text is None:
        return DEFAULT_THRESHOLDS
    if isinstance(text, bytes):
        text = text.decode()
    return tuple(float(part) for part in text.split(",")) if text else ()
