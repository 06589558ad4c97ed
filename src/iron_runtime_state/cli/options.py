"""The options several commands share, and how the times and durations typed in them are read."""

from __future__ import annotations

import enum
import math
import re
import time
from datetime import datetime, timezone
from typing import Annotated, Final

import typer

from ..config import ENV_DEBUG, ENV_URL
from ..errors import ValidationError
from ..models import MAX_TIMESTAMP

__all__ = [
    "FLAGS",
    "TIME_HELP",
    "DebugOption",
    "JsonOption",
    "StatusChoice",
    "UrlOption",
    "YesOption",
    "parse_duration",
    "parse_pairs",
    "parse_time",
    "relative_time",
]


class _Flags:
    """What the options parsed so far asked for (reset by every run)."""

    debug = False


#: Read by the root command, which turns errors into one line unless ``--debug`` was given.
FLAGS: Final = _Flags()


def _set_debug(value: bool) -> bool:
    if value:
        FLAGS.debug = True
    return value


UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        "-u",
        metavar="URL",
        envvar=ENV_URL,
        show_envvar=True,
        help="Store URL: sqlite:///file.db, sqlite:////abs/path.db, redis://host:6379/0, memory://",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Machine output: one JSON document on stdout (messages on stderr).")
]
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug", envvar=ENV_DEBUG, callback=_set_debug, help="Show tracebacks and debug logs on errors."
    ),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


class StatusChoice(str, enum.Enum):
    """An agent status, as typed on the command line."""

    running = "running"
    stopped = "stopped"
    failed = "failed"


# -- times and durations -----------------------------------------------------------------------------

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
#: The forms :func:`parse_time` reads, for the help of the options that take a time.
TIME_HELP: Final = (
    "Unix seconds (1714564800), an ISO 8601 time (2024-05-01, 2024-05-01T12:00:00Z; UTC unless "
    "it has an offset) or a duration ago (90s, 30m, 2h, 7d, 1w)"
)


def parse_duration(text: str, what: str) -> float:
    """``30m``, ``2h``, ``7d``, ``1w`` or plain seconds, as seconds."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValidationError(
            f"{what}: cannot read {text[:32]!r} as a duration; use e.g. 90s, 30m, 2h, 7d, 1w"
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def relative_time(text: str) -> bool:
    """Whether ``text`` is a time :func:`parse_time` reads without a calendar: Unix seconds or a
    duration ago (``1714564800``, ``7d``)."""
    value = text.strip()
    return value.isdigit() or _DURATION_RE.fullmatch(value.lower()) is not None


def parse_pairs(pairs: list[str], option: str, example: str) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` options (``--label``, ``--tag``) as a dict; the store checks the keys."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationError(f"{option} {pair[:64]!r}: use KEY=VALUE, e.g. {option} {example}")
        if key in found and found[key] != value:
            raise ValidationError(
                f"{option} {key} is given twice ({found[key][:32]!r} and {value[:32]!r}); "
                "give one value per key"
            )
        found[key] = value
    return found


def parse_time(text: str, what: str, now: float | None = None) -> int:
    """A point in time as Unix seconds; see :data:`TIME_HELP` for the accepted forms."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    if _DURATION_RE.fullmatch(value.lower()):
        seconds = parse_duration(value, what)
        return max(0, math.floor((time.time() if now is None else now) - seconds))
    try:
        moment = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise ValidationError(f"{what}: cannot read {value[:32]!r} as a time; use {TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    stamp = math.floor(moment.timestamp())
    if not 0 <= stamp <= MAX_TIMESTAMP:
        raise ValidationError(f"{what}: {value[:32]!r} is before 1970 or too far ahead")
    return stamp
