"""Exact money and calendar periods (groundwork for budget periods and scopes)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from iron_runtime_state import StateTypeError, ValidationError
from iron_runtime_state.money import from_micros, to_micros
from iron_runtime_state.periods import bounds, check_period, check_tz


def test_amounts_are_exact_micro_units() -> None:
    assert to_micros(0.1, "a") == 100_000  # a float is read by its shortest decimal form
    assert to_micros("18.5326", "a") == 18_532_600
    assert to_micros(Decimal("0.000001"), "a") == 1
    assert to_micros(3, "a") == 3_000_000
    assert from_micros(18_532_600) == 18.5326
    total = sum(to_micros(0.000001, "a") for _ in range(1_000_000))
    assert from_micros(total) == 1.0
    assert str(from_micros(to_micros("1.5", "a") - to_micros(1.5, "a"))) == "0.0"  # never -0.0
    assert to_micros("0.0000005", "a") == 0  # half to even
    assert to_micros("0.0000015", "a") == 2


@pytest.mark.parametrize("value", ["nan", float("inf"), "-1", -0.5, "abc", "-inf"])
def test_bad_amounts_are_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        to_micros(value, "amount")


@pytest.mark.parametrize("value", [None, True, [1], b"1"])
def test_non_numbers_are_a_type_error(value: object) -> None:
    with pytest.raises(StateTypeError):
        to_micros(value, "amount")


def test_limits_on_amounts() -> None:
    with pytest.raises(ValidationError, match=r"at least 0\.000001"):
        to_micros("0.0000001", "amount", allow_zero=False)
    with pytest.raises(ValidationError, match="at most"):
        to_micros(11, "amount", maximum=10_000_000)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def test_periods_are_calendar_aligned_in_the_budgets_zone() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc).timestamp()  # a Monday
    assert [_utc(t) for t in bounds(now, "day", "UTC")] == [
        "2026-11-30T00:00:00+00:00",
        "2026-12-01T00:00:00+00:00",
    ]
    assert _utc(bounds(now, "week", "UTC")[0]) == "2026-11-30T00:00:00+00:00"
    assert [_utc(t) for t in bounds(now, "month", "UTC")] == [
        "2026-11-01T00:00:00+00:00",
        "2026-12-01T00:00:00+00:00",
    ]
    # Paris is UTC+1 in winter: its day starts at 23:00 UTC the day before.
    assert _utc(bounds(now, "day", "Europe/Paris")[0]) == "2026-11-29T23:00:00+00:00"
    december = datetime(2026, 12, 15, tzinfo=timezone.utc).timestamp()
    assert _utc(bounds(december, "month", "UTC")[1]) == "2027-01-01T00:00:00+00:00"


def test_a_day_across_a_dst_change_has_its_own_length() -> None:
    spring = datetime(2026, 3, 29, 12, 0, tzinfo=timezone.utc).timestamp()  # Europe's clocks go forward
    start, end = bounds(spring, "day", "Europe/Paris")
    assert end - start == 23 * 3600


def test_bad_periods_and_zones() -> None:
    assert check_period(None) is None
    assert check_period("week") == "week"
    with pytest.raises(ValidationError, match="period"):
        check_period("year")
    with pytest.raises(StateTypeError):
        check_period(7)
    assert check_tz("UTC") == "UTC"
    with pytest.raises(ValidationError, match="time zone"):
        check_tz("Mars/Olympus")
    with pytest.raises(StateTypeError):
        check_tz(None)
