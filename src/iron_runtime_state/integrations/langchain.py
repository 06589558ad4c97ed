"""LangChain callback handlers that meter every chat-model (or LLM) call an agent makes.

::

    from iron_runtime_state.integrations.langchain import MeteringCallbackHandler

    handler = MeteringCallbackHandler(manager, agent_id)
    reply = chat_model.invoke("Hello", config={"callbacks": [handler]})

The handler works with any ``langchain-core`` chat model. When a call starts it estimates the
prompt's tokens (a token per 4 characters, rounded up, plus 4 per message and 3 for the
reply; no tokenizer), takes the reply's limit from the model's ``max_tokens`` (or
``max_completion_tokens``, ``max_output_tokens``, ``num_predict``) times ``n``, else the
handler's ``max_output_tokens``, and holds that worst case
(:meth:`StateManager.reserve_for_call`). A refusal raises
:class:`~iron_runtime_state.BudgetExceeded` out of ``invoke`` before the model is called (the
handler sets ``raise_error``). When the call ends the handler commits the usage the reply
reports (the message's ``usage_metadata``, else the ``token_usage`` of ``llm_output``), priced
at the model the model names (``model``/``model_name``) or else the handler's ``model=``; when
it fails or is cancelled, the hold is released. Holds are kept by run id, under a lock: one
handler serves concurrent calls.

Use :class:`MeteringCallbackHandler` with a :class:`StateManager` (it serves ``invoke`` and
``ainvoke``), and :class:`AsyncMeteringCallbackHandler` with an :class:`AsyncStateManager`
(``ainvoke``, ``astream`` and friends only: LangChain runs an async handler's errors raised
in a sync call as warnings, so a refusal would not stop a sync call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

from ..errors import MissingDependency, StateError, StateTypeError, ValidationError
from ..ids import AgentId
from ..pricing import PriceBook, Usage, check_model
from ._calls import (
    CHARS_PER_TOKEN,
    DEFAULT_CALL_TTL,
    DEFAULT_MAX_OUTPUT_TOKENS,
    CallOptions,
    arelease,
    asettle,
    estimate_input_tokens,
    estimate_text_tokens,
    max_output,
    pricing_model,
    release,
    settle,
)

try:
    from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
    from langchain_core.messages import AIMessage, BaseMessage, convert_to_openai_messages
    from langchain_core.outputs import ChatGeneration, LLMResult
except ImportError as exc:  # pragma: no cover - the extra is installed wherever the tests run
    raise MissingDependency(
        "iron_runtime_state.integrations.langchain needs langchain-core: "
        "pip install 'iron-runtime-state[langchain]'"
    ) from exc

if TYPE_CHECKING:
    from ..aio import AsyncStateManager
    from ..holds import AsyncBudgetHold, BudgetHold
    from ..manager import StateManager

__all__ = ["AsyncMeteringCallbackHandler", "MeteringCallbackHandler"]

logger: Final = logging.getLogger("iron_runtime_state.integrations")

#: Where chat models keep the reply's limit, among their parameters.
_LIMIT_KEYS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict", "maxTokens")
_MODEL_KEYS: Final = ("model", "model_name", "model_id", "deployment_name")
#: Estimates a call's prompt tokens from its messages in OpenAI's shape (prompts as user messages).
Estimator = Callable[[Sequence[Mapping[str, Any]]], int]


def _first_str(sources: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if isinstance(value, str) and value:
                return value
    return None


def _first_int(sources: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> int | None:
    for source in sources:
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


class _Run:
    """One call's metering, with no I/O: what was held for."""

    __slots__ = ("input_tokens", "max_output_tokens", "model")

    def __init__(self, model: str, input_tokens: int, max_output_tokens: int) -> None:
        self.model, self.input_tokens, self.max_output_tokens = model, input_tokens, max_output_tokens


class _Meter:
    """The handlers' shared rules: planning a call at its start, reading its usage at its end."""

    def __init__(
        self,
        agent_id: str | AgentId,
        model: str | None,
        max_output_tokens: int,
        ttl: float,
        tags: Mapping[str, str] | None,
        estimate: Estimator | None,
    ) -> None:
        self.options = CallOptions(agent_id, max_output_tokens, ttl, tags)
        self.model = None if model is None else check_model(model, "model")
        if estimate is not None and not callable(estimate):
            raise StateTypeError(
                f"estimate must be a function of the messages, got {type(estimate).__name__}"
            )
        self.estimate: Estimator = estimate or estimate_input_tokens
        self.lock = threading.Lock()
        self.runs: dict[UUID, tuple[Any, _Run, Callable[[], object] | None]] = {}

    def plan(self, prompts: Sequence[Mapping[str, Any]], metadata: object, kwargs: Mapping[str, Any]) -> _Run:
        """What to hold for a call starting with ``prompts`` (messages in OpenAI's shape)."""
        params = kwargs.get("invocation_params")
        sources = [m for m in (metadata, params) if isinstance(m, Mapping)]
        model = _first_str(sources, ("ls_model_name", *_MODEL_KEYS)) or self.model
        if model is None:
            raise ValidationError(
                "the chat model names no model to price its calls at: pass model='...' to the "
                "metering handler (and give it a price if the catalogue does not know it)"
            )
        estimated = self.estimate(prompts)
        if isinstance(estimated, bool) or not isinstance(estimated, int) or estimated < 0:
            raise ValidationError(f"estimate= must return a token count (an int >= 0), got {estimated!r}")
        tools = params.get("tools") if isinstance(params, Mapping) else None
        if tools:
            estimated += estimate_text_tokens(tools)
        limit = _first_int(sources, ("ls_max_tokens", *_LIMIT_KEYS))
        n = params.get("n") if isinstance(params, Mapping) else None
        return _Run(
            check_model(model, "the chat model's name"),
            estimated,
            max_output(limit, self.options.max_output_tokens, n),
        )

    def keep(self, run_id: UUID, hold: Any, run: _Run, forget: Callable[[], object] | None = None) -> None:
        with self.lock:
            self.runs[run_id] = (hold, run, forget)

    def take(self, run_id: UUID) -> tuple[Any, _Run] | None:
        with self.lock:
            found = self.runs.pop(run_id, None)
        if found is None:
            return None
        hold, run, forget = found
        if forget is not None:
            forget()
        return hold, run

    @staticmethod
    def reported_model(result: LLMResult) -> str | None:
        sources: list[Mapping[str, Any]] = [result.llm_output or {}]
        for candidates in result.generations:
            for generation in candidates[:1]:
                if isinstance(generation, ChatGeneration):
                    sources.append(generation.message.response_metadata)
        return _first_str(sources, ("model_name", "model"))

    def usage(self, prices: PriceBook, run: _Run, result: LLMResult) -> Usage:
        """What to charge: the usage the reply reports, at the pricing model, else the estimate."""
        model = pricing_model(prices, self.reported_model(result), run.model)
        try:
            reported = self._reported(result, model)
        except StateError as exc:
            logger.warning("the %s reply's usage is unusable (%s); charging the estimate", model, exc)
            reported = None
        if reported is not None:
            return reported
        logger.warning("the %s reply reported no usage; charging the estimate", model)
        chars = sum(len(g.text) for candidates in result.generations for g in candidates[:1])
        return Usage(model, run.input_tokens, -(-chars // CHARS_PER_TOKEN))

    @staticmethod
    def _reported(result: LLMResult, model: str) -> Usage | None:
        # One usage per prompt, from its first candidate's message: chat models that return
        # several candidates (n > 1) put the whole call's usage on each of them.
        found = []
        for candidates in result.generations:
            for generation in candidates[:1]:
                message = generation.message if isinstance(generation, ChatGeneration) else None
                if isinstance(message, AIMessage) and message.usage_metadata:
                    found.append(Usage.of(message.usage_metadata, model=model))
        if found:
            return Usage(
                model,
                sum(u.input_tokens for u in found),
                sum(u.output_tokens for u in found),
                sum(u.cached_input_tokens for u in found),
            )
        output = result.llm_output or {}
        for key in ("token_usage", "usage"):
            value = output.get(key)
            if isinstance(value, Mapping) and value:
                return Usage.of(value, model=model)
        return None


def _chat_prompts(messages: list[list[BaseMessage]]) -> list[Mapping[str, Any]]:
    return [m for batch in messages for m in convert_to_openai_messages(batch)]


def _text_prompts(prompts: list[str]) -> list[Mapping[str, Any]]:
    return [{"role": "user", "content": prompt} for prompt in prompts]


class MeteringCallbackHandler(BaseCallbackHandler):
    """Meters every chat-model or LLM call it sees for ``agent_id`` on a :class:`StateManager`.

    ``model``: the model to price calls at when the chat model names none; ``max_output_tokens``:
    the reply length held for when the model sets no limit; ``ttl``: how long a call's hold
    lasts; ``tags``: carried by every call's ledger record; ``estimate``: a function of the
    prompt's messages (OpenAI's shape) giving its tokens.
    """

    raise_error = True  # a refused hold must stop the call, not be logged and ignored

    def __init__(
        self,
        manager: StateManager,
        agent_id: str | AgentId,
        *,
        model: str | None = None,
        max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        ttl: float = DEFAULT_CALL_TTL,
        tags: Mapping[str, str] | None = None,
        estimate: Estimator | None = None,
    ) -> None:
        from ..manager import StateManager

        if not isinstance(manager, StateManager):
            raise StateTypeError(
                f"manager must be a StateManager, got {type(manager).__name__}; "
                "use AsyncMeteringCallbackHandler with an AsyncStateManager"
            )
        self.manager = manager
        self._meter = _Meter(agent_id, model, max_output_tokens, ttl, tags, estimate)

    @property
    def open_calls(self) -> int:
        """Calls started and not yet ended (each holds budget)."""
        return len(self._meter.runs)

    def _start(self, prompts: list[Mapping[str, Any]], run_id: UUID, metadata: object, kwargs: Any) -> None:
        run = self._meter.plan(prompts, metadata, kwargs)
        options = self._meter.options
        hold = self.manager.reserve_for_call(
            options.agent_id,
            model=run.model,
            input_tokens=run.input_tokens,
            max_output_tokens=run.max_output_tokens,
            ttl=options.ttl,
            tags=options.tags,
        )
        self._meter.keep(run_id, hold, run)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Hold the call's worst case; :class:`BudgetExceeded` stops the call."""
        self._start(_chat_prompts(messages), run_id, metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A text LLM's call: hold its worst case, as for a chat model."""
        self._start(_text_prompts(prompts), run_id, metadata, kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Commit the usage the reply reports."""
        taken = self._meter.take(run_id)
        if taken is not None:
            hold: BudgetHold = taken[0]
            usage = self._meter.usage(self.manager.prices, taken[1], response)
            settle(self.manager, hold, usage, self._meter.options.tags)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the hold of a call that failed or was cancelled."""
        taken = self._meter.take(run_id)
        if taken is not None:
            release(taken[0])


class AsyncMeteringCallbackHandler(AsyncCallbackHandler):
    """:class:`MeteringCallbackHandler` for an :class:`AsyncStateManager` and async calls."""

    raise_error = True  # a refused hold must stop the call, not be logged and ignored
    run_inline = True  # in the calling task, whose end releases a hold LangChain did not report

    def __init__(
        self,
        manager: AsyncStateManager,
        agent_id: str | AgentId,
        *,
        model: str | None = None,
        max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
        ttl: float = DEFAULT_CALL_TTL,
        tags: Mapping[str, str] | None = None,
        estimate: Estimator | None = None,
    ) -> None:
        from ..aio import AsyncStateManager

        if not isinstance(manager, AsyncStateManager):
            raise StateTypeError(
                f"manager must be an AsyncStateManager, got {type(manager).__name__}; "
                "use MeteringCallbackHandler with a StateManager"
            )
        self.manager = manager
        self._meter = _Meter(agent_id, model, max_output_tokens, ttl, tags, estimate)
        self._releasing: set[asyncio.Future[None]] = set()

    @property
    def open_calls(self) -> int:
        """Calls started and not yet ended (each holds budget)."""
        return len(self._meter.runs)

    async def _start(
        self, prompts: list[Mapping[str, Any]], run_id: UUID, metadata: object, kwargs: Any
    ) -> None:
        run = self._meter.plan(prompts, metadata, kwargs)
        options = self._meter.options
        hold = await self.manager.reserve_for_call(
            options.agent_id,
            model=run.model,
            input_tokens=run.input_tokens,
            max_output_tokens=run.max_output_tokens,
            ttl=options.ttl,
            tags=options.tags,
        )
        # LangChain reports no end and no error for an ainvoke whose task is cancelled (it
        # awaits a gather, which raises CancelledError past its callbacks): the hold is
        # released when the calling task finishes with the run still open.
        task = asyncio.current_task()
        if task is None:
            self._meter.keep(run_id, hold, run)
            return

        def finished(_: asyncio.Task[Any]) -> None:
            taken = self._meter.take(run_id)
            if taken is not None:
                releasing = asyncio.ensure_future(arelease(taken[0]))
                self._releasing.add(releasing)
                releasing.add_done_callback(self._releasing.discard)

        task.add_done_callback(finished)
        self._meter.keep(run_id, hold, run, lambda: task.remove_done_callback(finished))

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Hold the call's worst case; :class:`BudgetExceeded` stops the call."""
        await self._start(_chat_prompts(messages), run_id, metadata, kwargs)

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """A text LLM's call: hold its worst case, as for a chat model."""
        await self._start(_text_prompts(prompts), run_id, metadata, kwargs)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Commit the usage the reply reports."""
        taken = self._meter.take(run_id)
        if taken is not None:
            hold: AsyncBudgetHold = taken[0]
            usage = self._meter.usage(self.manager.prices, taken[1], response)
            await asettle(self.manager, hold, usage, self._meter.options.tags)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the hold of a call that failed or was cancelled."""
        taken = self._meter.take(run_id)
        if taken is not None:
            await arelease(taken[0])
