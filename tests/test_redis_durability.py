"""What an acknowledged Redis write survives: ``durability=``, failover, and the eviction check.

Real servers only (tests/redis_servers.py): a standalone master with a replica that the tests
freeze with SIGSTOP, a 3-master + 3-replica Redis Cluster whose master is killed with SIGKILL
while its replica is cut off, and servers set to evicting ``maxmemory-policy`` values. Every
test runs both drivers where both apply: the sync one, and the asyncio one behind the contract
suite's synchronous facade (its pipelined batches end with one ``WAIT``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BackendError,
    BudgetExceeded,
    ConfigurationError,
    Reservation,
    StateManager,
)
from iron_runtime_state.backends.redis import RedisLayout, parse_redis_url

from .contract.facade import LoopThread
from .redis_servers import (
    HOST,
    RedisCluster,
    RedisServer,
    ReplicatedServer,
    ReplyDropper,
    namespace,
    redis_available,
    short_tmpdir,
    wait_replica_synced,
)

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

APIS = ("sync", "async")


@contextlib.contextmanager
def manager_for(api: str, url: str, **options: Any) -> Iterator[Any]:
    """A StateManager, or an AsyncStateManager behind the synchronous facade, for ``url``."""
    if api == "sync":
        with StateManager.from_url(url, **options) as manager:
            yield manager
        return
    loop = LoopThread()
    try:
        manager = loop.facade(AsyncStateManager.from_url(url, **options))
        try:
            yield manager
        finally:
            manager.close()
    finally:
        loop.close()


def calls(server: RedisServer, command: str) -> int:
    """How many times ``server`` ran ``command`` (``INFO commandstats``)."""
    stats = server.client().info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def server_version(server: RedisServer) -> tuple[int, ...]:
    return tuple(int(part) for part in str(server.client().info("server")["redis_version"]).split(".")[:2])


# -- options ------------------------------------------------------------------------------------


def test_durability_options() -> None:
    assert (parse_redis_url("redis://h").durability, parse_redis_url("redis://h").replicas) == ("async", 0)
    config = parse_redis_url("redis://h?durability=replicated")
    assert (config.durability, config.replicas) == ("replicated", 1)
    config = parse_redis_url("redis://h?durability=replicated&replicas=2")
    assert (config.durability, config.replicas) == ("replicated", 2)
    config = parse_redis_url("redis://h", durability="aof")
    assert (config.durability, config.replicas) == ("aof", 0)
    assert parse_redis_url("redis://h", durability="aof", replicas=1).replicas == 1
    assert parse_redis_url("redis://h?allow_eviction=yes").allow_eviction is True
    manager = StateManager.with_redis("redis://127.0.0.1:1/0", namespace="x", durability="replicated")
    assert manager.url == "redis://127.0.0.1:1/0?namespace=x"  # the same store, whatever it waits for
    manager.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"durability": "sync"}, "durability must be one of 'async', 'replicated', 'aof'"),
        ({"replicas": 1}, "replicas applies to durability='replicated' or 'aof'"),
        ({"durability": "replicated", "replicas": 0}, "needs replicas >= 1"),
        ({"durability": "replicated", "replicas": -1}, "out of range"),
        ({"allow_eviction": "perhaps"}, "must be true or false"),
    ],
)
def test_bad_durability_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        StateManager.with_redis("redis://127.0.0.1:1/0", **options)


# -- a master and a replica -------------------------------------------------------------------


@pytest.fixture
def replicated() -> Iterator[ReplicatedServer]:
    """A master and its replica, of this test's own (the test freezes the replica)."""
    folder = short_tmpdir("iron-replicated-")
    pair = ReplicatedServer(folder)
    try:
        yield pair.start()
    finally:
        pair.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("api", APIS)
def test_replicated_writes_wait_for_the_replica(replicated: ReplicatedServer, api: str) -> None:
    ns = namespace()
    url = f"{replicated.url}?namespace={ns}&durability=replicated&socket_timeout=0.4"
    master = replicated.master
    with manager_for(api, url) as manager:
        agent = AgentId.generate()
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=100.0))
        manager.record_spend(agent, 1.0)
        manager.save_audit_log(AuditEvent(agent, "tool_call", details="kept"))
        manager.commit_reservation(manager.reserve_budget(agent, 2.0), 1.5)
        # The replica holds every acknowledged write, at once.
        key = RedisLayout(ns).agent_key(agent)
        assert replicated.replica.command("HGET", key, "spent_micros") == b"2500000"

        replicated.replica.pause()
        try:
            waits = calls(master, "wait")
            started = time.monotonic()
            writes: list[Callable[[], object]] = [
                lambda: manager.record_spend(agent, 1.0),
                lambda: manager.save_audit_log(AuditEvent(agent, "tool_call", details="unconfirmed")),
                lambda: manager.save_agent_states([AgentState(AgentId.generate(), AgentStatus.RUNNING)]),
            ]
            for write in writes:
                with pytest.raises(BackendError) as info:
                    write()
                message = str(info.value)
                assert "applied the command" in message, message
                assert "on the master" in message, message
                assert "not confirmed on replicas" in message, message
            assert time.monotonic() - started < 5
            assert calls(master, "wait") == waits + 3
            # Reads do not wait: they answer at once, and the master holds the unconfirmed spend.
            assert manager.get_agent_state(agent).budget_spent == 3.5
            assert manager.stats().total >= 1
            assert calls(master, "wait") == waits + 3
        finally:
            replicated.replica.resume()
        wait_replica_synced(replicated.replica)
        # The unconfirmed spend's ledger record waited in its group's outbox (the call ended at
        # its first write): an audit read of a writer appends it, confirmed like any write.
        details = [r.event.details for r in manager.audit_log()]
        assert details[-2:] == ["unconfirmed", '{"amount":1.0}']
        manager.record_spend(agent, 1.0)


def test_pipelined_writes_share_one_wait(replicated: ReplicatedServer) -> None:
    """The asyncio driver ends each pipelined batch with one WAIT, on the batch's connection."""
    url = f"{replicated.url}?namespace={namespace()}&durability=replicated&socket_timeout=0.4"
    master = replicated.master
    agents = [AgentId.generate() for _ in range(100)]

    async def scenario() -> tuple[int, list[BaseException | Reservation]]:
        async with AsyncStateManager.from_url(url) as manager:
            await manager.save_agent_states(AgentState(a, AgentStatus.RUNNING) for a in agents)
            before = calls(master, "wait")
            # Holds: writes of one round trip each (a spend appends its ledger record too).
            await asyncio.gather(*(manager.reserve_budget(a, 1.0) for a in agents))
            waits = calls(master, "wait") - before
            replicated.replica.pause()
            try:
                frozen = await asyncio.gather(
                    *(manager.reserve_budget(a, 1.0) for a in agents), return_exceptions=True
                )
            finally:
                replicated.replica.resume()
            return waits, frozen

    waits, frozen = asyncio.run(scenario())
    assert 1 <= waits < 20  # 100 concurrent spends: a few batches, one WAIT each
    assert all(isinstance(outcome, BackendError) for outcome in frozen), frozen[:3]
    assert all("not confirmed on replicas" in str(outcome) for outcome in frozen)


def test_a_resent_write_is_confirmed_only_once_replicated(replicated: ReplicatedServer) -> None:
    """A write whose reply was lost is resent (applied once, per its op key) on a new connection.

    The WAIT after the resend must still cover the first run's write, though the resend itself
    changes nothing: with the replica frozen, the call must not be acknowledged. (WAIT covers
    the writes up to its connection's last command that moved the replication offset: Redis 7.0
    counts any command, newer versions only those that write, so the resend must write too.)
    """
    ns = namespace()
    proxy = ReplyDropper(replicated.master.port)
    url = f"redis://{HOST}:{proxy.port}/0?namespace={ns}&durability=replicated&socket_timeout=0.4"
    try:
        with StateManager.from_url(url) as manager:
            agent = AgentId.generate()
            manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=100.0))
            manager.record_spend(agent, 1.0)
            replicated.replica.pause()
            try:
                proxy.drop = 1
                with pytest.raises(BackendError, match=r"not confirmed|may or may not"):
                    manager.record_spend(agent, 1.0)
            finally:
                replicated.replica.resume()
    finally:
        proxy.close()


@pytest.mark.parametrize("api", APIS)
def test_async_durability_sends_no_wait(replicated: ReplicatedServer, api: str) -> None:
    waits = calls(replicated.master, "wait")
    with manager_for(api, f"{replicated.url}?namespace={namespace()}") as manager:
        agent = AgentId.generate()
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
        replicated.replica.pause()
        try:
            manager.record_spend(agent, 1.0)  # acknowledged by the master alone
        finally:
            replicated.replica.resume()
    assert calls(replicated.master, "wait") == waits


@pytest.mark.parametrize("api", APIS)
def test_aof_needs_waitaof(redis_server: RedisServer, api: str) -> None:
    """``durability="aof"`` on a server without WAITAOF (before Redis 7.2) is refused, clearly."""
    if server_version(redis_server) >= (7, 2):
        pytest.skip("this redis-server has WAITAOF")
    with (
        manager_for(api, f"{redis_server.url}?namespace={namespace()}&durability=aof") as manager,
        pytest.raises(ConfigurationError) as info,
    ):
        manager.list_agents()
    message = str(info.value)
    assert "WAITAOF" in message
    assert "7.2 on" in message
    assert "version 7.0" in message or "version 6." in message


@pytest.mark.parametrize("api", APIS)
def test_aof_waits_for_the_fsync(server: RedisServer, api: str) -> None:
    if server_version(server) < (7, 2):
        pytest.skip("WAITAOF needs Redis 7.2 or newer")
    url = f"{server.url}?namespace={namespace()}&durability=aof"
    with manager_for(api, url) as manager, pytest.raises(ConfigurationError, match="appendonly yes"):
        manager.list_agents()
    server.command("CONFIG", "SET", "appendonly", "yes")
    with manager_for(api, url) as manager:
        agent = AgentId.generate()
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING))
        manager.record_spend(agent, 1.0)
    assert calls(server, "waitaof") >= 2


# -- the eviction policy -------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-random", "volatile-lru", "volatile-ttl"])
def test_an_evicting_policy_is_refused(
    server: RedisServer, api: str, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    server.command("CONFIG", "SET", "maxmemory-policy", policy)
    url = f"{server.url}?namespace={namespace()}"
    with manager_for(api, url) as manager, pytest.raises(ConfigurationError) as info:
        manager.list_agents()
    message = str(info.value)
    assert policy in message
    assert "CONFIG SET maxmemory-policy noeviction" in message
    assert "allow_eviction=True" in message
    if policy.startswith("volatile"):
        assert "reservations" in message
    with (
        caplog.at_level(logging.WARNING, logger="iron_runtime_state"),
        manager_for(api, url, allow_eviction=True) as manager,
    ):
        assert manager.list_agents() == []
    assert any(policy in record.getMessage() for record in caplog.records)


def test_the_check_runs_once_per_store(server: RedisServer) -> None:
    before = calls(server, "config|get")
    with StateManager.from_url(f"{server.url}?namespace={namespace()}") as manager:
        for _ in range(5):
            manager.list_agents()
    assert calls(server, "config|get") == before + 1


def test_a_server_that_forbids_config_is_not_refused(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    server.command("ACL", "SETUSER", "app", "on", ">app-secret", "~*", "+@all", "-config")
    url = f"redis://app:app-secret@{HOST}:{server.port}/0?namespace={namespace()}"
    with caplog.at_level(logging.DEBUG, logger="iron_runtime_state"), StateManager.from_url(url) as manager:
        assert manager.list_agents() == []
    assert any("maxmemory-policy" in record.getMessage() for record in caplog.records)


def test_every_master_of_a_cluster_is_checked(redis_cluster: RedisCluster) -> None:
    ns = namespace()
    meta_master = redis_cluster.master_of_slot(RedisLayout(ns).meta_slot)
    other = next(node for node in redis_cluster.nodes if node is not meta_master)
    other.command("CONFIG", "SET", "maxmemory-policy", "volatile-lfu")
    try:
        for api in APIS:
            with (
                manager_for(api, f"{redis_cluster.url}?namespace={ns}") as manager,
                pytest.raises(ConfigurationError, match=f"{other.port}.*volatile-lfu"),
            ):
                manager.list_agents()
    finally:
        other.command("CONFIG", "SET", "maxmemory-policy", "noeviction")


# -- failover: a 3-master + 3-replica cluster ----------------------------------------------------

LIMIT = 40.0


@dataclass
class Outcome:
    """What a failover run acknowledged, refused and lost."""

    acked_spent: float = 0.0
    acked_events: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    lost_spent: float = 0.0
    lost_events: list[str] = field(default_factory=list)


@pytest.fixture
def replicated_cluster() -> Iterator[RedisCluster]:
    """A cluster of three masters with one replica each, of this test's own."""
    folder = short_tmpdir("iron-failover-")
    cluster = RedisCluster(folder, replicas=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def failover_run(cluster: RedisCluster, api: str, durability: str) -> Outcome:
    """Spend and audit, cut a master's replica off, write on, kill the master, promote the replica.

    Then spend on (on a fresh manager) until the limit refuses. Returns what was acknowledged
    in all, and what of it the promoted replica lacks.
    """
    ns = namespace()
    layout = RedisLayout(ns)
    master = cluster.master_of_slot(layout.audit_slot)
    (replica,) = cluster.replicas_of(master)
    agent = next(
        a for a in iter(AgentId.generate, None) if cluster.master_of_slot(layout.slot_of(a)) is master
    )
    url = f"{cluster.url}?namespace={ns}&durability={durability}&socket_timeout=0.4&timeout=10"
    out = Outcome()

    def spend_and_audit(manager: Any, tag: str) -> None:
        try:
            manager.record_spend(agent, 1.0)
            out.acked_spent += 1.0
        except BackendError as exc:
            out.refusals.append(str(exc))
        try:
            manager.save_audit_log(AuditEvent(agent, "tool_call", details=tag))
            out.acked_events.append(tag)
        except BackendError as exc:
            out.refusals.append(str(exc))

    with manager_for(api, url) as manager:
        manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=LIMIT))
        for i in range(10):
            spend_and_audit(manager, f"before-{i}")
        wait_replica_synced(replica)  # what came before the cut is on the replica, however it was written
        cluster.cut_replication(master)
        for i in range(5):
            spend_and_audit(manager, f"during-{i}")
        master.kill()
        cluster.take_over(replica)

    with StateManager.from_url(f"{cluster.url}?namespace={ns}&timeout=10") as reader:
        state = reader.get_agent_state(agent)
        assert state is not None
        seen = {record.event.details for record in reader.audit_log()}
    out.lost_spent = out.acked_spent - state.budget_spent
    out.lost_events = [tag for tag in out.acked_events if tag not in seen]

    if durability != "async":
        cluster.rejoin(master)  # the promoted master needs a replica to confirm writes again
    with manager_for(api, url) as manager:
        for _ in range(100):
            try:
                manager.record_spend(agent, 1.0)
            except BudgetExceeded:
                break
            out.acked_spent += 1.0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_failover_loses_no_acknowledged_write(replicated_cluster: RedisCluster, api: str) -> None:
    out = failover_run(replicated_cluster, api, "replicated")
    # While the replica was cut off, no write was acknowledged: each call failed, saying so.
    assert len(out.refusals) == 10, out.refusals
    assert all("not confirmed on replicas" in refusal for refusal in out.refusals)
    assert len(out.acked_events) == 10
    # Every acknowledged spend and audit record survived the failover ...
    assert out.lost_spent == 0.0
    assert out.lost_events == []
    # ... so spending on after it never passed the limit.
    assert out.acked_spent == LIMIT


@pytest.mark.slow
def test_async_durability_can_lose_acknowledged_writes(replicated_cluster: RedisCluster) -> None:
    """Why the setting exists: the default acknowledges what a failover then loses."""
    out = failover_run(replicated_cluster, "sync", "async")
    assert out.refusals == []
    assert out.lost_spent == 5.0
    assert out.lost_events == [f"during-{i}" for i in range(5)]
    assert out.acked_spent == LIMIT + 5.0  # acknowledged past the limit: a real overspend
