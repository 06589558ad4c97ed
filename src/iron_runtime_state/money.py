"""Exact money: amounts as whole micro-units (millionths of a unit), never binary floats.

Stores keep every amount (spent, held, limits) as an integer count of micro-units, so sums are
exact: a million spends of 0.000001 total exactly 1.0, and a total that went up and back down is
exactly 0. The API accepts ``int``, ``float``, ``Decimal`` and numeric ``str``; a ``float`` is read
by its shortest decimal form (``0.1`` is one tenth, not the binary fraction nearest it). Amounts
finer than a micro-unit are rounded to the nearest one (half to even). Results keep the seed's
``float`` (the nearest float to the exact total).
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Final

from .errors import StateTypeError, ValidationError

__all__ = [
    "MAX_MICROS",
    "MICRO",
    "MICROS_PER_UNIT",
    "exact",
    "float_micros",
    "from_micros",
    "to_decimal",
    "to_micros",
]

#: Micro-units in one unit of money.
MICROS_PER_UNIT: Final = 1_000_000
#: The resolution of every stored amount.
MICRO: Final = Decimal("0.000001")
#: The largest amount a budget counts, in micro-units (a billion units; see ``models.MAX_AMOUNT``).
MAX_MICROS: Final = 10**15
#: Up to a billion units (10**15 micro-units, below 2**50), a float's product with a million is
#: within 0.13 of the decimal value's scaled exactly, so where the product is within a quarter of
#: an integer, that integer is also the decimal value rounded: the fast path of ``to_micros``.
_FAST_UP_TO: Final = MAX_MICROS / MICROS_PER_UNIT
_CONTEXT: Final = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation])


def to_decimal(value: object, what: str) -> Decimal:
    """``value`` as a finite ``Decimal``; a clear error for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal, str)):
        raise StateTypeError(
            f"{what} must be a number (int, float, Decimal or numeric str), got {type(value).__name__}"
        )
    try:
        # repr gives a float's shortest decimal form: 0.1 is read as one tenth.
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (decimal.InvalidOperation, ValueError):
        raise ValidationError(f"{what} must be a number, got {str(value)[:64]!r}") from None
    if not amount.is_finite():
        raise ValidationError(f"{what} must be finite, got {str(value)[:64]!r}")
    return amount


def to_micros(
    value: object, what: str = "amount", *, allow_zero: bool = True, maximum: int | None = None
) -> int:
    """``value`` as whole micro-units (rounded half to even), at least 0 (or 1 without zero)."""
    if type(value) is float and 0.0 <= value <= _FAST_UP_TO:
        # The common case without Decimal: a float whose scaled value is clearly not a tie.
        scaled = value * MICROS_PER_UNIT
        micros = round(scaled)
        if abs(scaled - micros) < 0.25 and (micros or allow_zero) and (maximum is None or micros <= maximum):
            return micros
    amount = to_decimal(value, what)
    micros = int(_CONTEXT.multiply(amount, MICROS_PER_UNIT).to_integral_value(decimal.ROUND_HALF_EVEN))
    if amount < 0 or (micros == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "at least 0.000001 (one micro-unit)"
        raise ValidationError(f"{what} must be {bound}, got {str(value)[:64]!r}")
    if maximum is not None and micros > maximum:
        raise ValidationError(
            f"{what} must be at most {maximum / MICROS_PER_UNIT:g}, got {str(value)[:64]!r}"
        )
    return micros


def float_micros(value: float) -> int:
    """A validated float amount (0 to a billion units, as ``AgentState`` holds) in micro-units.

    The same result as :func:`to_micros`, without its checks: what a store does on every save.
    """
    scaled = value * MICROS_PER_UNIT
    micros = round(scaled)
    return micros if abs(scaled - micros) < 0.25 else to_micros(value)


def from_micros(micros: int) -> float:
    """The float nearest to an exact amount of micro-units (0 is ``0.0``, never ``-0.0``)."""
    return micros / MICROS_PER_UNIT + 0.0


def exact(value: float) -> Decimal:
    """The exact amount a float read from a store stands for (its micro-units as a ``Decimal``)."""
    return Decimal(to_micros(value)).scaleb(-6)
