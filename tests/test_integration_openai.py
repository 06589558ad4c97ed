"""The OpenAI client hook against a real local HTTP server (tests/openai_server.py), with the real
``openai`` client: sync and async, plain and streamed, refusals, failures and cancellations."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    BudgetExceeded,
    StateManager,
    StateTypeError,
    ValidationError,
)
from iron_runtime_state.integrations import estimate_input_tokens

from .metering_support import LIMIT, PRICES, async_spends, new_async_manager, new_manager, spends

openai = pytest.importorskip("openai")
from iron_runtime_state.integrations.openai import (  # noqa: E402 - after the skip
    AsyncMeteredOpenAI,
    MeteredOpenAI,
    estimate_request_tokens,
    metered,
)

from .openai_server import OpenAIServer, openai_server  # noqa: E402

AGENT = AgentId.test_fixture(17)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def module_server() -> Iterator[OpenAIServer]:
    with openai_server() as server:
        yield server


@pytest.fixture
def server(module_server: OpenAIServer) -> Iterator[OpenAIServer]:
    module_server.reset()
    yield module_server
    module_server.unstall()


def sync_client(server: OpenAIServer, manager: StateManager, **options: Any) -> MeteredOpenAI:
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)
    return metered(client, manager, AGENT, **options)


def test_a_call_holds_then_commits_the_reported_usage(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager, tags={"run": "nightly"})
    server.script.prompt_tokens, server.script.completion_tokens, server.script.cached_tokens = 120, 30, 20
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100)
    assert reply.choices[0].message.content == server.script.reply
    # 100 * 2.50 + 20 * 1.25 + 30 * 10.00 micro-units
    cost = manager.cost("gpt-4o", input_tokens=120, output_tokens=30, cached_input_tokens=20)
    assert cost == Decimal("0.000575")
    state = manager.get_agent_state(AGENT)
    assert state is not None
    assert Decimal(str(state.budget_spent)) == cost
    assert manager.budget_available(AGENT) == pytest.approx(LIMIT - 0.000575)
    [spend] = spends(manager)
    assert spend["model"] == "gpt-4o"
    assert (spend["input_tokens"], spend["output_tokens"], spend["cached_input_tokens"]) == (120, 30, 20)
    assert spend["tags"] == {"run": "nightly"}
    assert "reservation" in spend
    assert len(server.requests) == 1
    assert server.requests[0]["max_tokens"] == 100


def test_the_reply_s_dated_model_is_priced_by_the_table_s_name(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.model = "gpt-4o-2024-08-06"  # the table lists "gpt-4o" only
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert spends(manager)[0]["model"] == "gpt-4o"
    # With a price for the snapshot itself, the reply's model is the one charged.
    dated = StateManager(prices={**PRICES, "gpt-4o-2024-08-06": {"input": 1, "output": 1}})
    dated.save_agent_state(AgentState(AGENT, AgentStatus.RUNNING, budget_limit=LIMIT))
    sync_client(server, dated).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert spends(dated)[0]["model"] == "gpt-4o-2024-08-06"
    assert spends(dated)[0]["amount"] == pytest.approx(150e-6)  # 120 + 30 tokens at 1 per million


def test_a_refused_hold_sends_no_request(server: OpenAIServer) -> None:
    manager = new_manager(AGENT, limit=0.001)
    client = sync_client(server, manager)
    with pytest.raises(BudgetExceeded):
        # 1000 output tokens at 10.00 per million: 0.01 > 0.001.
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=1000)
    assert server.requests == []
    assert spends(manager) == []
    assert manager.audit_log(event_type="budget_exceeded")


def test_a_failed_call_releases_its_hold(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.mode = "fail"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(server.requests) == 1
    assert manager.budget_available(AGENT) == LIMIT
    assert spends(manager) == []


def test_a_timed_out_call_releases_its_hold(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = metered(
        openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=0.5), manager, AGENT
    )
    server.script.mode = "stall"
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert manager.budget_available(AGENT) == LIMIT


def test_keyboard_interrupt_releases_the_hold(server: OpenAIServer) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's KeyboardInterrupt here")
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.mode = "stall"
    main = threading.main_thread().ident
    assert main is not None

    def interrupt() -> None:
        if server.started.wait(10):
            signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert manager.budget_available(AGENT) == LIMIT


def test_a_stream_passes_chunks_through_and_settles_at_its_end(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.prompt_tokens, server.script.completion_tokens = 50, 7
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = ""
    for chunk in stream:
        assert spends(manager) == []  # settled only when the stream ends
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text.split() == server.script.reply.split()
    assert server.requests[0]["stream_options"] == {"include_usage": True}
    [spend] = spends(manager)
    assert (spend["model"], spend["input_tokens"], spend["output_tokens"]) == ("gpt-4o", 50, 7)
    assert manager.budget_available(AGENT) == pytest.approx(LIMIT - (50 * 2.5 + 7 * 10) / 1e6)


def test_a_stream_closed_early_releases_its_hold(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        for _ in stream:
            break
    assert manager.budget_available(AGENT) == LIMIT
    assert spends(manager) == []
    # Closed before reading anything at all.
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True).close()
    assert manager.budget_available(AGENT) == LIMIT


def test_a_broken_stream_releases_its_hold(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.mode = "break"
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        for _ in stream:
            pass
    assert manager.budget_available(AGENT) == LIMIT
    assert spends(manager) == []


def test_a_server_without_usage_is_charged_the_estimate(
    server: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager)
    server.script.send_usage = False
    with caplog.at_level(logging.WARNING, "iron_runtime_state.integrations"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    [spend] = spends(manager)
    assert spend["input_tokens"] == estimate_input_tokens(MESSAGES)
    assert spend["output_tokens"] == -(-len(server.script.reply) // 4)
    assert "reported no usage" in caplog.text


def test_the_input_estimate() -> None:
    # "user" + "hi": 6 characters, 2 tokens; 4 per message; 3 for the reply.
    assert estimate_input_tokens([{"role": "user", "content": "hi"}]) == 9
    assert estimate_input_tokens([]) == 3
    parts = [
        {"type": "text", "text": "x" * 40},
        {"type": "image_url", "image_url": {"url": "data:" + "A" * 10**6}},
    ]
    assert (
        estimate_input_tokens([{"role": "user", "content": parts}]) == 3 + 4 + 1000 + 12
    )  # "user" "text" x*40
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 399}}]
    request = {"model": "gpt-4o", "messages": [], "tools": tools}
    assert estimate_request_tokens(request) == 3 + 102  # 408 characters


def test_the_hold_is_the_worst_case(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    client = sync_client(server, manager, max_output_tokens=200)
    server.script.mode = "stall"
    held: list[float] = []

    def watch() -> None:
        if server.started.wait(10):
            held.append(LIMIT - manager.budget_available(AGENT))
            server.unstall()

    watcher = threading.Thread(target=watch)
    watcher.start()
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=2)
    watcher.join()
    worst = manager.cost("gpt-4o", input_tokens=estimate_input_tokens(MESSAGES), output_tokens=400)
    assert held == [pytest.approx(float(worst))]
    # A custom estimate is used as given.
    server.reset()
    server.script.mode = "stall"
    custom = sync_client(server, manager, estimate=lambda request: 10_000, max_output_tokens=1)
    held.clear()
    watcher = threading.Thread(target=watch)
    watcher.start()
    spent = LIMIT - manager.budget_available(AGENT)
    custom.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    watcher.join()
    assert held == [
        pytest.approx(spent + float(manager.cost("gpt-4o", input_tokens=10_000, output_tokens=1)))
    ]


def test_bad_wrapping_is_refused(server: OpenAIServer) -> None:
    manager = new_manager(AGENT)
    sync = openai.OpenAI(base_url=server.base_url, api_key="test")
    aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="test")
    with pytest.raises(StateTypeError, match="AsyncStateManager"):
        metered(aclient, manager, AGENT)
    with pytest.raises(StateTypeError, match="StateManager"):
        metered(sync, AsyncStateManager(), AGENT)
    with pytest.raises(StateTypeError):
        metered(object(), manager, AGENT)  # type: ignore[call-overload]
    with pytest.raises(ValidationError):
        metered(sync, manager, AGENT, max_output_tokens=0)
    with pytest.raises(ValidationError):
        metered(sync, manager, AGENT, ttl=-1)
    client = metered(sync, manager, AGENT)
    with pytest.raises(StateTypeError):
        client.chat.completions.create(model=None, messages=MESSAGES)
    with pytest.raises(StateTypeError):
        client.chat.completions.create(model="gpt-4o", messages="hello")
    assert server.requests == []


# -- async ---------------------------------------------------------------------------------------


def async_client(server: OpenAIServer, manager: AsyncStateManager, **options: Any) -> AsyncMeteredOpenAI:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)
    return metered(client, manager, AGENT, **options)


def test_async_calls_commit_and_stream(server: OpenAIServer) -> None:
    async def main() -> None:
        manager = await new_async_manager(AGENT)
        client = async_client(server, manager)
        server.script.cached_tokens = 100
        reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert reply.usage is not None
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        first, second = await async_spends(manager)
        assert first["cached_input_tokens"] == second["cached_input_tokens"] == 100
        cost = manager.cost("gpt-4o", input_tokens=120, output_tokens=30, cached_input_tokens=100)
        assert await manager.budget_available(AGENT) == pytest.approx(LIMIT - 2 * float(cost))
        await manager.close()

    asyncio.run(main())


def test_async_refusal_failure_and_cancellation_release(server: OpenAIServer) -> None:
    async def main() -> None:
        manager = await new_async_manager(AGENT, limit=0.001)
        client = async_client(server, manager)
        with pytest.raises(BudgetExceeded):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
        assert server.requests == []
        server.script.mode = "fail"
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
        assert await manager.budget_available(AGENT) == 0.001
        server.script.mode = "stall"
        call = asyncio.ensure_future(
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
        )
        assert await asyncio.to_thread(server.started.wait, 10)
        assert await manager.budget_available(AGENT) < 0.001  # held while the call runs
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await manager.budget_available(AGENT) == 0.001
        assert await async_spends(manager) == []
        await manager.close()

    asyncio.run(main())


def test_async_stream_cancelled_or_closed_early_releases(server: OpenAIServer) -> None:
    async def main() -> None:
        manager = await new_async_manager(AGENT)
        client = async_client(server, manager)
        server.script.mode = "stall_stream"

        async def read() -> None:
            stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            async with stream:
                async for _ in stream:
                    pass

        task = asyncio.ensure_future(read())
        assert await asyncio.to_thread(server.started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await manager.budget_available(AGENT) == LIMIT
        server.reset()
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        async for _ in stream:
            break
        await stream.close()
        assert await manager.budget_available(AGENT) == LIMIT
        assert await async_spends(manager) == []
        await manager.close()

    asyncio.run(main())
