"""The LangChain callback handlers, with langchain-core's fake chat models: holds on start,
usage committed on end, released on errors and cancellation, refusals stop the call."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    BudgetExceeded,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.integrations import estimate_input_tokens

pytest.importorskip("langchain_core")
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import (
    FakeMessagesListChatModel,
    GenericFakeChatModel,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from iron_runtime_state.integrations.langchain import (
    AsyncMeteringCallbackHandler,
    MeteringCallbackHandler,
)

from .metering_support import LIMIT, PRICES, new_manager, spends

AGENT = AgentId.test_fixture(18)
USAGE = {"input_tokens": 120, "output_tokens": 30, "total_tokens": 150}


def reply(text: str = "Hello!", **usage: Any) -> AIMessage:
    return AIMessage(content=text, usage_metadata={**USAGE, **usage})


class NamedFake(FakeMessagesListChatModel):
    """A fake chat model that names its model and its reply limit, as real ones do."""

    model: str = "gpt-4o"
    max_tokens: int | None = 200
    calls: int = 0

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.calls += 1
        return super()._generate(messages, *args, **kwargs)


class FailingFake(NamedFake):
    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        raise RuntimeError("the model is down")


class StallingFake(NamedFake):
    started: Any = None

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.started.set()
        await asyncio.sleep(30)
        raise AssertionError("not cancelled")


class LegacyUsageFake(NamedFake):
    """Reports usage the older way: ``llm_output["token_usage"]`` in OpenAI's names."""

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage(content="Hi"))],
            llm_output={
                "token_usage": {"prompt_tokens": 40, "completion_tokens": 4, "prompt_tokens_details": None},
                "model_name": "gpt-4o-2024-08-06",
            },
        )


class StreamingFake(GenericFakeChatModel):
    """Streams its reply word by word, then a last chunk with the usage, as providers do."""

    model: str = "gpt-4o"
    max_tokens: int | None = 200

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from super()._stream(messages, stop, run_manager, **kwargs)
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=USAGE))  # type: ignore[arg-type]

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop, None, **kwargs):
            yield chunk


def test_a_call_commits_the_usage_of_its_reply() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT, tags={"chain": "support"})
    model = NamedFake(responses=[reply(input_token_details={"cache_read": 20})])
    answer = model.invoke("Say hello.", config={"callbacks": [handler]})
    assert answer.content == "Hello!"
    [spend] = spends(manager)
    assert (spend["model"], spend["input_tokens"], spend["output_tokens"]) == ("gpt-4o", 120, 30)
    assert spend["cached_input_tokens"] == 20
    assert spend["tags"] == {"chain": "support"}
    cost = manager.cost("gpt-4o", input_tokens=120, output_tokens=30, cached_input_tokens=20)
    assert cost == Decimal("0.000575")
    assert manager.budget_available(AGENT) == pytest.approx(LIMIT - 0.000575)
    assert handler.open_calls == 0


def test_the_hold_is_the_worst_case_while_the_call_runs() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)
    seen: list[float] = []

    class Watching(NamedFake):
        def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
            seen.append(LIMIT - manager.budget_available(AGENT))
            return super()._generate(messages, *args, **kwargs)

    Watching(responses=[reply()], max_tokens=500).invoke("Say hello.", config={"callbacks": [handler]})
    prompt = [{"role": "user", "content": "Say hello."}]
    worst = manager.cost("gpt-4o", input_tokens=estimate_input_tokens(prompt), output_tokens=500)
    assert seen == [pytest.approx(float(worst))]


def test_the_handler_s_model_prices_a_model_that_names_none() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT, model="gpt-4o", max_output_tokens=100)
    GenericFakeChatModel(messages=iter([reply()])).invoke("hi", config={"callbacks": [handler]})
    assert spends(manager)[0]["model"] == "gpt-4o"
    nameless = MeteringCallbackHandler(manager, AGENT)
    fake = GenericFakeChatModel(messages=iter([reply()]))
    with pytest.raises(ValidationError, match="names no model"):
        fake.invoke("hi", config={"callbacks": [nameless]})
    assert next(fake.messages) is not None  # the model was never called


def test_a_refused_hold_stops_the_call() -> None:
    manager = new_manager(AGENT, limit=0.001)
    handler = MeteringCallbackHandler(manager, AGENT)
    model = NamedFake(responses=[reply()], max_tokens=1000)  # 1000 tokens at 10.00: 0.01
    with pytest.raises(BudgetExceeded):
        model.invoke("hi", config={"callbacks": [handler]})
    assert model.calls == 0
    assert spends(manager) == []
    assert handler.open_calls == 0


def test_a_failed_call_releases_its_hold() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)
    with pytest.raises(RuntimeError, match="down"):
        FailingFake(responses=[reply()]).invoke("hi", config={"callbacks": [handler]})
    assert manager.budget_available(AGENT) == LIMIT
    assert handler.open_calls == 0


def test_usage_in_llm_output_and_the_reply_s_model() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)
    LegacyUsageFake(responses=[reply()]).invoke("hi", config={"callbacks": [handler]})
    [spend] = spends(manager)
    # The table lists only "gpt-4o", so the reply's snapshot name is priced (and recorded) as it.
    assert (spend["model"], spend["input_tokens"], spend["output_tokens"]) == ("gpt-4o", 40, 4)


def test_a_reply_without_usage_is_charged_the_estimate() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)
    NamedFake(responses=[AIMessage(content="x" * 41)]).invoke("hi", config={"callbacks": [handler]})
    [spend] = spends(manager)
    assert spend["input_tokens"] == estimate_input_tokens([{"role": "user", "content": "hi"}])
    assert spend["output_tokens"] == 11


def test_a_stream_settles_from_its_usage_chunk() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)
    fake = StreamingFake(messages=iter([AIMessage(content="one two three")]))
    text = "".join(str(chunk.content) for chunk in fake.stream("hi", config={"callbacks": [handler]}))
    assert text == "one two three"
    [spend] = spends(manager)
    assert (spend["input_tokens"], spend["output_tokens"]) == (120, 30)


def test_one_handler_serves_concurrent_calls_and_batches() -> None:
    manager = new_manager(AGENT, limit=100.0)
    handler = MeteringCallbackHandler(manager, AGENT)
    model = NamedFake(responses=[reply()])
    threads = [
        threading.Thread(target=lambda: model.invoke("hi", config={"callbacks": [handler]}))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    model.batch(["a", "b", "c"], config={"callbacks": [handler]})
    assert len(spends(manager)) == 19
    state = manager.get_agent_state(AGENT)
    assert state is not None
    assert state.budget_spent == pytest.approx(19 * 0.00060)  # 120 * 2.50 + 30 * 10.00 each
    assert handler.open_calls == 0


def test_bad_handlers_are_refused() -> None:
    manager = new_manager(AGENT)
    with pytest.raises(StateTypeError, match="AsyncMeteringCallbackHandler"):
        MeteringCallbackHandler(AsyncStateManager(), AGENT)  # type: ignore[arg-type]
    with pytest.raises(StateTypeError, match="MeteringCallbackHandler"):
        AsyncMeteringCallbackHandler(manager, AGENT)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        MeteringCallbackHandler(manager, AGENT, max_output_tokens=0)
    with pytest.raises(ValidationError):
        MeteringCallbackHandler(manager, AGENT, model="")
    with pytest.raises(StateTypeError):
        MeteringCallbackHandler(manager, 5)  # type: ignore[arg-type]


def test_the_sync_handler_serves_async_calls() -> None:
    manager = new_manager(AGENT)
    handler = MeteringCallbackHandler(manager, AGENT)

    async def main() -> None:
        await NamedFake(responses=[reply()]).ainvoke("hi", config={"callbacks": [handler]})

    asyncio.run(main())
    assert len(spends(manager)) == 1


# -- async ---------------------------------------------------------------------------------------


def test_the_async_handler_commits_refuses_and_releases() -> None:
    async def main() -> None:
        manager = AsyncStateManager(prices=PRICES)
        await manager.save_agent_state(AgentState(AGENT, AgentStatus.RUNNING, budget_limit=0.01))
        handler = AsyncMeteringCallbackHandler(manager, AGENT)
        await NamedFake(responses=[reply()]).ainvoke("hi", config={"callbacks": [handler]})
        spent = [json.loads(r.event.details) for r in await manager.audit_log(event_type="spend")]
        assert [(s["input_tokens"], s["output_tokens"]) for s in spent] == [(120, 30)]
        available = await manager.budget_available(AGENT)
        assert available == pytest.approx(0.01 - 0.0006)

        big = NamedFake(responses=[reply()], max_tokens=10_000)
        with pytest.raises(BudgetExceeded):
            await big.ainvoke("hi", config={"callbacks": [handler]})
        assert big.calls == 0

        with pytest.raises(RuntimeError):
            await FailingFake(responses=[reply()]).ainvoke("hi", config={"callbacks": [handler]})
        assert await manager.budget_available(AGENT) == available

        stalling = StallingFake(responses=[reply()], started=asyncio.Event())
        call = asyncio.ensure_future(stalling.ainvoke("hi", config={"callbacks": [handler]}))
        await asyncio.wait_for(stalling.started.wait(), 10)
        assert await manager.budget_available(AGENT) < available  # held while the call runs
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # LangChain reports no error for a cancelled ainvoke: the handler releases the hold
        # when the calling task is done.
        for _ in range(100):
            if await manager.budget_available(AGENT) == available:
                break
            await asyncio.sleep(0.01)
        assert await manager.budget_available(AGENT) == available
        assert handler.open_calls == 0

        stream = StreamingFake(messages=iter([AIMessage(content="a b")]))
        chunks = [chunk async for chunk in stream.astream("hi", config={"callbacks": [handler]})]
        assert chunks
        assert len(await manager.audit_log(event_type="spend")) == 2
        await manager.close()

    asyncio.run(main())
