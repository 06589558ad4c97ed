"""The managers' metering rules, with no I/O: pricing calls, the ledger's notes, spend reports and
the ``on_event`` hook. :class:`~.core.ManagerCore` derives from :class:`MeteringCore`.

A model call is priced here (:class:`~.pricing.PriceBook`: the user's price table over the
genai-prices catalogue), in whole micro-units rounded up, and settled through the same atomic
store operations as any spend: ``record_spend`` for :meth:`record_usage`, a hold and its commit
for :meth:`reserve_for_call`. The call's model and token counts ride along as a
:class:`~.ledger.SpendNote`, which the store writes into the ledger's ``spend`` record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from .errors import StateTypeError, ValidationError
from .ids import AgentId, coerce
from .ledger import (
    SpendNote,
    SpendQuery,
    SpendRow,
    SpendTotal,
    check_filter_scope,
    check_tags,
    group_keys,
    report_rows,
    time_of,
)
from .models import AuditRecord
from .money import MAX_MICROS, from_micros, to_micros
from .names import check_labels
from .periods import check_tz
from .pricing import Price, PriceBook, Usage, check_tokens

__all__ = [
    "METERING_OPTIONS",
    "EventHook",
    "MeteringCore",
    "ReportRequest",
    "merged",
    "metering_options",
    "usage_of",
]

logger: Final = logging.getLogger("iron_runtime_state")
audit_logger: Final = logging.getLogger("iron_runtime_state.audit")

#: A program's hook on the records its manager's operations append (``on_event=``).
EventHook = Callable[[AuditRecord], object]
#: A report as the store receives it (the query), with the report's keys and time zone.
ReportRequest = tuple[SpendQuery, tuple[str, ...], str]


class MeteringCore:
    """Pricing, usage notes, reports and the event hook, shared by both managers."""

    _prices: PriceBook
    _on_event: EventHook | None

    def _init_metering(
        self,
        prices: PriceBook | Mapping[str, Price | Mapping[str, Any]] | None,
        default_price: Price | Mapping[str, Any] | None,
        on_event: EventHook | None,
    ) -> None:
        if on_event is not None and not callable(on_event):
            raise StateTypeError(
                f"on_event must be a callable taking an AuditRecord, got {type(on_event).__name__}"
            )
        self._prices = PriceBook.of(prices, default_price)
        self._on_event = on_event

    # -- prices ---------------------------------------------------------------------------------

    @property
    def prices(self) -> PriceBook:
        """The prices this manager charges model calls at (the ``prices=`` table over the catalogue)."""
        return self._prices

    def cost(
        self, model: str, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> Decimal:
        """What a call to ``model`` with these token counts costs, exactly, rounded up to the
        micro-unit (``input_tokens`` counts every prompt token, ``cached_input_tokens`` of them
        were read from the provider's cache). :class:`PricingError` for a model without a price."""
        usage = self._usage(model, input_tokens, output_tokens, cached_input_tokens)
        return Decimal(self._usage_micros(usage)).scaleb(-6)

    @staticmethod
    def _usage(
        model: object,
        input_tokens: object,
        output_tokens: object,
        cached: object,
        output: str = "output_tokens",
    ) -> Usage:
        """The call's usage; the counts checked here first, so an error names the argument."""
        return Usage(
            model,  # type: ignore[arg-type]  # Usage checks it
            check_tokens(input_tokens, "input_tokens"),
            check_tokens(output_tokens, output),
            check_tokens(cached, "cached_input_tokens"),
        )

    def _usage_micros(self, usage: Usage) -> int:
        micros = self._prices.cost_micros(
            usage.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        )
        if micros > MAX_MICROS:
            raise ValidationError(
                f"a call to {usage.model} costing {from_micros(micros):g} is past the largest amount "
                "a budget counts; check the token counts"
            )
        return micros

    # -- requests -------------------------------------------------------------------------------

    @staticmethod
    def _note(usage: Usage | None, tags: object) -> SpendNote | None:
        """What the ledger's record says beyond the amount (``None``: nothing)."""
        checked = check_tags(tags)
        if usage is None:
            return SpendNote(tags=checked) if checked else None
        return SpendNote(
            usage.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, checked
        )

    def _usage_request(
        self,
        agent_id: str | AgentId,
        model: object,
        input_tokens: object,
        output_tokens: object,
        cached_input_tokens: object,
        tags: object,
    ) -> tuple[AgentId, int, float, SpendNote | None]:
        """``record_usage``: the id, the call's price in micro-units, the time and the note."""
        aid = coerce(agent_id)
        usage = self._usage(model, input_tokens, output_tokens, cached_input_tokens)
        micros = self._usage_micros(usage)
        return aid, micros, self._now(), self._note(usage, tags)

    def _call_request(
        self, agent_id: str | AgentId, model: object, input_tokens: object, max_output_tokens: object
    ) -> tuple[AgentId, int, float]:
        """``reserve_for_call``: the id, the worst case in micro-units (at least one) and the time."""
        aid = coerce(agent_id)
        usage = self._usage(model, input_tokens, max_output_tokens, 0, "max_output_tokens")
        return aid, max(1, self._usage_micros(usage)), self._now()

    def _settle_request(
        self, actual: object, usage: object, model: str | None, tags: object
    ) -> tuple[int, SpendNote | None]:
        """A commit's amount in micro-units, given an amount or a call's usage (priced here), and
        the ledger's note."""
        if usage is None:
            if actual is None:
                raise ValidationError("commit_reservation needs what was spent: an amount, or usage=")
            return to_micros(actual, "actual", maximum=MAX_MICROS), self._note(None, tags)
        if actual is not None:
            raise ValidationError(
                "pass commit_reservation an amount or usage=, not both: usage is priced by the manager"
            )
        call = Usage.of(usage, model=model)
        return self._usage_micros(call), self._note(call, tags)

    @staticmethod
    def _report_request(
        since: object,
        until: object,
        group_by: object,
        tz: object,
        agent_id: object,
        scope: object,
        model: object,
        labels: object,
        tags: object,
    ) -> ReportRequest:
        """``spend_report``: the store's query, the report's keys and its time zone."""
        zone_name = check_tz(tz)
        keys, store_keys = group_keys(group_by)
        if model is not None and not isinstance(model, str):
            raise StateTypeError(f"model must be a str, got {type(model).__name__}")
        start, end = time_of(since, zone_name, "since"), time_of(until, zone_name, "until")
        if start is not None and end is not None and end <= start:
            raise ValidationError(f"until ({until}) must come after since ({since})")
        query = SpendQuery(
            since=start,
            until=end,
            keys=store_keys,
            agent_id=None if agent_id is None else coerce(agent_id).as_str(),  # type: ignore[arg-type]
            scope=check_filter_scope(scope),
            model=model,
            labels=check_labels(labels) if labels is not None else {},
            tags=check_tags(tags),
        )
        return query, keys, zone_name

    @staticmethod
    def _report(totals: Sequence[SpendTotal], request: ReportRequest) -> list[SpendRow]:
        """The outcome of ``spend_report``: the store's totals as report rows."""
        _, keys, tz = request
        return report_rows(totals, keys, tz)

    # -- the event hook -------------------------------------------------------------------------

    def _emit(self, records: Sequence[AuditRecord]) -> None:
        """Log appended records at DEBUG on ``iron_runtime_state.audit`` (as the seed does) and
        hand each to ``on_event``. The change is already stored: a hook that raises is logged,
        never raised to the caller of the operation."""
        if audit_logger.isEnabledFor(logging.DEBUG):
            for record in records:
                event = record.event
                audit_logger.debug(
                    "audit seq=%d agent=%s type=%s timestamp=%d details=%s",
                    record.seq,
                    event.agent_id,
                    event.event_type,
                    event.timestamp,
                    event.details[:200],
                )
        hook = self._on_event
        if hook is None:
            return
        for record in records:
            try:
                hook(record)
            except Exception:
                logger.exception("on_event hook raised on audit record %d; the change stands", record.seq)

    if TYPE_CHECKING:

        def _now(self) -> float: ...  # ManagerCore's clock


#: The manager options the constructors take beside a store's own options.
METERING_OPTIONS: Final = ("prices", "default_price", "on_event")


def metering_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A constructor's ``**options`` split into the manager's (:data:`METERING_OPTIONS`) and the store's."""
    mine: dict[str, Any] = {name: options.pop(name) for name in METERING_OPTIONS if name in options}
    return mine, options


def usage_of(
    held: str | None, model: str | None, input_tokens: int, output_tokens: int, cached_input_tokens: int
) -> dict[str, Any]:
    """A hold's ``commit_usage`` as usage: ``model`` or, by default, the one the hold was made for."""
    chosen = model if model is not None else held
    if chosen is None:
        raise ValidationError(
            "commit_usage needs model=...: this hold was made by reserve_budget, which names no model "
            "(reserve_for_call does)"
        )
    return {
        "model": chosen,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached_input_tokens,
    }


def merged(first: Mapping[str, str] | None, second: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """Tags of a hold with those given at its commit (the commit's win)."""
    if not first:
        return second
    if not second:
        return first
    return {**first, **second}
