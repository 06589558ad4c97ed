"""Metered OpenAI clients: each chat-completions call an agent makes holds its worst case first,
then is charged what it really used.

::

    from openai import OpenAI
    from iron_runtime_state.integrations.openai import metered

    client = metered(OpenAI(), manager, agent_id, max_output_tokens=1024)
    reply = client.chat.completions.create(model="gpt-4o", messages=[...])

Each ``client.chat.completions.create(...)`` call:

1. estimates the prompt's tokens without a tokenizer (a token per 4 characters, rounded up,
   plus 4 per message and 3 for the reply: :func:`~._calls.estimate_input_tokens`; pass
   ``estimate=`` for a tokenizer of your own) and takes the reply's limit from the request's
   ``max_completion_tokens`` or ``max_tokens``, else the wrapper's ``max_output_tokens``,
   times ``n``;
2. holds that worst case (:meth:`StateManager.reserve_for_call`): a refusal raises
   :class:`~iron_runtime_state.BudgetExceeded` and the request is never sent;
3. sends the request; on any error, cancellation (``asyncio.CancelledError``) or
   ``KeyboardInterrupt`` the hold is released and the error raised;
4. commits the usage the reply reports (``usage``, cached prompt tokens from
   ``prompt_tokens_details.cached_tokens``), priced at the reply's model (a dated snapshot such
   as ``gpt-4o-2024-08-06``) unless the price table lists only the request's.

A streamed call (``stream=True``) asks for the usage chunk (``stream_options.include_usage``),
passes every chunk through, and settles when the stream ends. A stream that fails, or is closed
before its usage chunk arrived, releases its hold: read a stream to its end to have it charged.
A server that reports no usage is charged the estimate (the prompt's, and the reply's text at a
token per 4 characters), with a warning. Only ``chat.completions.create`` is metered; the raw
client is ``.client``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, overload

from ..errors import MissingDependency, StateError, StateTypeError, ValidationError
from ..ids import AgentId
from ..pricing import PriceBook, Usage, check_model
from ._calls import (
    DEFAULT_CALL_TTL,
    DEFAULT_MAX_OUTPUT_TOKENS,
    CallOptions,
    arelease,
    asettle,
    estimate_input_tokens,
    max_output,
    pricing_model,
    release,
    settle,
)

try:
    from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise MissingDependency(
        "iron_runtime_state.integrations.openai needs the openai package: "
        "pip install 'iron-runtime-state[openai]'"
    ) from exc

if TYPE_CHECKING:
    from ..aio import AsyncStateManager
    from ..holds import AsyncBudgetHold, BudgetHold
    from ..manager import StateManager

__all__ = [
    "AsyncMeteredCompletions",
    "AsyncMeteredOpenAI",
    "AsyncMeteredStream",
    "MeteredCompletions",
    "MeteredOpenAI",
    "MeteredStream",
    "estimate_request_tokens",
    "metered",
]

logger: Final = logging.getLogger("iron_runtime_state.integrations")

#: Estimates a request's prompt tokens from its arguments (``model``, ``messages``, ``tools``...).
Estimator = Callable[[Mapping[str, Any]], int]


def estimate_request_tokens(request: Mapping[str, Any]) -> int:
    """The default estimate of a chat-completions request's prompt: its messages, plus the tools,
    functions and response format it sends along."""
    extras = [request.get(key) for key in ("tools", "functions", "response_format")]
    return estimate_input_tokens(
        request.get("messages") or (), *(e for e in extras if isinstance(e, Mapping | list))
    )


class _Call:
    """One call's metering, with no I/O: what was held for, and what the reply reported."""

    __slots__ = ("input_tokens", "max_output_tokens", "model", "output_chars", "reported", "reported_model")

    def __init__(self, request: dict[str, Any], options: CallOptions, estimate: Estimator) -> None:
        self.model = check_model(request.get("model"), "the request's model")
        messages = request.get("messages")
        if messages is None or isinstance(messages, (str, bytes, Mapping)):
            raise StateTypeError("messages must be a list of messages, as the OpenAI API takes")
        request["messages"] = list(messages)  # an iterator would be used up by the estimate
        estimated = estimate(request)
        if isinstance(estimated, bool) or not isinstance(estimated, int) or estimated < 0:
            raise ValidationError(f"estimate= must return a token count (an int >= 0), got {estimated!r}")
        self.input_tokens = estimated
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        self.max_output_tokens = max_output(limit, options.max_output_tokens, request.get("n"))
        self.reported: object = None
        self.reported_model: object = None
        self.output_chars = 0
        if request.get("stream") is True:
            stream_options = request.get("stream_options")
            request["stream_options"] = {
                **(stream_options if isinstance(stream_options, Mapping) else {}),
                "include_usage": True,
            }

    def observe(self, reply: ChatCompletion | ChatCompletionChunk) -> None:
        """Take what a reply, or a chunk of one, says about the usage and the model."""
        if reply.usage is not None:
            self.reported = reply.usage
        if reply.model:
            self.reported_model = reply.model
        if isinstance(reply, ChatCompletion):
            self.output_chars += sum(len(choice.message.content or "") for choice in reply.choices)
        else:
            self.output_chars += sum(len(choice.delta.content or "") for choice in reply.choices)

    @property
    def has_usage(self) -> bool:
        return self.reported is not None

    def usage(self, prices: PriceBook) -> Usage:
        """What to charge: the reported usage at the pricing model, or else the estimate."""
        model = pricing_model(prices, self.reported_model, self.model)
        if self.reported is not None:
            try:
                return Usage.of(self.reported, model=model)
            except StateError as exc:
                logger.warning("the %s reply's usage is unusable (%s); charging the estimate", model, exc)
        else:
            logger.warning("the %s reply reported no usage; charging the estimate", model)
        output = -(-self.output_chars // 4)
        return Usage(model, self.input_tokens, output)


def _request(stream: bool | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if stream is not None:
        kwargs["stream"] = stream
    return kwargs


class MeteredStream:
    """A streamed reply whose chunks pass through; the call is settled when the stream ends."""

    def __init__(
        self, stream: Stream[ChatCompletionChunk], manager: StateManager, hold: BudgetHold, call: _Call
    ) -> None:
        self.stream = stream
        self._manager, self._hold, self._call = manager, hold, call
        self._chunks = self._iterate()

    def _iterate(self) -> Generator[ChatCompletionChunk, None, None]:
        ended = False
        try:
            for chunk in self.stream:
                self._call.observe(chunk)
                yield chunk
            ended = True
        finally:
            self._finish(ended)

    def _finish(self, ended: bool) -> None:
        if ended or self._call.has_usage:
            settle(self._manager, self._hold, self._call.usage(self._manager.prices), self._hold.tags)
        else:
            release(self._hold)

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        """Stop reading: the stream's connection is closed and, unless its usage came, the hold
        released."""
        try:
            self._chunks.close()
            self.stream.close()
        finally:
            if not self._hold.settled:
                self._finish(False)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncMeteredStream:
    """:class:`MeteredStream` for the async client."""

    def __init__(
        self,
        stream: AsyncStream[ChatCompletionChunk],
        manager: AsyncStateManager,
        hold: AsyncBudgetHold,
        call: _Call,
    ) -> None:
        self.stream = stream
        self._manager, self._hold, self._call = manager, hold, call
        self._chunks = self._iterate()

    async def _iterate(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        ended = False
        try:
            async for chunk in self.stream:
                self._call.observe(chunk)
                yield chunk
            ended = True
        finally:
            await self._finish(ended)

    async def _finish(self, ended: bool) -> None:
        if ended or self._call.has_usage:
            await asettle(self._manager, self._hold, self._call.usage(self._manager.prices), self._hold.tags)
        else:
            await arelease(self._hold)

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        """Stop reading: the stream's connection is closed and, unless its usage came, the hold
        released."""
        try:
            await self._chunks.aclose()
            await self.stream.close()
        finally:
            if not self._hold.settled:
                await self._finish(False)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class MeteredCompletions:
    """``chat.completions`` of a :class:`MeteredOpenAI`: :meth:`create` is metered."""

    def __init__(self, client: OpenAI, manager: StateManager, options: CallOptions, estimate: Estimator):
        self._client, self._manager, self._options, self._estimate = client, manager, options, estimate

    @overload
    def create(self, *, stream: Literal[True], **kwargs: Any) -> MeteredStream: ...
    @overload
    def create(self, *, stream: Literal[False] | None = None, **kwargs: Any) -> ChatCompletion: ...
    def create(self, *, stream: bool | None = None, **kwargs: Any) -> ChatCompletion | MeteredStream:
        """``client.chat.completions.create(...)`` (the same arguments), metered for the agent."""
        request = _request(stream, kwargs)
        call = _Call(request, self._options, self._estimate)
        options = self._options
        hold = self._manager.reserve_for_call(
            options.agent_id,
            model=call.model,
            input_tokens=call.input_tokens,
            max_output_tokens=call.max_output_tokens,
            ttl=options.ttl,
            tags=options.tags,
        )
        try:
            reply: ChatCompletion | Stream[ChatCompletionChunk] = self._client.chat.completions.create(
                **request
            )
        except BaseException:
            release(hold)
            raise
        if isinstance(reply, Stream):
            return MeteredStream(reply, self._manager, hold, call)
        call.observe(reply)
        settle(self._manager, hold, call.usage(self._manager.prices), options.tags)
        return reply


class AsyncMeteredCompletions:
    """``chat.completions`` of an :class:`AsyncMeteredOpenAI`: :meth:`create` is metered."""

    def __init__(
        self, client: AsyncOpenAI, manager: AsyncStateManager, options: CallOptions, estimate: Estimator
    ):
        self._client, self._manager, self._options, self._estimate = client, manager, options, estimate

    @overload
    async def create(self, *, stream: Literal[True], **kwargs: Any) -> AsyncMeteredStream: ...
    @overload
    async def create(self, *, stream: Literal[False] | None = None, **kwargs: Any) -> ChatCompletion: ...
    async def create(
        self, *, stream: bool | None = None, **kwargs: Any
    ) -> ChatCompletion | AsyncMeteredStream:
        """``await client.chat.completions.create(...)`` (the same arguments), metered for the agent."""
        request = _request(stream, kwargs)
        call = _Call(request, self._options, self._estimate)
        options = self._options
        hold = await self._manager.reserve_for_call(
            options.agent_id,
            model=call.model,
            input_tokens=call.input_tokens,
            max_output_tokens=call.max_output_tokens,
            ttl=options.ttl,
            tags=options.tags,
        )
        try:
            reply: (
                ChatCompletion | AsyncStream[ChatCompletionChunk]
            ) = await self._client.chat.completions.create(**request)
        except BaseException:
            await arelease(hold)
            raise
        if isinstance(reply, AsyncStream):
            return AsyncMeteredStream(reply, self._manager, hold, call)
        call.observe(reply)
        await asettle(self._manager, hold, call.usage(self._manager.prices), options.tags)
        return reply


class _Chat:
    __slots__ = ("completions",)

    def __init__(self, completions: Any) -> None:
        self.completions = completions


class MeteredOpenAI:
    """An ``openai.OpenAI`` client whose ``chat.completions.create`` is metered for one agent."""

    def __init__(self, client: OpenAI, manager: StateManager, options: CallOptions, estimate: Estimator):
        self.client = client
        self.manager = manager
        self.agent_id = options.agent_id
        self.completions = MeteredCompletions(client, manager, options, estimate)
        self.chat = _Chat(self.completions)


class AsyncMeteredOpenAI:
    """An ``openai.AsyncOpenAI`` client whose ``chat.completions.create`` is metered for one agent."""

    def __init__(
        self, client: AsyncOpenAI, manager: AsyncStateManager, options: CallOptions, estimate: Estimator
    ):
        self.client = client
        self.manager = manager
        self.agent_id = options.agent_id
        self.completions = AsyncMeteredCompletions(client, manager, options, estimate)
        self.chat = _Chat(self.completions)


@overload
def metered(
    client: OpenAI,
    manager: StateManager,
    agent_id: str | AgentId,
    *,
    max_output_tokens: int = ...,
    ttl: float = ...,
    tags: Mapping[str, str] | None = ...,
    estimate: Estimator | None = ...,
) -> MeteredOpenAI: ...
@overload
def metered(
    client: AsyncOpenAI,
    manager: AsyncStateManager,
    agent_id: str | AgentId,
    *,
    max_output_tokens: int = ...,
    ttl: float = ...,
    tags: Mapping[str, str] | None = ...,
    estimate: Estimator | None = ...,
) -> AsyncMeteredOpenAI: ...
def metered(
    client: OpenAI | AsyncOpenAI,
    manager: StateManager | AsyncStateManager,
    agent_id: str | AgentId,
    *,
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    ttl: float = DEFAULT_CALL_TTL,
    tags: Mapping[str, str] | None = None,
    estimate: Estimator | None = None,
) -> MeteredOpenAI | AsyncMeteredOpenAI:
    """``client`` metered for ``agent_id`` on ``manager`` (an ``OpenAI`` client with a
    :class:`StateManager`, an ``AsyncOpenAI`` one with an :class:`AsyncStateManager`).

    ``max_output_tokens``: the reply length held for when a request names none; ``ttl``: how
    long a call's hold lasts (a call still running then is recorded without it); ``tags``:
    carried by every call's ledger record; ``estimate``: a function of the request's arguments
    giving its prompt's tokens (default :func:`estimate_request_tokens`).
    """
    from ..aio import AsyncStateManager
    from ..manager import StateManager

    options = CallOptions(agent_id, max_output_tokens, ttl, tags)
    if estimate is not None and not callable(estimate):
        raise StateTypeError(f"estimate must be a function of the request, got {type(estimate).__name__}")
    chosen = estimate or estimate_request_tokens
    if isinstance(client, AsyncOpenAI):
        if not isinstance(manager, AsyncStateManager):
            raise StateTypeError("an AsyncOpenAI client is metered by an AsyncStateManager (await its calls)")
        return AsyncMeteredOpenAI(client, manager, options, chosen)
    if isinstance(client, OpenAI):
        if not isinstance(manager, StateManager):
            raise StateTypeError(
                "an OpenAI client is metered by a StateManager; use AsyncOpenAI with AsyncStateManager"
            )
        return MeteredOpenAI(client, manager, options, chosen)
    raise StateTypeError(
        f"client must be an openai.OpenAI or openai.AsyncOpenAI, got {type(client).__name__}"
    )
