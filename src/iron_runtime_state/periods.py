"""Budget periods: calendar days, weeks (from Monday) and months in a budget's time zone.

A budget with a period spends from zero again at the first operation after each boundary;
this module only says where the boundaries are (no I/O, no clock of its own).
"""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Final

from .errors import StateTypeError, ValidationError

__all__ = ["PERIODS", "bounds", "check_period", "check_tz", "zone"]

#: The periods a budget may have (``None``: it never resets).
PERIODS: Final = ("day", "week", "month")
_UTC_NAMES: Final = frozenset({"UTC", "Etc/UTC"})


def check_period(value: object) -> str | None:
    """``value`` if it is ``None`` or one of :data:`PERIODS`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateTypeError(f"period must be None or a str, got {type(value).__name__}")
    if value not in PERIODS:
        raise ValidationError(f"unknown budget period {value[:32]!r}; use None, 'day', 'week' or 'month'")
    return value


def check_tz(value: object) -> str:
    """``value`` if it names an IANA time zone (``"UTC"``, ``"Europe/Paris"``, ...)."""
    if not isinstance(value, str):
        raise StateTypeError(f"tz must be a str naming an IANA time zone, got {type(value).__name__}")
    zone(value)
    return value


@lru_cache(maxsize=256)
def zone(name: str) -> tzinfo:
    """The ``tzinfo`` of an IANA time zone name (checked: a clear error for an unknown one)."""
    if name in _UTC_NAMES:
        return timezone.utc
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            f"unknown time zone {name[:64]!r}; use an IANA name such as 'UTC' or 'Europe/Paris' "
            "(on a system without a time zone database: pip install tzdata)"
        ) from None


def bounds(now: float, period: str, tz: str) -> tuple[float, float]:
    """The start and the end (Unix seconds) of the ``period`` that contains ``now`` in ``tz``."""
    local_zone = zone(tz)
    local = datetime.fromtimestamp(now, local_zone)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + timedelta(days=1)
    elif period == "week":
        start -= timedelta(days=start.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = start.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    else:
        check_period(period)
        raise AssertionError("unreachable")
    # Re-attach the zone so a day that starts or ends on a DST change gets its own offset.
    return _instant(start, local_zone), _instant(end, local_zone)


def _instant(wall: datetime, zone: tzinfo) -> float:
    return wall.replace(tzinfo=None).replace(tzinfo=zone).timestamp()
