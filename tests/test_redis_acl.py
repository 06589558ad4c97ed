"""The tenant ACL recipe of docs/redis.md, run as written against real ACL users.

Two tenants whose namespaces extend one another (``t…`` and ``t…:eu``, the case where the old
recipe ``~tenant-a:*`` let the first read and spend in the second): each tenant's user does
everything in its own namespace and nothing, not a single read, in the other's; nor can it
reach other keys through commands that take no keys. On a standalone server and on a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    BackendError,
    BudgetExceeded,
    StateManager,
)
from iron_runtime_state.backends.redis import RedisLayout, key_slot

from .redis_servers import HOST, RedisCluster, RedisServer, execute, namespace, redis_available

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "redis.md"
PASSWORD = "tenant-secret"


def recipe(tenant: str) -> list[str]:
    """The documented ``ACL SETUSER`` line for ``tenant``, as arguments (the docs' own words)."""
    found = re.findall(r"^ACL SETUSER tenant-a .*$", DOCS.read_text(), re.MULTILINE)
    assert len(found) == 1, "docs/redis.md gives one ACL SETUSER line for the namespace tenant-a"
    words: list[str] = found[0].replace("tenant-a", tenant).replace("CHANGE-ME", PASSWORD).split()
    return words[2:]  # after ACL SETUSER


def create_user(servers: Sequence[RedisServer], tenant: str, rules: Sequence[str] | None = None) -> None:
    """The user ``tenant`` on every server, with the documented rules (or ``rules``)."""
    words = recipe(tenant) if rules is None else [tenant, *rules]
    for server in servers:
        server.command("ACL", "SETUSER", *words)


def url_of(base: str, tenant: str, ns: str) -> str:
    """``base`` with the credentials of the user ``tenant`` (a ':' in a user name is %3A)."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{quote(tenant, safe='')}:{PASSWORD}@{rest}?namespace={ns}"


def exercise(manager: StateManager) -> None:
    """Every kind of operation, in the manager's own namespace: each must work."""
    before = manager.stats().total
    agent = AgentId.generate()
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=10.0))
    manager.save_agent_states([AgentState(AgentId.generate(), AgentStatus.STOPPED) for _ in range(3)])
    assert manager.get_agent_state(agent) is not None
    assert len(manager.get_agent_states([agent, AgentId.generate()])) == 2
    manager.record_spend(agent, 2.0)
    with pytest.raises(BudgetExceeded):
        manager.record_spend(agent, 100.0)
    manager.record_pii_detection(agent, 2)
    manager.commit_reservation(manager.reserve_budget(agent, 3.0), 1.0)
    manager.release_reservation(manager.reserve_budget(agent, 1.0))
    manager.update_agent_state(agent, lambda s: s)
    manager.save_audit_log(AuditEvent(agent, "tool_call", details="own"))
    assert manager.audit_log(agent_id=agent)
    assert manager.audit_log(event_type="tool_call")
    assert manager.verify_audit_log().ok
    head = manager.audit_checkpoint().seq
    assert manager.backend.wait_audit(head - 1, 0.2) is True  # XREAD (BLOCK) on its own trail
    assert manager.backend.wait_audit(head, 0.1) is False
    assert next(iter(manager.watch(after_seq=head - 1, idle_timeout=0.5))).seq == head
    assert manager.stats().total == before + 4
    assert len(manager.list_agents()) == before + 4
    assert len(list(manager.iter_agent_states(status=AgentStatus.STOPPED))) == 3
    manager.set_status(agent, AgentStatus.STOPPED)
    assert len(manager.purge_agents(status=[AgentStatus.STOPPED], older_than=0)) == 4
    manager.prune_audit_log(before=0)
    other = AgentId.generate()
    manager.save_agent_state(AgentState(other, AgentStatus.RUNNING))
    assert manager.remove_agent_state(other)


def reach_into(manager: StateManager, agent: AgentId) -> list[str]:
    """Try to read and change another namespace's ``agent`` and trail; what succeeded."""
    attempts: dict[str, Any] = {
        "get": lambda: manager.get_agent_state(agent),
        "get_many": lambda: manager.get_agent_states([agent]),
        "spend": lambda: manager.record_spend(agent, 1.0),
        "reserve": lambda: manager.reserve_budget(agent, 1.0),
        "status": lambda: manager.set_status(agent, AgentStatus.FAILED),
        "save": lambda: manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING)),
        "remove": lambda: manager.remove_agent_state(agent),
        "stats": lambda: manager.stats(),
        "list": lambda: manager.list_agents(),
        "audit_log": lambda: manager.audit_log(),
        "wait": lambda: manager.backend.wait_audit(0, 0.1),
        "watch": lambda: next(iter(manager.watch(after_seq=0, idle_timeout=0.1)), None),
        "audit": lambda: manager.save_audit_log(AuditEvent(agent, "tool_call", details="intruder")),
        "purge": lambda: manager.purge_agents(status=[AgentStatus.STOPPED], older_than=0),
    }
    succeeded, refusals = [], []
    for name, attempt in attempts.items():
        try:
            attempt()
        except BackendError as exc:
            refusals.append(str(exc))
        else:
            succeeded.append(name)
    assert all("permission" in refusal or "may not" in refusal for refusal in refusals), refusals
    return succeeded


def raw_reach(port: int, user: str, other_ns: str, key_of_other: str) -> list[str]:
    """Raw commands as ``user``, on the server at ``port``, against another namespace's keys or
    every key; which succeeded."""
    client = redis.Redis(host=HOST, port=port, username=user, password=PASSWORD, socket_timeout=10)
    attempts: list[tuple[Any, ...]] = [
        ("HGETALL", key_of_other),
        ("DEL", key_of_other),
        ("EVAL", "return redis.call('HGETALL', KEYS[1])", 1, key_of_other),
        ("EVAL", f"return redis.call('HGETALL', '{key_of_other}')", 0),
        ("SCAN", 0),
        ("KEYS", "*"),
        ("RANDOMKEY",),
        ("DBSIZE",),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("SORT", f"{other_ns}:list", "BY", "nosort", "GET", "*"),
    ]
    succeeded = []
    with client:
        for command in attempts:
            try:
                execute(client, *command)
            except redis.ResponseError:
                continue
            succeeded.append(" ".join(map(str, command[:2])))
    return succeeded


def check_isolation(servers: Sequence[RedisServer], base_url: str, server_of: Any) -> None:
    """The whole check, on ``servers`` reached at ``base_url`` (one server, or a cluster).

    ``server_of(key)`` is a raw client of the server that holds ``key``.
    """
    first = namespace()
    second = f"{first}:eu"  # extends the first one's prefix: the case the old recipe got wrong
    create_user(servers, first)
    create_user(servers, second)
    agents = {}
    for ns in (first, second):
        with StateManager.from_url(f"{base_url}?namespace={ns}") as owner:  # the default user
            agent = AgentId.generate()
            owner.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=5.0))
            owner.save_audit_log(AuditEvent(agent, "tool_call", details="owner"))
            agents[ns] = agent
    for ns in (first, second):
        with StateManager.from_url(url_of(base_url, ns, ns)) as own:
            exercise(own)
    before = {ns: snapshot(base_url, ns, agents[ns]) for ns in (first, second)}
    for mine, theirs in ((first, second), (second, first)):
        with StateManager.from_url(url_of(base_url, mine, theirs)) as intruder:
            assert reach_into(intruder, agents[theirs]) == [], (mine, theirs)
        key = RedisLayout(theirs).agent_key(agents[theirs])
        assert raw_reach(server_of(key), mine, theirs, key) == [], (mine, theirs)
    # Nothing of either tenant changed through the other.
    assert {ns: snapshot(base_url, ns, agents[ns]) for ns in (first, second)} == before


def snapshot(base_url: str, ns: str, agent: AgentId) -> tuple[object, ...]:
    """What the owner (the default user) sees of ``agent`` and of the trail of ``ns``."""
    with StateManager.from_url(f"{base_url}?namespace={ns}") as owner:
        return owner.get_agent_state(agent), owner.stats(), [r.hash for r in owner.audit_log()]


def test_the_documented_recipe_isolates_tenants(redis_server: RedisServer) -> None:
    check_isolation([redis_server], f"redis://{HOST}:{redis_server.port}/0", lambda key: redis_server.port)


def test_the_documented_recipe_isolates_tenants_in_a_cluster(redis_cluster: RedisCluster) -> None:
    base = "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in redis_cluster.nodes)
    check_isolation(redis_cluster.nodes, base, lambda key: redis_cluster.master_of_slot(key_slot(key)).port)


def test_a_bare_prefix_pattern_reaches_the_longer_namespace(redis_server: RedisServer) -> None:
    """Why the recipe has two patterns: ``~ns:*`` alone also matches the keys of ``ns:eu``."""
    first = namespace()
    second = f"{first}:eu"
    rules = ["reset", "on", f">{PASSWORD}", f"~{first}:*", "+@all", "-@dangerous"]
    create_user([redis_server], first, rules)
    base = f"redis://{HOST}:{redis_server.port}/0"
    with StateManager.from_url(f"{base}?namespace={second}") as owner:
        agent = AgentId.generate()
        owner.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=5.0))
    with StateManager.from_url(url_of(base, first, second)) as intruder:
        assert "spend" in reach_into(intruder, agent)
