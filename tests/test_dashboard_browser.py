"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Playwright drives the system's browser (``executable_path``): nothing is downloaded.
``scripts/test`` installs the ``chromium`` package where it is missing. The tests:

- each page loads with no console error and no failed request;
- the agents table filters (status and labels) and sorts, on the server;
- what the test does to the store shows within 2 s without a reload: a spend in the totals, the
  records it appends (a refused spend's ``budget_exceeded``) in the live feed;
- the store going down and coming back shows on the page (a SQLite file that is not there yet).

They take the screenshots in docs/ when ``IRON_STATE_SCREENSHOTS`` names a folder
(``IRON_STATE_SCREENSHOTS=docs scripts/test -k browser``); otherwise into the test's temporary
folder.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
playwright_api = pytest.importorskip("playwright.sync_api")

from iron_runtime_state import (  # noqa: E402
    AgentId,
    AgentState,
    AgentStatus,
    AsyncStateManager,
    BudgetExceeded,
    StateManager,
)
from iron_runtime_state._demo import run_fleet  # noqa: E402
from iron_runtime_state.dashboard import DashboardServer, DashboardSettings  # noqa: E402

from .dashboard_server import Dashboard, open_store, running, wait_for  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test installs it)"
    ),
    pytest.mark.xdist_group("browser"),  # one browser per worker is plenty on two cores
]

#: What "live" means in the issue: a change shows on an open page within this many seconds.
LIVE_S = 2.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A browser tab that records console errors and failed requests."""

    def __init__(self, browser: Any) -> None:
        self.tab = browser.new_page(viewport={"width": 1400, "height": 900})
        self.problems: list[str] = []
        self.tab.on(
            "console",
            lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        self.tab.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.tab.on("requestfailed", self._failed)
        self.tab.on(
            "response",
            lambda r: self.problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
        )

    def _failed(self, request: Any) -> None:
        # A navigation cuts the event stream and any request still under way: not a problem.
        if "/events" not in request.url and "ERR_ABORTED" not in str(request.failure):
            self.problems.append(f"request failed: {request.url} {request.failure}")

    def close(self) -> None:
        self.tab.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    tab = Page(browser)
    try:
        yield tab
    finally:
        tab.close()


def screenshot(tab: Page, name: str, tmp_path: Path) -> None:
    folder = os.environ.get("IRON_STATE_SCREENSHOTS")
    target = Path(folder) if folder else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    tab.tab.screenshot(path=str(target / name), full_page=True)


@pytest.fixture(params=["memory", "sqlite"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dashboard]:
    """The demo's fleet (two teams, their scopes, refusals, failures) behind a dashboard."""
    manager, settings = open_store(request.param, tmp_path)
    run_fleet(manager, agents=40, steps=6, seed=3)
    with manager, running(settings, manager) as dashboard:
        yield dashboard


def text_of(tab: Page, selector: str) -> str:
    return str(tab.tab.locator(selector).first.inner_text())


def test_pages_load_without_console_errors(fleet: Dashboard, page: Page, tmp_path: Path) -> None:
    page.tab.goto(fleet.url)
    page.tab.wait_for_selector("#feed tbody tr")
    wait_for(lambda: text_of(page, "#feed-state") == "live", timeout=5)
    assert text_of(page, '[data-field="total"]') == "40"
    assert page.tab.locator("#budgets tbody tr").count() == 3
    assert page.tab.locator("svg.chart").count() == 1
    wait_for(lambda: "verified" in text_of(page, '[data-field="chain"]'), timeout=5)
    screenshot(page, "dashboard.png", tmp_path)
    page.tab.click("#spenders a")
    page.tab.wait_for_selector("#agent-state")
    assert "Held (open reservations)" in text_of(page, "#agent-state")
    wait_for(lambda: text_of(page, "#feed-state") == "live", timeout=5)
    screenshot(page, "dashboard-agent.png", tmp_path)
    page.tab.goto(fleet.url + "agents")
    assert page.tab.locator("#agents tbody tr").count() == 40
    assert page.problems == []


def test_the_agents_table_filters_and_sorts(fleet: Dashboard, page: Page, tmp_path: Path) -> None:
    manager = fleet.manager
    everyone = list(manager.iter_agent_states())
    page.tab.goto(fleet.url + "agents")
    page.tab.select_option("#filter-status", "running")  # applies at once
    page.tab.wait_for_url("**/agents?status=running*")
    running = {a.agent_id.as_str() for a in everyone if a.status is AgentStatus.RUNNING}
    shown = page.tab.locator("#agents tbody tr").evaluate_all("rows => rows.map(r => r.dataset.agent)")
    assert set(shown) == running
    page.tab.select_option("#filter-status", "")
    page.tab.wait_for_url("**/agents?*")
    page.tab.fill("#filter-labels", "team=support")
    page.tab.click("#filters button")
    page.tab.wait_for_url("**labels=team*support*")
    support = sorted(a.agent_id.as_str() for a in everyone if a.labels.get("team") == "support")
    shown = page.tab.locator("#agents tbody tr").evaluate_all("rows => rows.map(r => r.dataset.agent)")
    assert shown == support
    page.tab.click('th a[data-sort="budget_spent"]')  # the highest spend first
    page.tab.wait_for_url("**order_by=budget_spent*")
    spent = [float(t) for t in page.tab.locator("#agents tbody td.num:nth-child(4)").all_inner_texts()]
    assert spent == sorted(spent, reverse=True)
    assert len(spent) == len(support)
    screenshot(page, "dashboard-agents.png", tmp_path)
    assert page.problems == []


def test_a_spend_shows_in_the_totals_and_the_feed_within_2s(fleet: Dashboard, page: Page) -> None:
    manager = fleet.manager
    agent = AgentId.generate()
    manager.save_agent_state(AgentState(agent, AgentStatus.RUNNING, budget_limit=5.0, labels={"team": "qa"}))
    page.tab.goto(fleet.url)
    wait_for(lambda: text_of(page, "#feed-state") == "live", timeout=5)
    before = float(text_of(page, '[data-field="budget_spent"]').replace(",", ""))
    seq_before = manager.audit_checkpoint().seq

    started = time.monotonic()
    manager.record_spend(agent, 1.25)
    with pytest.raises(BudgetExceeded):  # refused: writes budget_exceeded, atomically with the check
        manager.record_spend(agent, 10.0)
    wanted = round(before + 1.25, 6)
    wait_for(
        lambda: float(text_of(page, '[data-field="budget_spent"]').replace(",", "")) == wanted, timeout=LIVE_S
    )
    # Every record the spends appended (the refusal; with the spend ledger, the spend itself).
    appended = manager.audit_log(after_seq=seq_before, agent_id=agent)
    assert "budget_exceeded" in [r.event_type for r in appended]
    for record in appended:
        wait_for(
            lambda r=record: page.tab.locator(f'#feed tr[data-seq="{r.seq}"]').count() == 1, timeout=LIVE_S
        )
    took = time.monotonic() - started
    assert took < LIVE_S + 0.5, took  # both shown, each within the 2 s
    row = text_of(page, f'#feed tr[data-seq="{appended[-1].seq}"]')
    assert "budget_exceeded" in row
    assert page.problems == []


def test_a_store_that_is_down_is_shown_down_then_up(browser: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"  # not there yet: the store cannot be opened
    settings = DashboardSettings(
        lambda: AsyncStateManager.from_url(url, create=False), url, refresh=0.2, verify_every=0
    )
    server = DashboardServer(settings, "127.0.0.1", 0)
    server.start()
    tab = Page(browser)
    try:
        tab.tab.goto(server.url)
        wait_for(lambda: text_of(tab, "#store-state") == "DOWN", timeout=5)
        assert tab.tab.locator("#banner").is_visible()
        with StateManager.from_url(url) as manager:
            manager.save_agent_state(AgentState(AgentId.generate(), AgentStatus.RUNNING))
            wait_for(lambda: text_of(tab, "#store-state") == "up", timeout=5)
            assert not tab.tab.locator("#banner").is_visible()
            wait_for(lambda: text_of(tab, '[data-field="total"]') == "1", timeout=5)
        assert [p for p in tab.problems if "HTTP 503" not in p] == []
    finally:
        tab.close()
        server.stop()
