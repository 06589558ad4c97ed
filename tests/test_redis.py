"""What only the Redis store has: URLs, namespaces, the data model, Cluster, faults, processes.

Every test runs against real redis-server processes (tests/redis_servers.py) on loopback ports;
faults are real too: SIGKILL, SIGSTOP, a server restarted on its port, and a TCP proxy that
drops a reply after the server has run the command.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import cast

import pytest
import redis

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AuditEvent,
    BackendError,
    BackendUnavailable,
    BudgetExceeded,
    ConfigurationError,
    SchemaError,
    StateManager,
)
from iron_runtime_state.backends import SCHEMES
from iron_runtime_state.backends.base import OPERATIONS, Backend
from iron_runtime_state.backends.memory import MemoryBackend
from iron_runtime_state.backends.redis import (
    GROUPS,
    OPTIONS,
    Attempt,
    Call,
    GroupWalk,
    RedisBackend,
    RedisLayout,
    RetryPolicy,
    key_slot,
    load_scripts,
    open_redis,
    parse_redis_url,
)
from iron_runtime_state.backends.redis.ops import RedisOps
from iron_runtime_state.backends.redis.scripts import _prelude_blocks
from iron_runtime_state.backends.redis.spend import record_spend_call
from iron_runtime_state.money import MAX_MICROS

from .redis_servers import (
    HOST,
    REDIS_CLI,
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


# -- URLs and options (no server needed) ---------------------------------------------------------


def test_every_redis_scheme_is_registered() -> None:
    for scheme in ("redis", "rediss", "unix", "redis+cluster"):
        assert SCHEMES[scheme].module == "iron_runtime_state.backends.redis"
        assert SCHEMES[scheme].extra == "redis"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:7000/2", {"nodes": ((HOST, 7000),), "db": 2, "ssl": False}),
        ("redis://localhost", {"nodes": (("localhost", 6379),), "db": 0}),
        ("redis://alice:s%40cr%2Ft@127.0.0.1:7000/0", {"username": "alice", "password": "s@cr/t"}),
        ("redis://:only-password@127.0.0.1:7000", {"username": None, "password": "only-password"}),
        ("rediss://127.0.0.1:7000/1?ssl_cert_reqs=none", {"ssl": True, "db": 1}),
        ("unix:///tmp/redis.sock?db=3", {"unix_path": "/tmp/redis.sock", "db": 3}),
        ("unix://bob:pw@/var/run/redis.sock", {"unix_path": "/var/run/redis.sock", "password": "pw"}),
        (
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001,[::1]:7002",
            {"nodes": ((HOST, 7000), (HOST, 7001), ("::1", 7002)), "db": 0},
        ),
        ("REDIS://127.0.0.1:7000?namespace=tenant:42", {"namespace": "tenant:42", "scheme": "redis"}),
        ("redis://127.0.0.1?timeout=2&socket_timeout=0.5", {"timeout": 2.0, "socket_timeout": 0.5}),
    ],
)
def test_url_forms(url: str, expected: dict[str, object]) -> None:
    config = parse_redis_url(url)
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_default_timeouts_bound_a_call_by_five_seconds() -> None:
    config = parse_redis_url("redis://127.0.0.1")
    assert config.timeout == 5.0
    assert config.socket_timeout + config.socket_connect_timeout <= config.timeout
    short = parse_redis_url("redis://127.0.0.1", timeout=1)
    assert short.socket_timeout + short.socket_connect_timeout <= 1.0


def test_rediss_carries_tls_settings() -> None:
    config = parse_redis_url(
        "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false", ssl_certfile="/c.pem"
    )
    assert config.connection_kind == "ssl"
    kwargs = config.connection_kwargs()
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert kwargs["ssl_check_hostname"] is False
    assert kwargs["ssl_certfile"] == "/c.pem"
    cluster = parse_redis_url("redis+cluster://h:1,h:2", ssl=True, ssl_cert_reqs="required")
    assert cluster.connection_kind == "ssl"
    assert cluster.connection_kwargs(("h", 2))["port"] == 2


def test_password_is_masked() -> None:
    config = parse_redis_url("redis://alice:hunter2@127.0.0.1:7000/1")
    assert "hunter2" not in config.masked_url
    assert "hunter2" not in repr(config)
    assert config.masked_url == "redis://alice:***@127.0.0.1:7000/1?namespace=iron"
    backend = open_redis("redis://alice:hunter2@127.0.0.1:1/0", namespace="x")
    assert "hunter2" not in backend.url
    backend.close()


def test_namespace_from_url_or_keyword() -> None:
    assert parse_redis_url("redis://h?namespace=a").namespace == "a"
    assert parse_redis_url("redis://h?namespace=a", namespace="iron").namespace == "a"
    assert parse_redis_url("redis://h?namespace=a", namespace="a").namespace == "a"
    assert parse_redis_url("redis://h", namespace="b").namespace == "b"
    with pytest.raises(ConfigurationError, match="namespace given twice"):
        parse_redis_url("redis://h?namespace=a", namespace="b")


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://h:notaport", {}, "bad port"),
        ("redis://h:0", {}, "bad port"),
        ("redis://h/zero", {}, "bad database"),
        ("redis://h,g", {}, "takes one host"),
        ("redis+cluster://h:1/3", {}, "only database 0"),
        ("unix://", {}, "no socket path"),
        ("unix://host/tmp/x.sock", {}, "has a host"),
        ("redis://h?namespace={x}", {}, "namespace"),
        ("redis://h?namespace=", {}, "namespace"),
        ("redis://h", {"namespace": "a b"}, "namespace"),
        ("redis://h?colour=red", {}, "unknown Redis option 'colour'"),
        ("redis://h", {"colour": "red"}, "unknown Redis option 'colour'"),
        ("redis://h", {"timeout": 0}, "finite and > 0"),
        ("redis://h", {"timeout": "soon"}, "must be a number"),
        ("redis://h", {"timeout": 1, "socket_timeout": 2}, "must not exceed timeout"),
        ("redis://h", {"max_connections": 0}, "out of range"),
        ("redis://h", {"ssl_ca_certs": "/ca.pem"}, "need a TLS connection"),
        ("rediss://h", {"ssl": False}, "always uses TLS"),
        ("rediss://h", {"ssl_cert_reqs": "maybe"}, "ssl_cert_reqs"),
        ("http://h", {}, "not a Redis URL"),
    ],
)
def test_bad_urls_and_options(url: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_redis_url(url, **options)


def test_unknown_option_names_the_accepted_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        StateManager.with_redis("redis://127.0.0.1:1/0", namespace="x", sockettimeout=1)
    for name in OPTIONS:
        assert name in str(info.value)


def test_missing_extra_names_the_pip_command() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from iron_runtime_state import MissingDependency, StateManager\n"
        "for make in (lambda: StateManager.with_redis('redis://127.0.0.1:1/0'),\n"
        "             lambda: StateManager.from_url('redis+cluster://127.0.0.1:1')):\n"
        "    try:\n"
        "        make()\n"
        "    except MissingDependency as exc:\n"
        "        assert isinstance(exc, ImportError)\n"
        "        print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all("pip install 'iron-runtime-state[redis]'" in line for line in lines)


def test_key_layout_and_slots() -> None:
    layout = RedisLayout("iron")
    agent = AgentId.test_fixture(17)
    keys = layout.agent_keys(agent)
    g = layout.group_of(agent.as_str())
    assert g == agent.uuid.int % GROUPS == 17  # the low bits of the UUID, as every version stored them
    assert keys["agent"] == f"iron:{{iron:g{g}}}:agent:{agent}"
    assert {key_slot(k) for k in keys.values()} == {layout.slot_of(agent)}
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")
    assert len({keys.slot for keys in layout.group_keys}) > GROUPS * 0.9  # groups spread over the slots


def test_each_operation_has_the_contracts_name_and_arguments() -> None:
    """Both drivers run ``ops.<name>(*args)`` for contract operation ``name``: nothing may drift."""
    for name in OPERATIONS:
        if name == "close":  # each driver closes its own connections
            continue
        expected = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(RedisOps, name)).parameters) == expected, name


def test_scripts_carry_the_python_constants() -> None:
    scripts = load_scripts()
    assert f"local MAX_MICROS = {MAX_MICROS}" in scripts["record_spend"].source
    assert "'spent_micros', 'pii_detections'" in scripts["record_spend"].source  # AGENT_FIELDS
    assert "__" not in "".join(s.source for s in scripts.values())
    # Each script carries only the helpers it uses.
    assert "plan_rolls" not in scripts["save"].source
    assert "local function plan_rolls" in scripts["reserve"].source


def test_prelude_helpers_are_defined_before_they_are_used() -> None:
    """A Lua local is visible only after its definition: one used above it is a nil global at
    run time (scripts.load_scripts keeps the prelude's order)."""
    prelude = (resources.files("iron_runtime_state.backends.redis") / "lua" / "_prelude.lua").read_text()
    blocks = _prelude_blocks(prelude)
    defined: set[str] = set()
    names = {name for name, _ in blocks}
    for name, text in blocks:
        code = re.sub(r"--[^\n]*", "", text)  # comments name helpers freely
        used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code)) & names - {name}
        assert used <= defined, (name, used - defined)
        defined.add(name)


def _attempt(*, cluster: bool = False, idempotent: bool = False, started: float | None = None) -> Attempt:
    config = parse_redis_url("redis+cluster://h:1" if cluster else "redis://h:1")
    script = record_spend_call(RedisLayout("iron"), AgentId.test_fixture(1), 1, 0.0, "op", "")
    call = Call(script.slot, script.command(), idempotent, "record spend")
    return RetryPolicy(config).attempt(call, time.monotonic() if started is None else started)


@pytest.mark.parametrize(
    ("failure", "sent", "idempotent", "outcome"),
    [
        (redis.exceptions.TryAgainError("TRYAGAIN"), True, False, "pause"),
        (redis.exceptions.ClusterDownError("CLUSTERDOWN"), True, False, "pause"),
        (redis.exceptions.ReadOnlyError("READONLY"), True, False, "pause"),
        (redis.exceptions.BusyLoadingError("LOADING"), True, False, "pause"),  # not run
        (redis.exceptions.ConnectionError("refused"), False, False, "pause"),  # never sent
        (redis.exceptions.TimeoutError("no reply"), True, True, "pause"),  # a read: repeat it
        (redis.exceptions.ConnectionError("reset"), True, False, "may or may not have been applied"),
        (redis.exceptions.TimeoutError("no reply"), True, False, "may or may not have been applied"),
        (redis.exceptions.AuthenticationError("WRONGPASS"), False, True, "credentials"),
        (redis.exceptions.OutOfMemoryError("OOM"), True, False, "out of memory"),
        (redis.exceptions.NoPermissionError("NOPERM"), True, False, "may not record spend"),
        (redis.exceptions.ResponseError("WRONGTYPE"), True, True, "refused to record spend"),
        (redis.exceptions.ClusterCrossSlotError("CROSSSLOT"), True, True, "refused to record spend"),
        (redis.exceptions.DataError("bad"), False, True, "failed: DataError"),
    ],
)
def test_what_each_failure_means(failure: Exception, sent: bool, idempotent: bool, outcome: str) -> None:
    """The policy both drivers follow (redis/policy.py), failure by failure, without a server."""
    attempt = _attempt(cluster=True, idempotent=idempotent)
    if outcome == "pause":
        assert 0.0 < attempt.failed(failure, sent) <= 0.05
        assert attempt.failed(failure, sent) <= 0.1  # the pauses grow
        return
    with pytest.raises((BackendError, BackendUnavailable), match=outcome) as info:
        attempt.failed(failure, sent)
    assert info.value.__cause__ is failure


def test_redirects_noscript_and_giving_up() -> None:
    attempt = _attempt(cluster=True)
    assert attempt.command[0] == "EVALSHA"
    assert attempt.failed(redis.exceptions.NoScriptError("NOSCRIPT"), True) == 0.0  # resend now
    assert attempt.command[0] == "EVAL"
    assert attempt.command[2:] == _attempt().command[2:]
    with pytest.raises(BackendError, match="NOSCRIPT"):  # EVAL cannot lack its script
        attempt.failed(redis.exceptions.NoScriptError("NOSCRIPT"), True)
    ask = redis.exceptions.AskError("3999 127.0.0.1:7001")
    assert attempt.failed(ask, True) == 0.0
    assert attempt.asking == ("127.0.0.1", 7001)
    assert attempt.failed(redis.exceptions.MovedError("3999 127.0.0.1:7002"), True) > 0.0
    assert attempt.asking is None  # MOVED: back to the slot table, reloaded
    with pytest.raises(ConfigurationError, match="redis\\+cluster://"):
        _attempt().failed(redis.exceptions.MovedError("3999 127.0.0.1:7002"), True)
    # A redis:// store's script over many slots (stats), sent to a cluster node.
    crossslot = redis.exceptions.ClusterCrossSlotError("CROSSSLOT Keys don't hash to the same slot")
    with pytest.raises(ConfigurationError, match=r"node of a Redis Cluster .*redis\+cluster://"):
        _attempt(idempotent=True).failed(crossslot, True)
    late = _attempt(idempotent=True, started=time.monotonic() - 4.0)  # 5 s budget: no room left
    with pytest.raises(BackendUnavailable, match="gave up trying to record spend"):
        late.failed(redis.exceptions.ConnectionError("refused"), False)


# -- the data model, namespaces, URLs against a real server -------------------------------------


def test_operator_can_read_the_data_with_redis_cli(redis_server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    state = AgentState(AgentId.generate(), AgentStatus.RUNNING, 0.1 + 0.2, 3, 10.0)
    manager.save_agent_state(state)
    manager.record_spend(state.agent_id, 1.25)
    manager.save_audit_log(AuditEvent(state.agent_id, "tool_call", 1_700_000_000, "search"))
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    key = backend.layout.agent_key(state.agent_id)

    def cli(*args: str) -> list[str]:
        out = subprocess.run(
            [REDIS_CLI, "-h", HOST, "-p", str(redis_server.port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout.splitlines()

    fields = cli("HGETALL", key)
    data = dict(zip(fields[::2], fields[1::2], strict=True))
    assert data["status"] == "running"
    assert data["spent_micros"] == "1550000"  # 0.1 + 0.2 + 1.25, exactly, in micro-units
    assert data["pii_detections"] == "3"
    assert data["limit_micros"] == "10000000"
    assert "labels" not in data
    assert "period" not in data
    assert float(data["changed_at"]) > 1_700_000_000
    stats = cli("HGETALL", backend.layout.keys_of(state.agent_id).stats)
    assert stats[stats.index("running") + 1] == "1"
    assert stats[stats.index("spent_micros") + 1] == "1550000"
    entry = cli("XRANGE", backend.layout.audit_log, "-", "+")
    assert entry[0] == "1-0"  # the ledger's record of the spend, then the event saved
    assert entry[1:5] == ["agent_id", state.agent_id.as_str(), "event_type", "spend"]
    assert entry[7:9] == ["details", '{"amount":1.25}']
    assert entry[13] == "2-0"
    assert entry[14:22] == [
        "agent_id",
        state.agent_id.as_str(),
        "event_type",
        "tool_call",
        "timestamp",
        "1700000000",
        "details",
        "search",
    ]
    manager.close()


def test_namespaces_isolate_tenants(redis_server: RedisServer) -> None:
    first, second = namespace(), namespace()
    a = StateManager.with_redis(redis_server.url, namespace=first)
    b = StateManager.from_url(f"{redis_server.url}?namespace={second}")
    shared = AgentId.generate()
    a.save_agent_state(AgentState(shared, AgentStatus.RUNNING, 5.0, 1, 10.0))
    a.save_agent_state(running())
    a.record_spend(shared, 1.0)
    a.record_pii_detection(shared, 2)
    a.save_audit_log(AuditEvent(shared, "note", 1, "only in a"))
    a.prune_audit_log(before=0)
    assert b.get_agent_state(shared) is None
    assert b.list_agents() == []
    assert list(b.iter_agent_states()) == []
    assert b.stats().total == 0
    assert b.audit_log() == []
    assert b.audit_log(agent_id=shared) == []
    assert b.audit_count() == 0
    assert b.verify_audit_log().checked == 0
    assert b.purge_agents(older_than=0) == []
    # The same id in the other namespace is another agent.
    b.save_agent_state(AgentState(shared, AgentStatus.STOPPED))
    got = a.get_agent_state(shared)
    assert got is not None
    assert (got.status, got.budget_spent, got.pii_detections) == (AgentStatus.RUNNING, 6.0, 3)
    assert b.stats().total == 1
    assert a.stats().total == 2
    assert b.remove_agent_state(shared) is True
    assert a.get_agent_state(shared) is not None
    # Every key that names the namespace starts with it.
    tagged = list(redis_server.client().scan_iter(match=f"*{first}*", count=1000))
    assert tagged
    assert all(key.startswith(f"{first}:".encode()) for key in tagged)
    a.close()
    b.close()


def test_user_and_password(redis_server: RedisServer, ns: str) -> None:
    client = redis_server.client()
    user = f"u{uuid.uuid4().hex[:8]}"
    client.acl_setuser(user, enabled=True, passwords=["+s3cr3t@/x"], keys=["*"], commands=["+@all"])
    try:
        url = f"redis://{user}:s3cr3t%40%2Fx@{HOST}:{redis_server.port}/0?namespace={ns}"
        with StateManager.from_url(url) as manager:
            agent = running()
            manager.save_agent_state(agent)
            assert manager.get_agent_state(agent.agent_id) == agent
            assert "s3cr3t" not in manager.url
        bad = f"redis://{user}:wrong@{HOST}:{redis_server.port}/0?namespace={ns}"
        with StateManager.from_url(bad) as manager:
            started = time.monotonic()
            with pytest.raises(BackendError, match="credentials") as info:
                manager.list_agents()
            assert not isinstance(info.value, BackendUnavailable)
            assert time.monotonic() - started < 1.0  # not retried: it cannot get better
            assert isinstance(info.value.__cause__, redis.AuthenticationError)
    finally:
        client.acl_deluser(user)


def test_unix_socket_reaches_the_same_data(redis_server: RedisServer, ns: str) -> None:
    assert redis_server.unix_path is not None
    over_tcp = StateManager.with_redis(redis_server.url, namespace=ns)
    over_unix = StateManager.from_url(f"unix://{redis_server.unix_path}?namespace={ns}")
    agent = running(limit=3.0)
    over_unix.save_agent_state(agent)
    over_tcp.record_spend(agent.agent_id, 1.0)
    got = over_unix.get_agent_state(agent.agent_id)
    assert got is not None
    assert got.budget_spent == 1.0
    assert over_unix.url.startswith("unix:///")
    over_tcp.close()
    over_unix.close()


def test_database_number_selects_a_database(redis_server: RedisServer, ns: str) -> None:
    url = f"redis://{HOST}:{redis_server.port}/3?namespace={ns}"
    with StateManager.from_url(url) as manager:
        manager.save_agent_state(running())
        layout = RedisLayout(ns)
        assert redis_server.client(db=3).exists(layout.meta) == 1
        assert redis_server.client(db=0).exists(layout.meta) == 0


def test_rediss_over_tls(tls_server: RedisServer, ns: str) -> None:
    assert tls_server.tls is not None
    url = f"rediss://{HOST}:{tls_server.port}/0?namespace={ns}&ssl_ca_certs={tls_server.tls.ca}"
    with StateManager.from_url(url) as manager:
        agent = running(limit=2.0)
        manager.save_agent_state(agent)
        assert manager.record_spend(agent.agent_id, 1.5).budget_spent == 1.5
        assert manager.url.startswith("rediss://")
    # Without the CA the server's certificate is refused.
    unverified = f"rediss://{HOST}:{tls_server.port}/0?namespace={ns}"
    with StateManager.from_url(unverified, timeout=1) as manager, pytest.raises(BackendUnavailable):
        manager.list_agents()


def test_layout_mismatch_is_a_schema_error(redis_server: RedisServer, ns: str) -> None:
    redis_server.client().hset(f"{ns}:meta", mapping={"layout": "99", "groups": "256"})
    with StateManager.with_redis(redis_server.url, namespace=ns) as manager, pytest.raises(SchemaError):
        manager.list_agents()


def test_closed_store_says_so(redis_server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    manager.stats()
    manager.close()
    manager.close()
    with pytest.raises(BackendError, match="closed"):
        manager.stats()


def test_money_is_exact_micro_units_like_memory(redis_server: RedisServer, ns: str) -> None:
    """Amounts are integers of micro-units in Redis: sums are exact, as in the memory store."""
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    memory = StateManager(MemoryBackend())
    agent = AgentState(AgentId.generate(), AgentStatus.RUNNING, 0.0, 0, 1.0)
    for m in (manager, memory):
        m.save_agent_state(agent)
    amounts = [0.1] * 9 + [0.0999995, 0.0000016, 0.000001]  # the 10th rounds to 0.1
    for amount in amounts:
        results = []
        for m in (manager, memory):
            try:
                results.append(m.record_spend(agent.agent_id, amount).budget_spent)
            except BudgetExceeded as exc:
                results.append(-exc.spent)
        assert results[0] == results[1]
    assert manager.get_agent_state(agent.agent_id).budget_spent == 1.0  # type: ignore[union-attr]
    stored = redis_server.client().hget(manager.backend.layout.agent_key(agent.agent_id), "spent_micros")
    assert stored == b"1000000"
    rng = random.Random(7)
    holds = [round(rng.uniform(0.0001, 0.01) * rng.choice([1, 1e-3, 1e3]), 6) for _ in range(40)]
    big = AgentState(AgentId.generate(), AgentStatus.RUNNING, 0.0, 0, 1e9)
    for m in (manager, memory):
        m.save_agent_state(big)
        for amount in holds:
            m.reserve_budget(big.agent_id, amount)
    assert manager.budget_available(big.agent_id) == memory.budget_available(big.agent_id)
    assert manager.backend.reserved(big.agent_id, time.time())[1] == sum(round(h * 1e6) for h in holds)
    manager.close()


def test_scripts_are_reloaded_after_script_flush(redis_server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    agents = [running() for _ in range(3)]
    manager.save_agent_states(agents)
    redis_server.client().script_flush()
    manager.record_spend(agents[0].agent_id, 1.0)
    redis_server.client().script_flush()
    manager.save_agent_states(agents)  # pipelined EVALSHA: NOSCRIPT, then loaded and resent
    assert manager.stats().total == 3
    manager.close()


def test_paging_walks_everything_once(
    redis_server: RedisServer, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    old = time.time() - 3600
    states = [running() for _ in range(700)]
    manager.save_agent_states(states)
    walk = GroupWalk(backend.layout, 1)  # one id per group per trip
    walked: list[bytes] = []
    while not walk.done:
        walked += [agent for _, agent in walk.advance(backend._batch(walk.commands(), "list agents"))]
    assert sorted(walked) == sorted(s.agent_id.as_str().encode() for s in states)
    # Purge, a candidate per call; failed agents stay when only stopped ones go.
    monkeypatch.setattr(RedisLayout, "purge_chunk", 1)
    for s in states[:40]:
        manager.set_status(s.agent_id, AgentStatus.STOPPED)
    for s in states[40:50]:
        manager.set_status(s.agent_id, AgentStatus.FAILED)
    gone = backend.purge_agents([AgentStatus.STOPPED], time.time() + 1)
    assert sorted(gone) == sorted(s.agent_id.as_str() for s in states[:40])
    assert backend.purge_agents([AgentStatus.STOPPED], old) == []
    assert sorted(backend.purge_agents([AgentStatus.RUNNING], time.time() + 1)) == sorted(
        s.agent_id.as_str() for s in states[50:]
    )
    assert manager.stats().total == 10
    manager.close()
    # Audit queries, a few candidates per script call, and prunes, a few records per call.
    monkeypatch.setattr(RedisLayout, "query_budget", 3)
    monkeypatch.setattr(RedisLayout, "prune_chunk", 2)
    manager = StateManager.with_redis(redis_server.url, namespace=namespace())
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    a, b = states[0].agent_id, states[1].agent_id
    manager.save_audit_logs(
        [AuditEvent(a if i % 4 else b, "tick" if i % 2 else "tock", 100 + i, str(i)) for i in range(40)]
    )
    assert [r.timestamp for r in manager.audit_log(since=130)] == list(range(130, 140))
    assert len(manager.audit_log(agent_id=b)) == 10
    assert [r.timestamp for r in manager.audit_log(agent_id=a, event_type="tock", limit=4)] == [
        102,
        106,
        110,
        114,
    ]
    assert manager.prune_audit_log(before=121) == 21
    assert len(manager.audit_log(agent_id=b)) == 4  # i = 24, 28, 32, 36
    layout = backend.layout
    client = redis_server.client()
    anchor = manager.verify_audit_log().anchor_seq
    assert anchor == 21
    for key in client.smembers(layout.audit_indexes):
        assert client.zrangebyscore(key, "-inf", anchor) == []
    assert manager.prune_audit_log(before=10**6) == 19
    assert client.scard(layout.audit_indexes) == 0
    assert client.keys(f"{layout.audit_prefix}by_*") == []
    assert manager.verify_audit_log().ok
    manager.close()


# -- Cluster ----------------------------------------------------------------------------------------


def test_cluster_spreads_agents_and_lists_them_from_every_master(
    redis_cluster: RedisCluster, ns: str
) -> None:
    manager = StateManager.from_url(f"{redis_cluster.url}?namespace={ns}")
    states = [AgentState(AgentId.generate(), AgentStatus.RUNNING, float(i), i % 3) for i in range(300)]
    for s in states[::3]:
        s.status = AgentStatus.STOPPED
    assert manager.save_agent_states(states) == 300
    per_node = []
    for node in redis_cluster.nodes:
        client = node.client()
        per_node.append(sum(1 for _ in client.scan_iter(match=f"{ns}:*:agent:*", count=1000)))
    assert sum(per_node) == 300
    assert all(count > 30 for count in per_node), per_node
    assert sorted(manager.list_agents()) == sorted(s.agent_id.as_str() for s in states)
    listed = list(manager.iter_agent_states(batch_size=7))
    assert sorted(listed, key=lambda s: s.agent_id) == sorted(states, key=lambda s: s.agent_id)
    assert len(list(manager.iter_agent_states(status=AgentStatus.STOPPED, batch_size=10))) == 100
    stats = manager.stats()
    assert (stats.total, stats.running, stats.stopped) == (300, 200, 100)
    assert stats.budget_spent == sum(range(300))
    ids = [s.agent_id for s in states[::-1]]
    assert manager.get_agent_states(ids) == states[::-1]
    manager.close()


def test_cluster_keeps_each_agents_keys_in_one_slot(redis_cluster: RedisCluster, ns: str) -> None:
    manager = StateManager.from_url(f"{redis_cluster.url}?namespace={ns}")
    agent = running(limit=10.0)
    manager.save_agent_state(agent)
    manager.reserve_budget(agent.agent_id, 1.0)
    manager.set_status(agent.agent_id, AgentStatus.STOPPED)
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    client = redis_cluster.nodes[0].client()
    keys = backend.layout.agent_keys(agent.agent_id)
    slots = {client.execute_command("CLUSTER", "KEYSLOT", key) for key in keys.values()}
    assert slots == {backend.layout.slot_of(agent.agent_id)}
    audit = [backend.layout.audit_log, backend.layout.audit_head, backend.layout.audit_by_type("x")]
    assert len({client.execute_command("CLUSTER", "KEYSLOT", key) for key in audit}) == 1
    cluster_client = redis_cluster.client()
    for key in keys.values():
        assert cluster_client.exists(key) == 1, key
    manager.close()


def test_text_that_is_no_id_finds_nothing(
    redis_server: RedisServer, redis_cluster: RedisCluster, ns: str
) -> None:
    """Reads are keyed by text: any text of an id's length finds nothing, on any master."""
    agent = running()
    text = agent.agent_id.as_str()
    misfits = [
        text.upper().replace("AGENT_", "agent_"),  # uppercase hex: another key
        text[:-8] + "0x123456",  # int() reads it, and it still names no stored key
        text[:-8] + " +1_234 ",
        text[:-8] + "zzzzzzzz",  # no group
        text[:-1] + "é",
        text[:-9] + "\ud800" + text[-8:],  # not even encodable
    ]
    for base_url in (redis_server.url, redis_cluster.url):
        manager = StateManager.from_url(f"{base_url}?namespace={ns}")
        manager.save_agent_state(agent)
        backend = manager.backend
        assert isinstance(backend, RedisBackend)
        for misfit in misfits:
            assert len(misfit) == len(text)
            assert backend.get(misfit) is None, misfit
            assert manager.get_agent_state(misfit) is None
        assert backend.get_many([misfits[0], text, misfits[-1]]) == [None, agent, None]
        manager.close()


def test_cluster_follows_moved_after_a_stale_slot_table(redis_cluster: RedisCluster, ns: str) -> None:
    backend = open_redis(f"redis+cluster://{HOST}:{redis_cluster.nodes[0].port}", namespace=ns)
    manager = StateManager(backend)
    agents = [running() for _ in range(20)]
    manager.save_agent_states(agents)
    wrong = backend._pool((HOST, redis_cluster.nodes[1].port))
    backend._table = [wrong] * 16384  # every slot on one master: most commands get MOVED
    assert manager.get_agent_state(agents[0].agent_id) == agents[0]
    backend._table = [wrong] * 16384
    assert manager.get_agent_states([a.agent_id for a in agents]) == agents
    manager.close()


def test_wrong_kind_of_url_is_explained(
    redis_server: RedisServer, redis_cluster: RedisCluster, ns: str
) -> None:
    standalone = StateManager.from_url(f"redis+cluster://{HOST}:{redis_server.port}?namespace={ns}")
    with standalone, pytest.raises(ConfigurationError, match="not a Redis Cluster node"):
        standalone.stats()
    node = StateManager.from_url(f"redis://{HOST}:{redis_cluster.nodes[0].port}/0?namespace={ns}")
    with node, pytest.raises(ConfigurationError, match="redis\\+cluster://"):
        node.stats()


def test_stats_never_scans(redis_server: RedisServer, redis_cluster: RedisCluster) -> None:
    for url, nodes in ((redis_server.url, [redis_server]), (redis_cluster.url, redis_cluster.nodes)):
        manager = StateManager.from_url(f"{url}?namespace={namespace()}")
        manager.save_agent_states(running() for _ in range(400))
        for node in nodes:
            node.client().config_resetstat()
        stats = manager.stats()
        assert stats.total == 400
        calls: dict[str, int] = {}
        for node in nodes:
            for name, info in node.client().info("commandstats").items():
                calls[name] = calls.get(name, 0) + int(info["calls"])
        for setup in ("hello", "client|setinfo", "config|resetstat", "info"):  # connections, this test
            calls.pop(f"cmdstat_{setup}", None)
        # One HMGET per slot group's statistics hash, whatever the number of agents (in one
        # script on a standalone server, which may first answer NOSCRIPT); no SCAN, no KEYS,
        # no agent read.
        scripts = calls.pop("cmdstat_evalsha", 0) + calls.pop("cmdstat_eval", 0)
        assert scripts in ((1, 2) if len(nodes) == 1 else (0,)), scripts
        assert calls == {"cmdstat_hmget": GROUPS}, calls
        manager.close()


# -- faults -------------------------------------------------------------------------------------------


def test_server_down_raises_within_the_default_bound_then_recovers(server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(server.url, namespace=ns)
    agent = running(limit=5.0)
    manager.save_agent_state(agent)
    server.kill()
    for call in (manager.stats, lambda: manager.record_spend(agent.agent_id, 1.0)):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            call()
        assert time.monotonic() - started <= 5.0
        assert isinstance(info.value, ConnectionError)
        assert info.value.__cause__ is not None
    server.start()  # same port, empty (persistence is off)
    assert manager.get_agent_state(agent.agent_id) is None
    manager.save_agent_state(agent)
    assert manager.record_spend(agent.agent_id, 1.0).budget_spent == 1.0
    manager.close()


def test_timeout_option_bounds_a_hung_server(server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(server.url, namespace=ns, timeout=1.0)
    agent = running()
    manager.save_agent_state(agent)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        for call in (manager.stats, lambda: manager.record_spend(agent.agent_id, 1.0)):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                call()
            assert time.monotonic() - started <= 1.5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert manager.get_agent_state(agent.agent_id) is not None
    manager.close()


def test_a_quick_restart_is_bridged_by_retries(server: RedisServer, ns: str) -> None:
    manager = StateManager.with_redis(server.url, namespace=ns)
    manager.save_agent_state(running())
    server.kill()
    restarter = threading.Timer(0.3, server.start)
    restarter.start()
    try:
        assert manager.stats().total == 0  # retried until the (empty) server was back
    finally:
        restarter.join()
    manager.close()


def test_a_lost_reply_is_never_applied_twice(redis_server: RedisServer, ns: str) -> None:
    proxy = ReplyDropper(redis_server.port)
    direct = StateManager.with_redis(redis_server.url, namespace=ns)
    through = StateManager.with_redis(f"redis://{HOST}:{proxy.port}/0", namespace=ns)
    agent = running(limit=100.0)
    direct.save_agent_state(agent)
    assert through.get_agent_state(agent.agent_id) == agent  # connection made and pooled
    # The scripts are in the server's cache, so the reply to drop is the one of the real run.
    through.release_reservation(through.reserve_budget(agent.agent_id, 1.0))
    through.save_audit_log(AuditEvent(agent.agent_id, "note", 1, "first"))
    through.record_spend(agent.agent_id, 1.0)

    proxy.drop = 1
    assert through.record_spend(agent.agent_id, 7.0).budget_spent == 8.0  # resent: applied once
    got = direct.get_agent_state(agent.agent_id)
    assert got is not None
    assert got.budget_spent == 8.0

    assert through.get_agent_state(agent.agent_id) is not None  # a new pooled connection
    proxy.drop = 1  # an append of events given directly is not resent
    with pytest.raises(BackendUnavailable, match="may or may not have been applied"):
        through.save_audit_log(AuditEvent(agent.agent_id, "note", 1, "once"))
    assert direct.audit_count() == 4  # two notes and two spend records
    assert direct.verify_audit_log().ok
    assert through.get_agent_state(agent.agent_id) is not None
    proxy.drop = 1
    hold = through.reserve_budget(agent.agent_id, 5.0)  # resent: held once
    assert direct.budget_available(agent.agent_id) == 100.0 - 8.0 - 5.0
    through.release_reservation(hold)

    # Reads are safe to repeat: the lost reply is fetched again.
    assert through.get_agent_state(agent.agent_id) is not None
    proxy.drop = 1
    assert through.stats().total == 1
    proxy.drop = 1
    assert through.get_agent_state(agent.agent_id) is not None
    # And the manager carries on over a fresh connection.
    assert through.record_spend(agent.agent_id, 1.0).budget_spent == 9.0
    through.close()
    direct.close()
    proxy.close()


# -- processes ---------------------------------------------------------------------------------------

SPEND_WORKER = """
import sys
from iron_runtime_state import BudgetExceeded, StateManager
url, agent, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
manager = StateManager.from_url(url)
done = refused = 0
for _ in range(n):
    try:
        manager.record_spend(agent, 1.0)
        done += 1
    except BudgetExceeded:
        refused += 1
print(done, refused)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out


@pytest.mark.parametrize("topology", ["redis", "redis-cluster"])
def test_four_processes_spend_exactly_to_the_limit(
    request: pytest.FixtureRequest, topology: str, ns: str
) -> None:
    target = request.getfixturevalue("redis_server" if topology == "redis" else "redis_cluster")
    url = f"{target.url}?namespace={ns}"
    manager = StateManager.from_url(url)
    agent = running(limit=1500.0)
    manager.save_agent_state(agent)
    workers = [_spawn(SPEND_WORKER, url, agent.agent_id.as_str(), "500") for _ in range(4)]
    counts = [tuple(map(int, _finish(w).split())) for w in workers]
    final = manager.get_agent_state(agent.agent_id)
    assert final is not None
    assert final.budget_spent == 1500.0  # exactly the limit: never past it, nothing lost
    assert sum(done for done, _ in counts) == 1500
    assert sum(refused for _, refused in counts) == 500
    assert manager.stats().budget_spent == 1500.0
    assert len(manager.audit_log(agent_id=agent.agent_id, event_type="budget_exceeded")) == 500
    manager.close()


RESERVE_WORKER = """
import json, random, sys, time
from iron_runtime_state import BudgetExceeded, StateManager
url, agent, seed, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
manager = StateManager.from_url(url)
rng = random.Random(seed)
committed = []
for _ in range(100):
    amount = rng.choice([0.5, 1.0, 2.0, 3.0])
    try:
        hold = manager.reserve_budget(agent, amount, ttl=30)
    except BudgetExceeded:
        continue
    state, reserved = manager.backend.reserved(hold.agent_id, time.time())  # micro-units held
    if round(state.budget_spent * 1e6) + reserved > round(limit * 1e6):
        sys.exit("spent + reserved passed the limit: %r + %r" % (state.budget_spent, reserved))
    if rng.random() < 0.3:
        manager.release_reservation(hold)
    else:
        actual = rng.choice([amount, amount / 2, 0.0])
        manager.commit_reservation(hold, actual)
        committed.append(actual)
print(json.dumps(committed))
"""


def test_reservations_across_four_processes_never_pass_the_limit(redis_server: RedisServer, ns: str) -> None:
    url = f"{redis_server.url}?namespace={ns}"
    manager = StateManager.from_url(url)
    limit = 120.0
    agent = running(limit=limit)
    manager.save_agent_state(agent)
    workers = [
        _spawn(RESERVE_WORKER, url, agent.agent_id.as_str(), str(seed), str(limit)) for seed in range(4)
    ]
    violations = []
    while any(w.poll() is None for w in workers):  # watch from outside too, atomically each time
        state, reserved = manager.backend.reserved(agent.agent_id, time.time())  # micro-units held
        if round(state.budget_spent * 1e6) + reserved > round(limit * 1e6):
            violations.append((state.budget_spent, reserved))
        time.sleep(0.02)
    committed = [amount for w in workers for amount in json.loads(_finish(w))]
    assert not violations
    final = manager.get_agent_state(agent.agent_id)
    assert final is not None
    assert final.budget_spent == math.fsum(committed)
    assert final.budget_spent <= limit
    assert manager.budget_available(agent.agent_id) == limit - final.budget_spent
    manager.close()


HOLDER = """
import sys, time
from iron_runtime_state import StateManager
manager = StateManager.from_url(sys.argv[1])
for _ in range(3):
    manager.reserve_budget(sys.argv[2], 2.0, ttl=float(sys.argv[3]))
print("held", flush=True)
time.sleep(600)
"""


def test_holds_of_a_killed_process_expire(redis_server: RedisServer, ns: str) -> None:
    url = f"{redis_server.url}?namespace={ns}"
    manager = StateManager.from_url(url)
    agent = running(limit=10.0)
    manager.save_agent_state(agent)
    ttl = 2.0  # long enough that the check right after the kill cannot race the expiry
    holder = _spawn(HOLDER, url, agent.agent_id.as_str(), str(ttl))
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    held_at = time.time()
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert manager.budget_available(agent.agent_id) == 4.0
    with pytest.raises(BudgetExceeded):
        manager.reserve_budget(agent.agent_id, 5.0)
    keys = RedisLayout(ns).agent_keys(agent.agent_id)
    client = redis_server.client()
    # The holds stop counting when their ttl runs out, by the server's clock ...
    deadline = time.monotonic() + 10
    while manager.budget_available(agent.agent_id) < 10.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.time() >= held_at + ttl
    assert manager.budget_available(agent.agent_id) == 10.0
    # ... but stay stored, with no expiry of their own, until a write on the agent reports them.
    time.sleep(1.5)
    assert client.pttl(keys["holds"]) == -1
    assert client.zcard(keys["holds"]) == 3
    assert manager.audit_log(agent_id=agent.agent_id, event_type="hold_expired") == []
    mine = manager.reserve_budget(agent.agent_id, 10.0)
    lapsed = manager.audit_log(agent_id=agent.agent_id, event_type="hold_expired")
    assert [json.loads(r.details)["amount"] for r in lapsed] == [2.0, 2.0, 2.0]
    assert client.zrange(keys["holds"], 0, -1) == [f"{mine.reservation_id}:10000000".encode()]
    manager.release_reservation(mine)
    assert client.exists(keys["holds"]) == 0  # the last hold gone, the key goes with it
    manager.close()


# -- a fault on one master of a cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisCluster]:
    folder = short_tmpdir("iron-cfault-")
    cluster = RedisCluster(folder)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_cluster_master_down_then_back(own_cluster: RedisCluster, ns: str) -> None:
    manager = StateManager.from_url(f"{own_cluster.url}?namespace={ns}", timeout=2.0)
    states = [running() for _ in range(60)]
    manager.save_agent_states(states)
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    victim = own_cluster.nodes[1]
    on_victim = [
        s
        for s in states
        if backend._route(backend.layout.slot_of(s.agent_id), time.monotonic()).connection_kwargs["port"]
        == victim.port
    ]
    elsewhere = [s for s in states if s not in on_victim]
    assert on_victim
    assert elsewhere
    victim.kill()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        manager.get_agent_state(on_victim[0].agent_id)
    assert time.monotonic() - started <= 2.5
    assert manager.get_agent_state(elsewhere[0].agent_id) == elsewhere[0]
    victim.start()  # same port and node id (nodes.conf): it takes its slots back, empty
    own_cluster.wait_ok()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert manager.get_agent_state(on_victim[0].agent_id) is None  # its data died with it
            break
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
    manager.save_agent_state(on_victim[0])
    assert manager.get_agent_state(on_victim[0].agent_id) == on_victim[0]
    manager.close()


def test_a_master_that_is_down_does_not_stop_the_others(own_cluster: RedisCluster, ns: str) -> None:
    """The first write of a store drains every outbox, passing over the masters it cannot reach:
    agents on the others keep working while one master is down."""
    url = f"{own_cluster.url}?namespace={ns}"
    seed = StateManager.from_url(url, timeout=2.0)
    states = [running() for _ in range(30)]
    seed.save_agent_states(states)
    backend = seed.backend
    assert isinstance(backend, RedisBackend)

    def port_of(slot: int) -> int:
        return int(backend._route(slot, time.monotonic()).connection_kwargs["port"])

    # The namespace's mark and the trail stay up: a store cannot start, or audit, without them.
    needed = {port_of(backend.layout.meta_slot), port_of(backend.layout.audit_slot)}
    victims = [node for node in own_cluster.nodes if node.port not in needed]
    if not victims:
        pytest.skip("this namespace's mark and trail live on every master")
    victim = victims[0]
    elsewhere = next(s for s in states if port_of(backend.layout.slot_of(s.agent_id)) != victim.port)
    victim.kill()
    try:
        fresh = StateManager.from_url(url, timeout=2.0)
        fresh.record_pii_detection(elsewhere.agent_id, 1)
        assert [r.event.event_type for r in fresh.audit_log(agent_id=elsewhere.agent_id)] == ["pii_detected"]
        fresh.close()
    finally:
        victim.start()
        own_cluster.wait_ok()
    seed.close()


# -- indexes: status sets and the audit trail's time index -------------------------------------------


@pytest.fixture(params=["standalone", "cluster"])
def any_url(request: pytest.FixtureRequest) -> str:
    """A fresh namespace on a standalone server, then on a cluster."""
    if request.param == "standalone":
        base = request.getfixturevalue("redis_server").url
    else:
        base = request.getfixturevalue("redis_cluster").url
    return f"{base}?namespace={namespace()}"


def _expected(events: list[AuditEvent], seqs: list[int], **query: object) -> list[int]:
    """The seqs a query must return, by reading every record."""
    since, until, limit = query.get("since"), query.get("until"), query.get("limit")
    agent, kind = query.get("agent_id"), query.get("event_type")
    found = [
        seq
        for seq, e in zip(seqs, events, strict=True)
        if (since is None or e.timestamp >= since)  # type: ignore[operator]
        and (until is None or e.timestamp <= until)  # type: ignore[operator]
        and (agent is None or e.agent_id == agent)
        and (kind is None or e.event_type == kind)
    ]
    return found if limit is None else found[: int(limit)]  # type: ignore[call-overload]


def test_queries_by_time_match_a_full_read(any_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timestamps that go back and forth (the events' own): every since/until/limit query, alone or
    with an agent or a type, returns what reading every record would, before and after prunes."""
    monkeypatch.setattr(RedisLayout, "query_budget", 37)  # many pages per query
    monkeypatch.setattr(RedisLayout, "prune_chunk", 150)
    rng = random.Random(15)
    manager = StateManager.from_url(any_url)
    agents = [AgentId.generate() for _ in range(3)]
    events = []
    for i in range(1_200):
        # Mostly rising with jitter, a stretch going back, and a few far in the past or future.
        ts = 10_000 + i * 10 + rng.randint(-300, 300)
        if 500 <= i < 600:
            ts = 20_000 - i * 5
        if rng.random() < 0.01:
            ts = rng.choice([1, 10**9])
        events.append(AuditEvent(agents[i % 3], ("a", "b")[i % 2], ts, str(i)))
    records = manager.save_audit_logs(events)
    seqs = [r.seq for r in records]

    def check(count: int) -> None:
        stamps = sorted({e.timestamp for e in events})
        for _ in range(count):
            since, until = sorted(
                rng.sample([None, *stamps, rng.randint(0, 30_000)], 2), key=lambda t: t or 0
            )
            query = {
                "since": since if rng.random() < 0.8 else None,
                "until": until if rng.random() < 0.5 else None,
                "limit": rng.choice([None, 1, 5, 100]),
                "agent_id": rng.choice([None, None, agents[1]]),
                "event_type": rng.choice([None, None, "b"]),
            }
            got = [r.seq for r in manager.audit_log(**query)]  # type: ignore[arg-type]
            assert got == _expected(events, seqs, **query), query

    check(150)
    assert manager.prune_audit_log(before=10_000 + 450 * 10) > 0  # a part of the trail
    kept = {r.seq for r in manager.audit_log()}
    events = [e for e, s in zip(events, seqs, strict=True) if s in kept]
    seqs = [s for s in seqs if s in kept]
    check(150)
    more = [AuditEvent(agents[0], "a", 10_000 + rng.randint(-5_000, 30_000), "late") for _ in range(300)]
    events += more
    seqs += [r.seq for r in manager.save_audit_logs(more)]
    check(100)
    assert manager.verify_audit_log().ok
    manager.close()


def test_a_trail_without_time_index_gets_one_before_a_query_by_time(
    redis_server: RedisServer, ns: str
) -> None:
    """Records appended by a version without the index (here: the index removed, as 0.4 left it)
    are indexed before the first query by time; appends keep it from there."""
    manager = StateManager.with_redis(redis_server.url, namespace=ns)
    agent = AgentId.generate()
    manager.save_audit_logs([AuditEvent(agent, "x", 5_000 - i, str(i)) for i in range(2_500)])
    layout = RedisLayout(ns)
    client = redis_server.client()
    client.delete(*layout.audit_time)
    client.hdel(layout.audit_head, "time_indexed")
    assert [r.timestamp for r in manager.audit_log(since=4_990)] == list(range(5_000, 4_989, -1))
    assert int(client.hget(layout.audit_head, "time_indexed") or 0) == 2_500
    manager.save_audit_log(AuditEvent(agent, "x", 4_995, "new"))
    assert int(client.hget(layout.audit_head, "time_indexed") or 0) == 2_501
    assert [r.timestamp for r in manager.audit_log(since=4_995, until=4_996)] == [4_996, 4_995, 4_995]
    assert [r.timestamp for r in manager.audit_log(until=2_501)] == [2_501]
    manager.close()


def _status_sets(client: redis.Redis | redis.RedisCluster, layout: RedisLayout) -> dict[str, set[str]]:
    members: dict[str, set[str]] = {s.value: set() for s in AgentStatus}
    for keys in layout.group_keys:
        for status, key in zip(("running", "stopped", "failed"), keys.status_keys(), strict=True):
            members[status] |= {m.decode() for m in cast(list[bytes], client.zrange(key, 0, -1))}
    return members


def test_status_filters_walk_the_status_sets(any_url: str, request: pytest.FixtureRequest) -> None:
    """Every change of a status (save, update, set_status, remove, purge) keeps the groups' status
    sets exact; a filtered walk returns the agents with that status and only them."""
    manager = StateManager.from_url(any_url)
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    client = (
        request.getfixturevalue("redis_cluster").client()
        if "cluster" in any_url
        else request.getfixturevalue("redis_server").client()
    )
    rng = random.Random(7)
    states = [AgentState(AgentId.generate(), rng.choice(list(AgentStatus))) for _ in range(600)]
    manager.save_agent_states(states)
    ids = [s.agent_id for s in states]
    for agent in rng.sample(ids, 100):
        manager.set_status(agent, rng.choice(list(AgentStatus)))
    for agent in rng.sample(ids, 50):
        manager.update_agent_state(
            agent, lambda s: AgentState(s.agent_id, AgentStatus.FAILED, s.budget_spent, s.pii_detections)
        )
    for agent in rng.sample(ids, 50):
        manager.save_agent_state(AgentState(agent, AgentStatus.STOPPED))
    for agent in rng.sample(ids, 40):
        manager.remove_agent_state(agent)
    manager.purge_agents(status=AgentStatus.FAILED, older_than=0)

    def check() -> None:
        stored = [s for s in manager.get_agent_states(ids) if s is not None]
        truth = {st.value: {s.agent_id.as_str() for s in stored if s.status is st} for st in AgentStatus}
        assert _status_sets(client, backend.layout) == truth
        for st in AgentStatus:
            walked = [s.agent_id.as_str() for s in manager.iter_agent_states(status=st, batch_size=7)]
            assert sorted(walked) == sorted(truth[st.value])

    check()
    manager.purge_agents(status=AgentStatus.STOPPED, older_than=0)
    check()
    manager.close()


def test_a_namespace_without_status_sets_gets_them_on_first_use(redis_server: RedisServer, ns: str) -> None:
    """A namespace written before the status sets (its ``meta`` unmarked, as 0.4 left it) gets them
    built by the first store that opens it."""
    url = f"{redis_server.url}?namespace={ns}"
    manager = StateManager.from_url(url)
    states = [
        AgentState(AgentId.generate(), (AgentStatus.RUNNING, AgentStatus.STOPPED)[i % 2])
        for i in range(3_000)
    ]
    manager.save_agent_states(states)
    manager.close()
    layout = RedisLayout(ns)
    client = redis_server.client()
    for keys in layout.group_keys:
        client.delete(*keys.status_keys())
    client.hdel(layout.meta, "status_sets")
    reopened = StateManager.from_url(url)
    stopped = {s.agent_id.as_str() for s in reopened.iter_agent_states(status=AgentStatus.STOPPED)}
    assert stopped == {s.agent_id.as_str() for s in states[1::2]}
    assert client.hget(layout.meta, "status_sets") == b"1"
    assert len(_status_sets(client, layout)["running"]) == 1_500
    reopened.close()
