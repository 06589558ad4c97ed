"""What the client hooks share, with no client imported: the input estimate, the pricing model
of a reply, and settling or releasing a call's hold (sync and async)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from ..errors import BudgetExceeded, ReservationError, StateError, StateTypeError, ValidationError
from ..ids import AgentId, coerce
from ..ledger import check_tags
from ..pricing import PriceBook, Usage, check_tokens

if TYPE_CHECKING:
    from ..aio import AsyncStateManager
    from ..holds import AsyncBudgetHold, BudgetHold
    from ..manager import StateManager

__all__ = [
    "ATTACHMENT_TOKENS",
    "CHARS_PER_TOKEN",
    "DEFAULT_CALL_TTL",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "MESSAGE_OVERHEAD",
    "REPLY_OVERHEAD",
    "CallOptions",
    "estimate_input_tokens",
    "estimate_text_tokens",
]

logger: Final = logging.getLogger("iron_runtime_state.integrations")

#: The reply length held for when neither the request nor the hook names one.
DEFAULT_MAX_OUTPUT_TOKENS: Final = 4096
#: How long a call's hold lasts (seconds): long enough for a slow streamed reply.
DEFAULT_CALL_TTL: Final = 600.0
#: The input estimate, without a tokenizer: a token per 4 characters of text (rounded up), plus
#: 4 tokens per message (its role and separators), plus 3 that prime the reply, plus a flat
#: 1,000 tokens per image, audio or file part. English averages about 4 characters a token.
CHARS_PER_TOKEN: Final = 4
MESSAGE_OVERHEAD: Final = 4
REPLY_OVERHEAD: Final = 3
ATTACHMENT_TOKENS: Final = 1_000
_ATTACHMENT_TYPES: Final = frozenset({"image_url", "input_audio", "file", "image", "audio", "video"})


def _chars(value: object) -> tuple[int, int]:
    """Characters of text in ``value`` (strings, nested in mappings and lists), and the number of
    attachments (image, audio and file parts, whose payload is not text)."""
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, Mapping):
        kind = value.get("type")
        if isinstance(kind, str) and kind in _ATTACHMENT_TYPES:
            return 0, 1
        chars = attachments = 0
        for item in value.values():
            c, a = _chars(item)
            chars, attachments = chars + c, attachments + a
        return chars, attachments
    if isinstance(value, (list, tuple)):
        chars = attachments = 0
        for item in value:
            c, a = _chars(item)
            chars, attachments = chars + c, attachments + a
        return chars, attachments
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return len(repr(value)), 0
    return 0, 0


def estimate_text_tokens(value: object) -> int:
    """Tokens of the text in ``value`` (a token per 4 characters, rounded up), plus
    :data:`ATTACHMENT_TOKENS` per image, audio or file part."""
    chars, attachments = _chars(value)
    return math.ceil(chars / CHARS_PER_TOKEN) + attachments * ATTACHMENT_TOKENS


def estimate_input_tokens(messages: Iterable[object], *extras: object) -> int:
    """A conservative estimate of a prompt's tokens, without a tokenizer.

    Each message (a mapping in OpenAI's shape) counts its text at a token per 4 characters,
    rounded up, plus 4 tokens; the prompt adds 3 that prime the reply. ``extras`` (the tools,
    functions or response format the request sends along) count their text the same way.
    """
    total = REPLY_OVERHEAD
    for message in messages:
        total += MESSAGE_OVERHEAD + estimate_text_tokens(message)
    for extra in extras:
        total += estimate_text_tokens(extra)
    return total


class CallOptions:
    """What a hook holds for each call: the agent, the default reply length, the hold's time to
    live and the tags every call's spend carries (checked once, here)."""

    __slots__ = ("agent_id", "max_output_tokens", "tags", "ttl")

    def __init__(
        self, agent_id: str | AgentId, max_output_tokens: int, ttl: float, tags: Mapping[str, str] | None
    ) -> None:
        self.agent_id = coerce(agent_id)
        self.max_output_tokens = check_tokens(max_output_tokens, "max_output_tokens")
        if self.max_output_tokens == 0:
            raise ValidationError("max_output_tokens must be at least 1 (the reply length to hold for)")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise StateTypeError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
        if not 0 < ttl < math.inf:
            raise ValidationError(f"ttl must be a positive, finite number of seconds, got {ttl!r}")
        self.ttl = float(ttl)
        tags_checked = check_tags(tags)
        self.tags: Mapping[str, str] | None = tags_checked or None


def max_output(requested: object, default: int, choices: object = None) -> int:
    """The reply length to hold for: the request's limit (an int), else the default; times the
    number of choices asked for (``n``), each of which is a reply."""
    limit = requested if isinstance(requested, int) and not isinstance(requested, bool) else default
    n = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1 else 1
    return check_tokens(limit * n, "max_output_tokens")


def pricing_model(prices: PriceBook, reported: object, requested: str) -> str:
    """The model to price a reply at: the one the reply names (a dated snapshot such as
    ``gpt-4o-2024-08-06``) when the user's table lists it, or the request's when the table
    lists that; else the reply's when it has any price; else the request's (priced at reserve)."""
    if not isinstance(reported, str) or reported == requested:
        return requested
    try:
        if prices.price(reported) is not None:
            return reported
        if prices.price(requested) is not None:
            return requested
        prices.cost_micros(reported, 0, 0)
    except StateError:  # a name the book refuses or cannot price
        return requested
    return reported


def _lost(agent_id: AgentId, usage: Usage, error: StateError) -> None:
    logger.warning(
        "agent %s: the %s call's spend could not be recorded (%s); the reply is returned anyway",
        agent_id,
        usage.model,
        error,
    )


def settle(manager: StateManager, hold: BudgetHold, usage: Usage, tags: Mapping[str, str] | None) -> None:
    """Commit a call's usage on its hold; a hold that expired meanwhile is replaced by a plain
    usage record (refused only by a limit, which is logged: the call happened)."""
    try:
        hold.commit_usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            model=usage.model,
        )
    except ReservationError:
        try:
            manager.record_usage(
                hold.reservation.agent_id,
                model=usage.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                tags=tags,
            )
        except BudgetExceeded as exc:
            _lost(hold.reservation.agent_id, usage, exc)


async def asettle(
    manager: AsyncStateManager, hold: AsyncBudgetHold, usage: Usage, tags: Mapping[str, str] | None
) -> None:
    """:func:`settle` for an async manager, finished even if the caller is cancelled meanwhile."""

    async def run() -> None:
        try:
            await hold.commit_usage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                model=usage.model,
            )
        except ReservationError:
            try:
                await manager.record_usage(
                    hold.reservation.agent_id,
                    model=usage.model,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cached_input_tokens=usage.cached_input_tokens,
                    tags=tags,
                )
            except BudgetExceeded as exc:
                _lost(hold.reservation.agent_id, usage, exc)

    await asyncio.shield(run())


def release(hold: BudgetHold) -> None:
    """Free a call's hold after the call failed; a failure to free it (it expires) is logged,
    so the call's own error is the one the caller sees."""
    if hold.settled:
        return
    try:
        hold.release()
    except StateError as exc:
        logger.warning("the hold %s was not released (it expires): %s", hold.reservation.reservation_id, exc)


async def arelease(hold: AsyncBudgetHold) -> None:
    """:func:`release` for an async hold, finished even if the caller is cancelled meanwhile."""
    if hold.settled:
        return
    try:
        await asyncio.shield(hold.release())
    except StateError as exc:
        logger.warning("the hold %s was not released (it expires): %s", hold.reservation.reservation_id, exc)
