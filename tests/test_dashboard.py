"""The dashboard over HTTP: pages, the event stream, /metrics and /healthz, security, a store
that is down, and ``iron-state serve`` as a process. The browser tests are in
tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from iron_runtime_state import (
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    AuditEvent,
    BudgetExceeded,
    ConfigurationError,
    StateManager,
)
from iron_runtime_state.dashboard import DashboardServer, DashboardSettings, check_bind

from .dashboard_server import STORES, Dashboard, open_store, running, wait_for
from .processes import clean_env, iron_state_command, terminate

TOKEN = "t0ken-for-the-tests-only-1234"


@pytest.fixture(params=STORES)
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dashboard]:
    manager, settings = open_store(request.param, tmp_path)
    with manager, running(settings, manager) as dashboard:
        yield dashboard


def small_fleet(manager: StateManager) -> list[AgentId]:
    manager.set_budget("team:support", limit=10.0, period="month")
    ids = [AgentId.test_fixture(n) for n in range(1, 7)]
    manager.save_agent_states(
        AgentState(
            aid,
            AgentStatus.RUNNING if n % 3 else AgentStatus.STOPPED,
            budget_limit=5.0,
            labels={"team": "support" if n % 2 else "research", "env": "prod"},
            budget_scopes=("team:support",) if n % 2 else (),
        )
        for n, aid in enumerate(ids, 1)
    )
    manager.record_spend(ids[0], 1.5)
    manager.record_spend(ids[1], 0.25)
    manager.record_pii_detection(ids[1], 2)
    return ids


# -- pages ------------------------------------------------------------------------------------------


def test_overview_shows_totals_budgets_chain_and_feed(dash: Dashboard) -> None:
    ids = small_fleet(dash.manager)
    wait_for(lambda: (dash.get("/api/summary").json()["stats"] or {}).get("total") == 6)
    page = dash.get("/")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'data-field="total">6<' in html
    assert 'data-field="budget_spent">1.75<' in html
    assert 'data-field="pii_detections">2<' in html
    assert 'data-scope="team:support"' in html
    assert "pii_detected" in html  # the feed
    assert 'data-part="/parts/spenders"' in html  # loaded once the page shows:
    spenders = dash.get("/parts/spenders").text
    assert spenders.index(f"/agents/{ids[0]}") < spenders.index(f"/agents/{ids[1]}")
    assert "<svg" in html
    assert "chart-line" in html
    verified = wait_for(lambda: dash.get("/api/summary").json()["verification"])
    assert verified["ok"] is True
    assert "verified:" in dash.get("/").text


def test_agents_table_filters_sorts_and_pages_on_the_server(dash: Dashboard) -> None:
    ids = small_fleet(dash.manager)
    rows = lambda text: re.findall(r'<tr data-agent="([^"]+)"', text)  # noqa: E731
    assert rows(dash.get("/agents").text) == sorted(a.as_str() for a in ids)
    support = rows(dash.get("/agents?labels=team%3Dsupport").text)
    assert support == [ids[0].as_str(), ids[2].as_str(), ids[4].as_str()]
    running = rows(dash.get("/agents?status=running&labels=team%3Dsupport,env%3Dprod").text)
    assert running == [ids[0].as_str(), ids[4].as_str()]
    by_spend = rows(dash.get("/agents?order_by=budget_spent&descending=1").text)
    assert by_spend[:2] == [ids[0].as_str(), ids[1].as_str()]
    first = dash.get("/api/agents?limit=4").json()
    assert [a["agent_id"] for a in first["agents"]] == sorted(a.as_str() for a in ids)[:4]
    assert first["has_next"] is True
    rest = dash.get("/api/agents?limit=4&offset=4").json()
    assert len(rest["agents"]) == 2
    assert rest["has_next"] is False
    page = dash.get("/agents?limit=4").text
    assert 'id="next"' in page
    assert "offset=4" in page
    odd = AgentId.generate()  # a value with a comma: filtered with label= (one pair each)
    dash.manager.save_agent_state(AgentState(odd, AgentStatus.RUNNING, labels={"note": "a, b"}))
    assert rows(dash.get("/agents?label=note%3Da%2C%20b").text) == [odd.as_str()]
    assert (
        "label=note%3Da%2C+b" in dash.get("/agents?label=note%3Da%2C%20b&limit=1").text
    )  # kept by the links
    bad = dash.get("/agents?labels=nokey")
    assert bad.status == 400
    assert "key=value" in bad.text
    assert dash.get("/agents?order_by=nonsense").status == 400
    assert dash.get("/api/agents?status=sleeping").status == 400


def test_agent_page_shows_state_holds_budgets_and_events(dash: Dashboard) -> None:
    ids = small_fleet(dash.manager)
    hold = dash.manager.reserve_budget(ids[0], 0.5)
    page = dash.get(f"/agents/{ids[0]}")
    assert page.status == 200
    html = page.text
    assert 'data-fact="Held (open reservations)">0.5<' in html
    # available: the agent's 5 - 1.5 - 0.5 = 3, the team's 10 - 1.5 - 0.5 = 8: the least
    assert 'data-fact="Available (agent and scopes)">3<' in html
    assert "team:support" in html
    assert "team=support" in html
    assert f'data-agent="{ids[0]}"' in html  # the live feed follows this agent
    dash.manager.release_reservation(hold)
    dash.manager.record_pii_detection(ids[0], 1, details="an email address")
    assert "an email address" in dash.get(f"/agents/{ids[0]}").text
    assert "Held (open reservations)&quot;&gt;0&lt;" not in dash.get(f"/parts/agents/{ids[0]}").text
    assert dash.get(f"/agents/{AgentId.test_fixture(999)}").status == 404
    assert dash.get("/agents/bob").status == 400


def test_store_values_are_escaped(dash: Dashboard) -> None:
    hostile = '<script>alert("x")</script>'
    agent = AgentId.generate()
    dash.manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, labels={"note": hostile}))
    dash.manager.save_audit_log(AuditEvent(agent, "tool_call", details=hostile))
    for path in ("/agents", f"/agents/{agent}", "/"):
        html = wait_for(
            lambda p=path: dash.get(p).text if "tool_call" in dash.get(p).text or p == "/agents" else None
        )
        assert hostile not in html
        assert "&lt;script&gt;" in html


# -- the event stream -------------------------------------------------------------------------------


def test_event_stream_sends_new_records_and_resumes_with_last_event_id(dash: Dashboard) -> None:
    agent = AgentId.generate()
    start = dash.manager.audit_checkpoint().seq
    for i in range(5):
        dash.manager.save_audit_log(AuditEvent(agent, "step", details=str(i)))
    got = dash.events(f"/events?after={start}", 3)
    audits = [(data, event_id) for event, data, event_id in got if event == "audit"]
    assert [d["details"] for d, _ in audits] == ["0", "1", "2"]
    assert [int(i) for _, i in audits] == [d["seq"] for d, _ in audits]
    assert {event for event, _, _ in got} >= {"store", "totals", "audit"}
    # The browser reconnects with the last id it got: the rest, once each.
    last = audits[-1][1]
    for i in range(5, 8):
        dash.manager.save_audit_log(AuditEvent(agent, "step", details=str(i)))
    resumed = dash.events("/events", 5, headers={"Last-Event-ID": str(last)})
    assert [d["details"] for e, d, _ in resumed if e == "audit"] == ["3", "4", "5", "6", "7"]


def test_event_stream_catches_up_from_before_its_ring(tmp_path: Path) -> None:
    manager, settings = open_store("sqlite", tmp_path)
    settings = DashboardSettings(settings.opener, settings.url, refresh=0.2, verify_every=0, feed_size=10)
    agent = AgentId.generate()
    with manager, running(settings, manager) as dash:
        manager.save_audit_logs([AuditEvent(agent, "step", details=str(i)) for i in range(40)])
        got = dash.events("/events?after=0", 40)
    assert [d["details"] for e, d, _ in got if e == "audit"] == [str(i) for i in range(40)]


def test_event_stream_filters_by_agent(dash: Dashboard) -> None:
    a, b = AgentId.generate(), AgentId.generate()
    start = dash.manager.audit_checkpoint().seq
    for i in range(6):
        dash.manager.save_audit_log(AuditEvent(a if i % 2 else b, "step", details=str(i)))
    got = dash.events(f"/events?after={start}&agent={a}", 3)
    assert [d["details"] for e, d, _ in got if e == "audit"] == ["1", "3", "5"]
    assert dash.get("/events?agent=bob").status == 400
    assert dash.get("/events?after=x1").status == 400


# -- /metrics and /healthz ----------------------------------------------------------------------------


def test_metrics_and_healthz_on_the_same_server(dash: Dashboard) -> None:
    ids = small_fleet(dash.manager)
    # The counters count what is appended once the dashboard follows the trail.
    wait_for(lambda: dash.get("/api/summary").json()["last_seq"] is not None)
    with pytest.raises(BudgetExceeded):
        dash.manager.record_spend(ids[0], 100.0)
    dash.manager.set_budget("team:support", limit=3.0, period="month")
    with pytest.raises(BudgetExceeded):
        dash.manager.reserve_budget(ids[4], 2.0)  # its own 5 allows it; the team's 3 - 1.5 does not

    def counted() -> str | None:
        text = dash.get("/metrics").text
        return text if 'iron_state_reservations_refused_total{scope="team:support"} 1.0' in text else None

    text = wait_for(counted)
    assert dash.get("/metrics").headers["content-type"].startswith("text/plain")
    assert 'iron_state_spends_refused_total{scope=""} 1.0' in text
    assert 'iron_state_scope_spent{scope="team:support"} 1.5' in text
    assert 'iron_state_scope_limit{scope="team:support"} 3.0' in text
    assert 'iron_state_scope_held{scope="team:support"} 0.0' in text
    assert 'iron_state_scope_period_start_seconds{scope="team:support"}' in text
    assert "iron_state_up 1.0" in text
    assert 'iron_state_agents{status="running"} 4.0' in text
    assert dash.get("/healthz").json() == {"ok": True, "store": "up"}


# -- security ------------------------------------------------------------------------------------------


def test_read_only_and_headers(dash: Dashboard) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = dash.get("/", method=method)
        assert answer.status == 405, method
    page = dash.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert re.fullmatch(r"app;dur=\d+\.\d+", page.headers["server-timing"])
    assert 'src="/static/dashboard.js"' in page.text
    assert dash.get("/static/dashboard.js").status == 200
    assert "http" not in re.sub(r"http://www\.w3\.org/2000/svg", "", dash.get("/").text.split("<main>")[0])


def test_no_token_means_loopback_only() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ConfigurationError, match="without a token"):
            check_bind(host, None)
        check_bind(host, TOKEN)
    with pytest.raises(ConfigurationError, match="at least 16"):
        DashboardSettings(lambda: None, token="short")  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigurationError, match="without a token"):
        DashboardServer(DashboardSettings.for_url("memory://"), "0.0.0.0", 0)


def test_without_a_token_a_foreign_host_header_is_refused(dash: Dashboard) -> None:
    assert dash.get("/", headers={"Host": "attacker.example"}).status == 421
    assert dash.get("/", headers={"Host": "localhost:1234"}).status == 200


def test_with_a_token_every_page_needs_it(tmp_path: Path) -> None:
    manager, settings = open_store("memory", tmp_path)
    settings = DashboardSettings(settings.opener, "memory://", token=TOKEN, refresh=0.2, verify_every=0)
    with running(settings, manager) as dash:
        for path in ("/", "/agents", "/metrics", "/events", "/api/summary"):
            answer = dash.get(path)
            assert answer.status == 401, path
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert dash.get("/", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status == 401
        assert dash.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert dash.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert dash.get("/healthz").status == 200  # for probes; it says only up or down
        assert dash.get("/static/dashboard.css").status == 200
        # A browser signs in once with ?token=: a redirect that sets a cookie and drops the token.
        request = urllib.request.Request(dash.url + "agents?token=" + TOKEN + "&status=running")

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kwargs: object) -> None:
                return None

        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.build_opener(NoRedirect).open(request, timeout=5)
        answer = raised.value
        assert answer.code == 303
        assert answer.headers["Location"] == "/agents?status=running"
        cookie = answer.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert TOKEN not in cookie
        pair = cookie.split(";")[0]
        assert dash.get("/agents", headers={"Cookie": pair}).status == 200
        assert dash.get("/agents", headers={"Cookie": pair[:-2] + "00"}).status == 401


# -- a store that is down ---------------------------------------------------------------------------


def test_a_store_down_at_start_is_shown_down_then_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"  # no such file yet: the store cannot be opened
    settings = DashboardSettings(
        lambda: AsyncStateManager.from_url(url, create=False), url, refresh=0.2, verify_every=0
    )
    server = DashboardServer(settings, "127.0.0.1", 0)
    server.start()
    try:
        dash = Dashboard(server, None)  # type: ignore[arg-type]
        assert wait_for(lambda: dash.get("/healthz").json()["store"] == "down")
        page = dash.get("/")
        assert page.status == 200
        assert "The store is down" in page.text
        assert 'id="banner" class="banner" role="alert"' in page.text  # shown: not hidden
        assert "iron_state_up 0.0" in dash.get("/metrics").text
        assert dash.get("/agents").status == 503
        with StateManager.from_url(url) as manager:
            manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.RUNNING))
            wait_for(lambda: dash.get("/healthz").json()["store"] == "up")
            assert "iron_state_up 1.0" in dash.get("/metrics").text
            wait_for(lambda: 'data-field="total">1<' in dash.get("/").text)
    finally:
        server.stop()


# -- iron-state serve -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_as_a_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with StateManager.from_url(url) as manager:
        small_fleet(manager)
    env = clean_env(IRON_STATE_DASHBOARD_TOKEN=TOKEN)
    process = subprocess.Popen(
        [*iron_state_command(), "serve", "--url", url, "--port", "0", "--json", "--refresh", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["endpoint"] == f"http://127.0.0.1:{started['port']}/"
        base = started["endpoint"].rstrip("/")
        request = urllib.request.Request(base + "/api/summary", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.loads(response.read())
        assert summary["stats"]["total"] == 6
    finally:
        _out, err = terminate(process)
    assert process.returncode == 0, err
    assert "serving the dashboard" in err
    assert "stopped" in err
    assert "Traceback" not in err


def test_serve_refuses_a_public_address_without_a_token() -> None:
    env = clean_env()
    run = subprocess.run(
        [*iron_state_command(), "serve", "--url", "memory://", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: refusing to serve the dashboard on '0.0.0.0' without a token")


@pytest.mark.slow
def test_a_redis_server_that_goes_away_is_shown_down_then_up(tmp_path: Path) -> None:
    from .redis_servers import RedisServer, namespace, redis_available, short_tmpdir

    if not redis_available():
        pytest.skip("redis-server is not installed")
    folder = short_tmpdir("iron-dash-")
    redis = RedisServer(folder, extra=["--appendonly", "yes", "--appendfsync", "always"]).start()
    url = f"{redis.url}?namespace={namespace()}"
    try:
        with StateManager.from_url(url, timeout=1.0) as manager:
            small_fleet(manager)
            settings = DashboardSettings(
                lambda: AsyncStateManager.from_url(url, timeout=1.0),
                url,
                refresh=0.2,
                verify_every=0,
                timeout=2.0,
            )
            with running(settings, manager) as dash:
                wait_for(lambda: dash.get("/healthz").json()["store"] == "up")
                redis.kill()
                wait_for(lambda: dash.get("/healthz").json()["store"] == "down", timeout=10)
                page = dash.get("/")
                assert page.status == 200
                assert 'data-field="total">6<' in page.text  # the last figures read, with the banner
                assert 'id="banner" class="banner" role="alert"' in page.text
                assert "iron_state_up 0.0" in dash.get("/metrics").text
                redis.start()  # the same port, the data kept (append-only file)
                wait_for(lambda: dash.get("/healthz").json()["store"] == "up", timeout=15)
                assert "iron_state_up 1.0" in dash.get("/metrics").text
                # The feed resumed: a record appended now reaches the page's stream.
                start = manager.audit_checkpoint().seq
                manager.save_audit_log(AuditEvent(AgentId.generate(), "after_restart"))
                got = dash.events(f"/events?after={start}", 1)
                assert [d["event_type"] for e, d, _ in got if e == "audit"] == ["after_restart"]
    finally:
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
