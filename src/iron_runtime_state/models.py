"""The records the store keeps: agent states, audit events and what queries return.

Validation lives here, once: every backend stores only values that passed these checks.
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from .errors import StateTypeError, ValidationError
from .ids import AgentId
from .money import exact, from_micros, to_decimal, to_micros
from .names import check_labels, check_scopes
from .periods import check_period, check_tz
from .thresholds import DEFAULT_THRESHOLDS, check_thresholds

__all__ = [
    "AgentState",
    "AgentStatus",
    "AuditCheckpoint",
    "AuditEvent",
    "AuditRecord",
    "AuditVerification",
    "BudgetState",
    "FleetStats",
    "Reservation",
]

_INF: Final = math.inf
#: Counts are signed 64-bit in every store: they must stay below this.
MAX_COUNT: Final = 2**63
_new_object = object.__new__
EVENT_TYPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
MAX_DETAILS_BYTES: Final = 64 * 1024
MAX_TIMESTAMP: Final = 2**53  # exact in a float and in JSON numbers everywhere
#: The largest amount a budget counts (a total, a limit, or one call's spend, hold or commit):
#: a billion units. Stores keep amounts as whole micro-units (:mod:`.money`), and a billion units
#: is 10**15 of them, exact in a float, in Lua's numbers and in every store's integers, and read
#: back from a float without loss.
MAX_AMOUNT: Final = 1e9
#: The longest a budget hold may last: one day (seconds). A hold that outlives its call is
#: released when it expires, so a bound keeps a crashed caller from holding budget for ever.
MAX_TTL: Final = 86_400.0


class AgentStatus(enum.Enum):
    """What an agent is doing."""

    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"

    @classmethod
    def parse(cls, value: AgentStatus | str) -> AgentStatus:
        """The status for a member or its value (``"running"``); a clear error otherwise."""
        if isinstance(value, AgentStatus):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        names = ", ".join(repr(s.value) for s in cls)
        raise ValidationError(f"unknown agent status {str(value)[:64]!r}; use one of {names}")


def check_amount(value: object, what: str, *, allow_zero: bool = True, maximum: float | None = None) -> float:
    """``value`` as a float if it is a finite, non-negative number, at most ``maximum``.

    ``int``, ``float``, ``Decimal`` and numeric ``str`` are numbers here (``bool`` is not); a
    ``ValidationError`` names what is wrong and the bound.
    """
    if type(value) is float:
        amount = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            amount = float(value)
        except OverflowError:  # an int too large for a float
            amount = _INF
    elif isinstance(value, (Decimal, str)):
        amount = float(to_decimal(value, what))
    else:
        raise StateTypeError(
            f"{what} must be a number (int, float, Decimal or numeric str), got {type(value).__name__}"
        )
    if not (amount > 0.0 or (allow_zero and amount == 0.0)) or amount == _INF:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValidationError(f"{what} must be finite and {bound}, got {amount!r:.40}")
    if maximum is not None and amount > maximum:
        raise ValidationError(f"{what} must be at most {maximum:g}, got {amount!r}")
    return amount


def check_count(value: object, what: str, *, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    if type(value) is not int:
        if isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        else:
            raise StateTypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValidationError(f"{what} must be >= {minimum}, got {value}")
    if value >= MAX_COUNT:
        raise ValidationError(f"{what} must be below 2**63, got {value}")
    return value


@dataclass(slots=True)
class AgentState:
    """The live state of one agent.

    Mutable, as in the seed: read a copy, change it and save it back. It is validated when
    constructed and again when saved, so a state broken after construction is never stored.
    ``budget_limit`` of ``None`` means no limit. Amounts are kept to the micro-unit (see
    :mod:`iron_runtime_state.money`).

    Beyond the seed: ``labels`` say who the agent works for (``{"team": "support"}``);
    ``budget_scopes`` name the budgets above it that each spend also draws on; with a
    ``budget_period`` (``"day"``, ``"week"``, ``"month"``, in ``budget_tz``) ``budget_spent`` is
    the spend of the period that started at ``period_start``, and starts from zero at the first
    operation after the period ends. ``period_start`` is set by the store (Unix seconds; ``None``
    without a period): a value given to a save is replaced. ``budget_thresholds`` are the shares
    of ``budget_limit`` whose first crossing in a period writes a ``budget_threshold`` event
    (default 50%, 80%, 100%; ``()`` for none; see :mod:`iron_runtime_state.thresholds`).
    """

    agent_id: AgentId
    status: AgentStatus
    budget_spent: float = 0.0
    pii_detections: int = 0
    budget_limit: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    budget_scopes: tuple[str, ...] = ()
    budget_period: str | None = None
    budget_tz: str = "UTC"
    period_start: float | None = None
    budget_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` subclasses if a field is invalid; normalise values."""
        spent = self.budget_spent
        pii = self.pii_detections
        limit = self.budget_limit
        if (  # the common case in one expression; the checks below give the precise error
            type(self.agent_id) is AgentId
            and type(self.status) is AgentStatus
            and type(spent) is float
            and 0.0 <= spent <= MAX_AMOUNT
            and type(pii) is int
            and 0 <= pii < MAX_COUNT
            and (limit is None or (type(limit) is float and 0.0 <= limit <= MAX_AMOUNT))
            and type(self.labels) is dict
            and not self.labels
            and self.budget_scopes == ()
            and self.budget_period is None
            and self.budget_tz == "UTC"
            and self.budget_thresholds is DEFAULT_THRESHOLDS
        ):
            self.period_start = None
            return
        if type(self.agent_id) is not AgentId and not isinstance(self.agent_id, AgentId):
            raise StateTypeError(
                f"AgentState.agent_id must be an AgentId, got {type(self.agent_id).__name__}; "
                "wrap strings with AgentId.parse('agent_<uuid>')"
            )
        if type(self.status) is not AgentStatus:
            raise StateTypeError(
                f"AgentState.status must be an AgentStatus, got {type(self.status).__name__}; "
                "use AgentStatus.RUNNING, STOPPED or FAILED (AgentStatus.parse for strings)"
            )
        if type(spent) is not float or not 0.0 <= spent <= MAX_AMOUNT:
            self.budget_spent = check_amount(spent, "AgentState.budget_spent", maximum=MAX_AMOUNT)
        if type(self.pii_detections) is not int or not 0 <= self.pii_detections < MAX_COUNT:
            self.pii_detections = check_count(self.pii_detections, "AgentState.pii_detections")
        if limit is not None and (type(limit) is not float or not 0.0 <= limit <= MAX_AMOUNT):
            self.budget_limit = check_amount(limit, "AgentState.budget_limit (or None)", maximum=MAX_AMOUNT)
        self.labels = check_labels(self.labels)
        self.budget_scopes = check_scopes(self.budget_scopes)
        self.budget_period = check_period(self.budget_period)
        self.budget_tz = check_tz(self.budget_tz)
        if self.budget_thresholds is not DEFAULT_THRESHOLDS:
            self.budget_thresholds = check_thresholds(self.budget_thresholds, "AgentState.budget_thresholds")
            if self.budget_thresholds == DEFAULT_THRESHOLDS:
                self.budget_thresholds = DEFAULT_THRESHOLDS
        start = self.period_start
        if self.budget_period is None:
            self.period_start = None
        elif start is not None:
            self.period_start = check_amount(start, "AgentState.period_start (Unix seconds, or None)")

    @classmethod
    def _trusted(
        cls,
        agent_id: AgentId,
        status: AgentStatus,
        budget_spent: float,
        pii_detections: int,
        budget_limit: float | None,
        labels: dict[str, str] | None = None,
        budget_scopes: tuple[str, ...] = (),
        budget_period: str | None = None,
        budget_tz: str = "UTC",
        period_start: float | None = None,
        budget_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    ) -> AgentState:
        """Build from values read back from a store (which holds only valid ones)."""
        new: AgentState = _new_object(cls)
        new.agent_id = agent_id
        new.status = status
        new.budget_spent = budget_spent
        new.pii_detections = pii_detections
        new.budget_limit = budget_limit
        new.labels = {} if labels is None else labels
        new.budget_scopes = budget_scopes
        new.budget_period = budget_period
        new.budget_tz = budget_tz
        new.period_start = period_start
        new.budget_thresholds = budget_thresholds
        return new

    def checked_copy(self) -> AgentState:
        """A validated, normalised copy: what a store keeps when this state is saved.

        The copy is taken first and then validated, so a thread changing this object meanwhile
        cannot slip an invalid value past the checks.
        """
        new = self.copy()
        new.validate()
        return new

    def copy(self) -> AgentState:
        """An independent copy."""
        labels = self.labels
        # Anything but a dict is handed on as it is, for validate() to name what is wrong.
        return AgentState._trusted(
            self.agent_id,
            self.status,
            self.budget_spent,
            self.pii_detections,
            self.budget_limit,
            dict(labels) if type(labels) is dict else labels,
            self.budget_scopes,
            self.budget_period,
            self.budget_tz,
            self.period_start,
            self.budget_thresholds,
        )

    @property
    def budget_remaining(self) -> float:
        """``budget_limit - budget_spent`` (never below 0), or ``inf`` without a limit."""
        if self.budget_limit is None:
            return _INF
        return from_micros(max(0, to_micros(self.budget_limit) - to_micros(self.budget_spent)))

    @property
    def spent_exact(self) -> Decimal:
        """``budget_spent`` as the exact ``Decimal`` the store keeps (to the micro-unit)."""
        return exact(self.budget_spent)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {
            "agent_id": self.agent_id.as_str(),
            "status": self.status.value,
            "budget_spent": self.budget_spent,
            "pii_detections": self.pii_detections,
            "budget_limit": self.budget_limit,
            "labels": dict(self.labels),
            "budget_scopes": list(self.budget_scopes),
            "budget_period": self.budget_period,
            "budget_tz": self.budget_tz,
            "period_start": self.period_start,
            "budget_thresholds": list(self.budget_thresholds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentState:
        """The state for a dict made by :meth:`to_dict` (or by 0.4/0.5, without the newer keys).

        Unknown keys are errors; missing optional keys take their defaults.
        """
        if not isinstance(data, Mapping):
            raise StateTypeError(f"AgentState.from_dict expects a mapping, got {type(data).__name__}")
        known = set(_STATE_KEYS)
        unknown = sorted(str(k)[:64] for k in data if k not in known)
        if unknown:
            raise ValidationError(f"unknown AgentState fields {unknown}; expected {sorted(known)}")
        for key in ("agent_id", "status"):
            if key not in data:
                raise ValidationError(f"AgentState.from_dict: missing required field {key!r}")
        raw_id = data["agent_id"]
        agent_id = raw_id if isinstance(raw_id, AgentId) else AgentId.parse(raw_id)
        scopes = data.get("budget_scopes", ())
        return cls(
            agent_id=agent_id,
            status=AgentStatus.parse(data["status"]),
            budget_spent=data.get("budget_spent", 0.0),
            pii_detections=data.get("pii_detections", 0),
            budget_limit=data.get("budget_limit"),
            labels=data.get("labels", {}),
            budget_scopes=_tuple(scopes),
            budget_period=data.get("budget_period"),
            budget_tz=data.get("budget_tz", "UTC"),
            period_start=data.get("period_start"),
            budget_thresholds=_tuple(data.get("budget_thresholds", DEFAULT_THRESHOLDS)),
        )


def _tuple(value: Any) -> Any:
    """A JSON list as a tuple; anything else as it is, for validate() to name."""
    return tuple(value) if isinstance(value, list) else value


_STATE_KEYS: Final = (
    "agent_id",
    "status",
    "budget_spent",
    "pii_detections",
    "budget_limit",
    "labels",
    "budget_scopes",
    "budget_period",
    "budget_tz",
    "period_start",
    "budget_thresholds",
)


def check_state(state: object) -> AgentState:
    """A validated private copy of ``state``; mutating the original later changes nothing."""
    if not isinstance(state, AgentState):
        raise StateTypeError(
            f"expected an AgentState, got {type(state).__name__}; build one with "
            "AgentState(agent_id, AgentStatus.RUNNING) or AgentState.from_dict(data)"
        )
    return state.checked_copy()


def _now() -> int:
    return int(time.time())


def check_event_type(value: object) -> str:
    """``value`` if it is a valid audit event type."""
    if not isinstance(value, str):
        raise StateTypeError(f"AuditEvent.event_type must be a str, got {type(value).__name__}")
    if EVENT_TYPE_RE.fullmatch(value) is None:
        shown = repr(value[:64]) + ("..." if len(value) > 64 else "")
        raise ValidationError(
            f"AuditEvent.event_type {shown} is invalid: use 1 to 64 characters of "
            "a-z 0-9 _ . : -, starting with a letter or digit (e.g. 'pii_detected')"
        )
    return value


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One security or compliance event about an agent.

    ``timestamp`` is in Unix seconds (now by default); ``event_type`` is 1 to 64 characters of
    ``[a-z0-9_.:-]`` starting with a letter or digit; ``details`` is at most 64 KiB of UTF-8.
    """

    agent_id: AgentId
    event_type: str
    timestamp: int = field(default_factory=_now)
    details: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.agent_id, AgentId):
            raise StateTypeError(
                f"AuditEvent.agent_id must be an AgentId, got {type(self.agent_id).__name__}; "
                "wrap strings with AgentId.parse('agent_<uuid>')"
            )
        check_event_type(self.event_type)
        ts = self.timestamp
        if type(ts) is not int:
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise StateTypeError(
                    f"AuditEvent.timestamp must be an int of Unix seconds, got {type(ts).__name__}"
                )
            object.__setattr__(self, "timestamp", int(ts))
        if not 0 <= self.timestamp <= MAX_TIMESTAMP:
            raise ValidationError(
                f"AuditEvent.timestamp must be Unix seconds from 0 to 2**53, got {self.timestamp}"
            )
        details = self.details
        if not isinstance(details, str):
            raise StateTypeError(f"AuditEvent.details must be a str, got {type(details).__name__}")
        if len(details) > MAX_DETAILS_BYTES // 4 or not details.isascii():
            try:
                size = len(details.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValidationError(
                    "AuditEvent.details must be valid UTF-8 text (it holds a lone surrogate)"
                ) from None
            if size > MAX_DETAILS_BYTES:
                raise ValidationError(
                    f"AuditEvent.details is {size} bytes of UTF-8; the limit is 65536 (64 KiB): "
                    "store large payloads elsewhere and reference them"
                )

    @classmethod
    def _trusted(cls, agent_id: AgentId, event_type: str, timestamp: int, details: str) -> AuditEvent:
        new: AuditEvent = object.__new__(cls)
        object.__setattr__(new, "agent_id", agent_id)
        object.__setattr__(new, "event_type", event_type)
        object.__setattr__(new, "timestamp", timestamp)
        object.__setattr__(new, "details", details)
        return new

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "agent_id": self.agent_id.as_str(),
            "event_type": self.event_type,
            "timestamp": self.timestamp,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An audit event as stored: its place ``seq`` in the trail and its link in the hash chain.

    ``hash`` covers ``prev_hash``, ``seq`` and the canonical encoding of ``event`` (see the
    README, "The audit trail's hash chain").
    """

    seq: int
    event: AuditEvent
    hash: str
    prev_hash: str

    @property
    def agent_id(self) -> AgentId:
        """The event's agent."""
        return self.event.agent_id

    @property
    def event_type(self) -> str:
        """The event's type."""
        return self.event.event_type

    @property
    def timestamp(self) -> int:
        """The event's time, in Unix seconds."""
        return self.event.timestamp

    @property
    def details(self) -> str:
        """The event's details."""
        return self.event.details

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the JSONL export writes one of these per line."""
        return {
            "seq": self.seq,
            "agent_id": self.event.agent_id.as_str(),
            "event_type": self.event.event_type,
            "timestamp": self.event.timestamp,
            "details": self.event.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class FleetStats:
    """Totals for the whole store, kept up to date as states change."""

    total: int
    running: int
    stopped: int
    failed: int
    budget_spent: float
    pii_detections: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "total": self.total,
            "running": self.running,
            "stopped": self.stopped,
            "failed": self.failed,
            "budget_spent": self.budget_spent,
            "pii_detections": self.pii_detections,
        }


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget scope above agents (``team:support``), as ``get_budget`` reads it.

    ``spent`` is the spend of the current period (since ``period_start``, a time-zone-aware
    ``datetime``; ``None`` without a period), ``held`` the open holds on it, and ``available``
    what can still be spent or held: ``limit - spent - held``, never below 0 (``inf`` without a
    limit). Amounts are floats of exact micro-unit totals; ``spent_exact`` gives the ``Decimal``.
    """

    scope: str
    limit: float | None
    period: str | None
    tz: str
    period_start: datetime | None
    spent: float
    held: float
    #: Shares of ``limit`` whose first crossing in a period writes ``budget_threshold``.
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    @property
    def available(self) -> float:
        """What can still be spent or held (``inf`` without a limit)."""
        if self.limit is None:
            return _INF
        return from_micros(max(0, to_micros(self.limit) - to_micros(self.spent) - to_micros(self.held)))

    @property
    def spent_exact(self) -> Decimal:
        """``spent`` as the exact ``Decimal`` the store keeps."""
        return exact(self.spent)

    @property
    def used(self) -> float:
        """The share of the limit spent or held, from 0.0 (``0.0`` without a limit)."""
        if not self.limit:
            return 0.0
        return (self.spent + self.held) / self.limit

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``period_start`` in ISO 8601)."""
        return {
            "scope": self.scope,
            "limit": self.limit,
            "period": self.period,
            "tz": self.tz,
            "period_start": None if self.period_start is None else self.period_start.isoformat(),
            "spent": self.spent,
            "held": self.held,
            "available": None if self.limit is None else self.available,
            "thresholds": list(self.thresholds),
        }


@dataclass(frozen=True, slots=True)
class Reservation:
    """An open hold on part of an agent's budget, made by ``reserve_budget``.

    Settle it exactly once with ``commit_reservation`` or ``release_reservation``; if neither
    happens before ``expires_at`` (Unix seconds) the store releases it by itself. ``scopes``
    names the budget scopes the hold also counts against.
    """

    reservation_id: str
    agent_id: AgentId
    amount: float
    expires_at: float
    scopes: tuple[str, ...] = ()

    @classmethod
    def _trusted(
        cls,
        reservation_id: str,
        agent_id: AgentId,
        amount: float,
        expires_at: float,
        scopes: tuple[str, ...] = (),
    ) -> Reservation:
        """Build from values a store just checked (a frozen dataclass's __init__ is slow)."""
        new: Reservation = _new_object(cls)
        _set_reservation_id(new, reservation_id)
        _set_agent_id(new, agent_id)
        _set_amount(new, amount)
        _set_expires_at(new, expires_at)
        _set_scopes(new, scopes)
        return new


# The slots' own setters: the fastest way to fill a frozen instance (Reservation._trusted).
_set_reservation_id, _set_agent_id, _set_amount, _set_expires_at, _set_scopes = (
    Reservation.__dict__[name].__set__
    for name in ("reservation_id", "agent_id", "amount", "expires_at", "scopes")
)


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """What ``verify_audit_log`` found.

    ``ok`` is true when every record links to the one before it and its hash matches its
    content. Otherwise ``first_bad_seq`` names the first record that does not, and ``reason``
    says why. ``anchor_seq``/``anchor_hash`` are where the checked chain starts (after a prune).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    anchor_seq: int = 0
    anchor_hash: str = ""
    last_seq: int | None = None

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "anchor_seq": self.anchor_seq,
            "anchor_hash": self.anchor_hash,
            "last_seq": self.last_seq,
        }


_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AuditCheckpoint:
    """A witness of the audit trail: its head ``(seq, hash)`` at ``time``, made by ``audit_checkpoint``.

    Keep it outside the store (a file in another system, a ticket, a log shipped elsewhere):
    ``verify_audit_log(since_checkpoint=...)`` then fails if the store no longer extends it, which
    is how a truncation of the newest records shows. With an audit key, ``signature`` is the
    key's seal of the statement, so the checkpoint itself cannot be forged without the key;
    without a key it is empty, and the checkpoint is only as safe as the place it is kept.
    """

    seq: int
    hash: str
    time: int
    signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {"seq": self.seq, "hash": self.hash, "time": self.time, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: object) -> AuditCheckpoint:
        """The checkpoint in a dict made by :meth:`to_dict`; a clear error for anything else."""
        if not isinstance(data, Mapping):
            raise StateTypeError(f"an audit checkpoint is a JSON object, got {type(data).__name__}")
        keys = {"seq", "hash", "time", "signature"}
        if set(data) != keys:
            found = sorted(str(k)[:32] for k in data)[:8]
            raise ValidationError(f"an audit checkpoint has exactly the keys {sorted(keys)}, got {found}")
        seq, digest, at, signature = data["seq"], data["hash"], data["time"], data["signature"]
        if type(seq) is not int or not 0 <= seq < MAX_COUNT:
            raise ValidationError("the checkpoint's seq must be an int >= 0")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValidationError("the checkpoint's hash must be 64 lowercase hex digits")
        if type(at) is not int or not 0 <= at < MAX_TIMESTAMP:
            raise ValidationError("the checkpoint's time must be Unix seconds (an int)")
        if not isinstance(signature, str) or (signature and not _HEX64.fullmatch(signature)):
            raise ValidationError("the checkpoint's signature must be empty or 64 lowercase hex digits")
        return cls(seq, digest, at, signature)

    def statement(self) -> str:
        """The text the signature seals: ``seq``, ``hash`` and ``time``."""
        return f"{self.hash}@{self.time}"
