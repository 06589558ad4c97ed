"""What only the native asyncio Redis backend has: automatic pipelining, its connections, faults.

Behaviour it shares with every store runs in the contract suite (its "async" dimension) and in
tests/test_async.py. Here: real redis-server processes (tests/redis_servers.py) on loopback
ports, and real faults: SIGKILL, SIGSTOP, a server restarted on its port, a TCP proxy that loses
a reply after the server ran the command, a slot migrating between two cluster masters.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from iron_runtime_state import (
    AgentId,
    AgentNotFound,
    AgentNotRunning,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    ConfigurationError,
    SchemaError,
    StateManager,
)
from iron_runtime_state.backends import SCHEMES
from iron_runtime_state.backends.async_base import open_async_backend
from iron_runtime_state.backends.redis import RedisLayout, open_redis_async
from iron_runtime_state.backends.redis.aio import AsyncRedisBackend

from .redis_servers import (
    HOST,
    RedisCluster,
    RedisServer,
    ReplyDropper,
    namespace,
    redis_available,
    short_tmpdir,
)

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def running(limit: float | None = None) -> AgentState:
    return AgentState(AgentId.generate(), AgentStatus.RUNNING, budget_limit=limit)


def connections(servers: list[RedisServer], name: str) -> int:
    """How many connections named ``name`` the servers have open (``CLIENT LIST``)."""
    return sum(1 for s in servers for client in s.client().client_list() if client.get("name") == name)


def wait_for_no_connections(servers: list[RedisServer], name: str) -> int:
    """The count of ``name``'s connections once it is 0 (a server notices a hang-up a moment later)."""
    deadline = time.monotonic() + 5
    while (count := connections(servers, name)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


# -- construction (no server needed) -----------------------------------------------------------------


def test_every_redis_url_gets_the_native_backend() -> None:
    async def main() -> None:
        for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/x.sock",
                    "redis+cluster://127.0.0.1:1,127.0.0.1:2"):  # fmt: skip
            assert SCHEMES[url.partition(":")[0]].async_factory == "open_redis_async"
            manager = AsyncStateManager.from_url(f"{url}?namespace=x")
            assert isinstance(manager.backend, AsyncRedisBackend)
            assert manager.backend.suspends
            await manager.close()
        manager = AsyncStateManager.with_redis("redis://alice:hunter2@127.0.0.1:1/0", namespace="y")
        assert isinstance(manager.backend, AsyncRedisBackend)
        assert manager.url == "redis://alice:***@127.0.0.1:1/0?namespace=y"
        assert "hunter2" not in repr(manager.backend)
        await manager.close()
        with pytest.raises(ConfigurationError, match="max_threads"):
            open_async_backend("redis://127.0.0.1:1/0", max_threads=2)
        with pytest.raises(ConfigurationError, match="unknown Redis option"):
            open_redis_async("redis://127.0.0.1:1/0", colour="red")

    asyncio.run(main())  # nothing connects until the first call


# -- automatic pipelining -----------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["redis", "redis-cluster"])
def test_concurrent_calls_share_one_connection_per_server(
    request: pytest.FixtureRequest, topology: str, ns: str
) -> None:
    target = request.getfixturevalue("redis_server" if topology == "redis" else "redis_cluster")
    servers = [target] if topology == "redis" else target.nodes
    name = f"iron-{ns}"

    async def main() -> None:
        async with AsyncStateManager.from_url(f"{target.url}?namespace={ns}", client_name=name) as manager:
            agents = [running() for _ in range(200)]
            await manager.save_agent_states(agents)
            await asyncio.gather(
                *(manager.record_spend(a.agent_id, 1.0) for a in agents),
                *(manager.get_agent_state(a.agent_id) for a in agents),
            )
            # 400 calls at once went out on one connection per server, not 400 connections.
            assert 1 <= connections(servers, name) <= len(servers)
            assert (await manager.stats()).budget_spent == 200.0
        assert wait_for_no_connections(servers, name) == 0  # close() closed them

    asyncio.run(main())


def test_pipelined_calls_keep_their_own_outcomes(redis_server: RedisServer, ns: str) -> None:
    """Calls written together in one pipeline fail or succeed each on its own."""
    url = f"{redis_server.url}?namespace={ns}"
    raw = redis_server.client()

    async def main() -> None:
        async with AsyncStateManager.from_url(url) as manager:
            ok, capped, stopped = running(), running(limit=1.0), running()
            stopped.status = AgentStatus.STOPPED
            await manager.save_agent_states([ok, capped, stopped])
            garbled = AgentId.generate()  # its key holds a string where a hash belongs
            raw.set(RedisLayout(ns).agent_key(garbled), "not a hash")
            await manager.record_spend(ok.agent_id, 1.0)  # record_spend's script is cached again
            raw.script_flush()  # ... and then forgotten: NOSCRIPT for every script below
            await manager.record_spend(ok.agent_id, 1.0)  # cached once more (EVAL)
            raw.config_resetstat()
            results = await asyncio.gather(
                manager.record_spend(ok.agent_id, 1.0),  # cached: runs
                manager.record_pii_detection(ok.agent_id, 2),  # NOSCRIPT: only it is sent again
                manager.record_spend(AgentId.generate(), 1.0),
                manager.record_spend(stopped.agent_id, 1.0),
                manager.record_spend(capped.agent_id, 5.0),
                manager.get_agent_state(garbled),
                manager.get_agent_state(ok.agent_id),
                return_exceptions=True,
            )
            spent, pii, missing, not_running, refused, wrong_type, got = results
            assert isinstance(spent, AgentState)
            assert spent.budget_spent == 3.0
            assert isinstance(pii, AgentState)
            assert pii.pii_detections == 2
            assert isinstance(missing, AgentNotFound)
            assert isinstance(not_running, AgentNotRunning)
            assert isinstance(refused, BudgetExceeded)
            assert isinstance(wrong_type, BackendError)
            assert "WRONGTYPE" in str(wrong_type)
            assert isinstance(got, AgentState)
            stats = raw.info("commandstats")
            assert stats["cmdstat_evalsha"]["failed_calls"] >= 1  # a NOSCRIPT reply
            state = await manager.get_agent_state(ok.agent_id)
            assert state is not None
            assert (state.budget_spent, state.pii_detections) == (3.0, 2)  # each applied once
            # A batched write whose scripts were flushed: loaded, and the missed commands resent.
            raw.script_flush()
            more = [running() for _ in range(50)]
            await manager.save_agent_states(more)
            assert (await manager.stats()).total == 3 + 50
            assert len(await manager.audit_log(event_type="budget_exceeded")) == 1
            assert (await manager.verify_audit_log()).ok

    asyncio.run(main())


def test_a_call_cancelled_before_it_is_written_is_never_sent(redis_server: RedisServer, ns: str) -> None:
    async def main() -> None:
        async with AsyncStateManager.from_url(f"{redis_server.url}?namespace={ns}") as manager:
            agent = running()
            await manager.save_agent_state(agent)
            removal = asyncio.create_task(manager.remove_agent_state(agent.agent_id))
            await asyncio.sleep(0)  # the removal is queued for this turn's write, not written yet
            removal.cancel()
            with pytest.raises(asyncio.CancelledError):
                await removal
            assert await manager.get_agent_state(agent.agent_id) == agent  # never sent
            assert redis_server.client().exists(RedisLayout(ns).agent_key(agent.agent_id)) == 1
            assert await manager.remove_agent_state(agent.agent_id) is True  # still usable

    asyncio.run(main())


# -- faults -------------------------------------------------------------------------------------------


def test_server_down_raises_within_the_bound_then_the_same_manager_recovers(
    server: RedisServer, ns: str
) -> None:
    async def main() -> None:
        manager = AsyncStateManager.with_redis(server.url, namespace=ns)
        agent = running(limit=5.0)
        await manager.save_agent_state(agent)
        server.kill()
        for call in (manager.stats, lambda: manager.record_spend(agent.agent_id, 1.0)):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable) as info:
                await call()
            assert time.monotonic() - started <= 5.0
            assert isinstance(info.value, ConnectionError)
            assert info.value.__cause__ is not None
        server.start()  # same port, empty (persistence is off)
        # The first call is one that must not run twice: it goes out on a new connection (the
        # dead one was noticed when the server hung up), so its outcome is known.
        with pytest.raises(AgentNotFound):
            await manager.record_spend(agent.agent_id, 1.0)
        await manager.save_agent_state(agent)
        assert (await manager.record_spend(agent.agent_id, 1.0)).budget_spent == 1.0
        await manager.close()

    asyncio.run(main())


def test_timeout_bounds_a_hung_server(server: RedisServer, ns: str) -> None:
    async def main() -> None:
        manager = AsyncStateManager.with_redis(server.url, namespace=ns, timeout=1.0)
        agent = running()
        await manager.save_agent_state(agent)
        await manager.record_spend(agent.agent_id, 1.0)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            # Written on the open connection, then no reply to it or its resends: it may have run.
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="may or may not have been applied"):
                await manager.record_spend(agent.agent_id, 1.0)
            assert time.monotonic() - started <= 1.5
            # That connection was given up; a new one never gets through its handshake.
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="cannot reach"):
                await manager.stats()
            assert time.monotonic() - started <= 1.5
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await manager.get_agent_state(agent.agent_id) is not None
        await manager.close()

    asyncio.run(main())


def test_a_lost_reply_is_never_applied_twice(redis_server: RedisServer, ns: str) -> None:
    proxy = ReplyDropper(redis_server.port)
    direct = StateManager.with_redis(redis_server.url, namespace=ns)

    async def main() -> None:
        through = AsyncStateManager.with_redis(f"redis://{HOST}:{proxy.port}/0", namespace=ns)
        agent = running(limit=100.0)
        direct.save_agent_state(agent)
        # Connection made, scripts cached: the reply to drop is the one of the real run.
        await through.release_reservation(await through.reserve_budget(agent.agent_id, 1.0))
        await through.save_audit_log(AuditEvent(agent.agent_id, "note", 1, "first"))
        await through.record_spend(agent.agent_id, 1.0)

        # Three calls in one write; their replies are lost and the connection with them. All are
        # sent again: the spend ran once (its op key answers the resend with the first reply).
        proxy.drop = 1
        spend, state, stats = await asyncio.gather(
            through.record_spend(agent.agent_id, 7.0),
            through.get_agent_state(agent.agent_id),
            through.stats(),
            return_exceptions=True,
        )
        assert isinstance(spend, AgentState), spend
        assert spend.budget_spent == 8.0
        assert isinstance(state, AgentState)
        assert state.budget_spent in (1.0, 8.0)  # read before or after the spend ran
        assert direct.get_agent_state(agent.agent_id) == spend  # applied by the server once
        assert not isinstance(stats, BaseException)
        assert stats.total == 1

        assert await through.get_agent_state(agent.agent_id) is not None  # a new connection
        proxy.drop = 1  # an append of events given directly is not resent
        with pytest.raises(BackendUnavailable, match="may or may not have been applied"):
            await through.save_audit_log(AuditEvent(agent.agent_id, "note", 1, "once"))
        assert direct.audit_count() == 4  # two notes and two spend records
        assert direct.verify_audit_log().ok
        assert await through.get_agent_state(agent.agent_id) is not None
        proxy.drop = 1
        hold = await through.reserve_budget(agent.agent_id, 5.0)  # resent: held once
        assert direct.budget_available(agent.agent_id) == 100.0 - 8.0 - 5.0
        await through.release_reservation(hold)
        # And the manager carries on over a fresh connection.
        assert (await through.record_spend(agent.agent_id, 1.0)).budget_spent == 9.0
        await through.close()

    try:
        asyncio.run(main())
    finally:
        direct.close()
        proxy.close()


def test_wrong_credentials_fail_at_once(redis_server: RedisServer, ns: str) -> None:
    client = redis_server.client()
    user = f"u{uuid.uuid4().hex[:8]}"
    client.acl_setuser(user, enabled=True, passwords=["+right"], keys=["*"], commands=["+@all"])

    async def main() -> None:
        good = AsyncStateManager.from_url(f"redis://{user}:right@{HOST}:{redis_server.port}/0?namespace={ns}")
        await good.save_agent_state(running())
        assert len(await good.list_agents()) == 1
        await good.close()
        bad = AsyncStateManager.from_url(f"redis://{user}:wrong@{HOST}:{redis_server.port}/0?namespace={ns}")
        started = time.monotonic()
        with pytest.raises(BackendError, match="credentials") as info:
            await bad.list_agents()
        assert not isinstance(info.value, BackendUnavailable)
        assert time.monotonic() - started < 1.0  # not retried: it cannot get better
        await bad.close()

    try:
        asyncio.run(main())
    finally:
        client.acl_deluser(user)


def test_layout_mismatch_and_closing(redis_server: RedisServer, ns: str) -> None:
    redis_server.client().hset(f"{ns}:meta", mapping={"layout": "99", "groups": "256"})

    async def main() -> None:
        async with AsyncStateManager.with_redis(redis_server.url, namespace=ns) as manager:
            with pytest.raises(SchemaError):
                await manager.list_agents()
        manager = AsyncStateManager.with_redis(redis_server.url, namespace=namespace())
        await manager.stats()
        await manager.close()
        await manager.close()  # twice is harmless
        with pytest.raises(BackendError, match="closed"):
            await manager.stats()

    asyncio.run(main())


def test_one_manager_over_two_event_loops_in_turn(redis_server: RedisServer, ns: str) -> None:
    """A manager made outside any loop and used by one ``asyncio.run`` after another."""
    manager = AsyncStateManager.with_redis(redis_server.url, namespace=ns)
    agent = running()

    async def first() -> None:
        await manager.save_agent_state(agent)

    async def second() -> None:
        assert await manager.get_agent_state(agent.agent_id) == agent
        await manager.close()

    asyncio.run(first())
    asyncio.run(second())


# -- other transports ---------------------------------------------------------------------------------


def test_unix_socket_and_tls(redis_server: RedisServer, tls_server: RedisServer, ns: str) -> None:
    assert redis_server.unix_path is not None
    assert tls_server.tls is not None
    sync = StateManager.with_redis(redis_server.url, namespace=ns)
    agent = running(limit=3.0)
    sync.save_agent_state(agent)

    async def main() -> None:
        async with AsyncStateManager.from_url(f"unix://{redis_server.unix_path}?namespace={ns}") as manager:
            assert (await manager.record_spend(agent.agent_id, 1.0)).budget_spent == 1.0
        tls = f"rediss://{HOST}:{tls_server.port}/0?namespace={ns}&ssl_ca_certs={tls_server.tls.ca}"
        async with AsyncStateManager.from_url(tls) as manager:
            await manager.save_agent_state(agent)
            assert (await manager.record_spend(agent.agent_id, 1.5)).budget_spent == 1.5
        unverified = f"rediss://{HOST}:{tls_server.port}/0?namespace={ns}"
        async with AsyncStateManager.from_url(unverified, timeout=1) as manager:
            with pytest.raises(BackendUnavailable):  # the server's certificate is refused
                await manager.list_agents()

    asyncio.run(main())
    assert sync.get_agent_state(agent.agent_id) is not None
    sync.close()


# -- Cluster --------------------------------------------------------------------------------------------


def test_wrong_kind_of_url_is_explained(
    redis_server: RedisServer, redis_cluster: RedisCluster, ns: str
) -> None:
    async def main() -> None:
        async with AsyncStateManager.from_url(
            f"redis+cluster://{HOST}:{redis_server.port}?namespace={ns}"
        ) as standalone:
            with pytest.raises(ConfigurationError, match="not a Redis Cluster node"):
                await standalone.stats()
        async with AsyncStateManager.from_url(
            f"redis://{HOST}:{redis_cluster.nodes[0].port}/0?namespace={ns}"
        ) as node:
            with pytest.raises(ConfigurationError, match="redis\\+cluster://"):
                await node.stats()

    asyncio.run(main())


def test_cluster_follows_moved_after_a_stale_slot_table(redis_cluster: RedisCluster, ns: str) -> None:
    async def main() -> None:
        backend = open_redis_async(f"redis+cluster://{HOST}:{redis_cluster.nodes[0].port}", namespace=ns)
        async with AsyncStateManager(backend) as manager:
            agents = [running() for _ in range(20)]
            await manager.save_agent_states(agents)
            wrong = backend._pipe((HOST, redis_cluster.nodes[1].port))
            backend._table = [wrong] * 16384  # every slot on one master: most commands get MOVED
            assert await manager.get_agent_state(agents[0].agent_id) == agents[0]
            backend._table = [wrong] * 16384
            assert await manager.get_agent_states([a.agent_id for a in agents]) == agents
            backend._table = [wrong] * 16384
            assert len(await asyncio.gather(*(manager.record_spend(a.agent_id, 1.0) for a in agents))) == 20
            assert (await manager.stats()).budget_spent == 20.0

    asyncio.run(main())


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisCluster]:
    """A cluster of this module's own, for faults and slot migrations the others must not see."""
    folder = short_tmpdir("iron-acluster-")
    cluster = RedisCluster(folder)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _node_id(node: RedisServer) -> str:
    return str(node.client().execute_command("CLUSTER", "MYID").decode())


def _master_of(cluster: RedisCluster, slot: int) -> RedisServer:
    for first, last, master, *_ in cluster.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
        if first <= slot <= last:
            return next(n for n in cluster.nodes if n.port == int(master[1]))
    raise AssertionError(f"no master serves slot {slot}")


def test_cluster_follows_ask_while_a_slot_migrates(own_cluster: RedisCluster, ns: str) -> None:
    layout = RedisLayout(ns)
    agent = running()
    slot = layout.slot_of(agent.agent_id)
    source = _master_of(own_cluster, slot)
    target = next(n for n in own_cluster.nodes if n is not source)
    before = running()
    while layout.slot_of(before.agent_id) != slot:  # an agent saved before the migration starts
        before = running()

    async def main() -> None:
        async with AsyncStateManager.from_url(f"{own_cluster.url}?namespace={ns}") as manager:
            await manager.save_agent_state(before)
            target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
            source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
            try:
                # Keys the source lacks are asked of the target (ASK, then ASKING there).
                assert await manager.get_agent_state(agent.agent_id) is None
                assert await manager.get_agent_state(before.agent_id) == before  # still on the source
                got = await asyncio.gather(*(manager.get_agent_state(a.agent_id) for a in (agent, before)))
                assert got == [None, before]
                asked = target.client().info("commandstats").get("cmdstat_asking", {}).get("calls", 0)
                assert asked >= 2
            finally:
                for node in (source, target):
                    node.client().execute_command("CLUSTER", "SETSLOT", slot, "STABLE")

    asyncio.run(main())


def test_cluster_master_down_then_back(own_cluster: RedisCluster, ns: str) -> None:
    async def main() -> None:
        backend = open_redis_async(f"{own_cluster.url}?namespace={ns}", timeout=2.0)
        async with AsyncStateManager(backend) as manager:
            states = [running() for _ in range(60)]
            await manager.save_agent_states(states)
            victim = own_cluster.nodes[1]
            layout = backend.layout
            on_victim = [s for s in states if _master_of(own_cluster, layout.slot_of(s.agent_id)) is victim]
            elsewhere = [s for s in states if s not in on_victim]
            assert on_victim
            assert elsewhere
            victim.kill()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await manager.get_agent_state(on_victim[0].agent_id)
            assert time.monotonic() - started <= 2.5
            assert await manager.get_agent_state(elsewhere[0].agent_id) == elsewhere[0]
            victim.start()  # same port and node id (nodes.conf): it takes its slots back, empty
            own_cluster.wait_ok()
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert await manager.get_agent_state(on_victim[0].agent_id) is None  # died with it
                    break
                except BackendUnavailable:
                    if time.monotonic() > deadline:
                        raise
            await manager.save_agent_state(on_victim[0])
            assert await manager.get_agent_state(on_victim[0].agent_id) == on_victim[0]

    asyncio.run(main())
