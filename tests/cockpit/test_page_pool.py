"""The Cockpit page in front of a pool of hosts (docs/pool.md): two real pool bridge processes (hv1,
hv2) on one real PostgreSQL database, a real ovmd agent behind each host's VM
(tests/hostbridge/pool_harness.py), and cockpit-ws serving the page against hv1's API socket.
hv1 lists the whole pool, each VM with the host that runs it; the page shows that host in a Host
column (only in a pool: test_page.py checks that a single host's page has none) and in the VM's
summary.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.cockpit.cockpit_harness import (
    DEADLINE,
    CockpitWs,
    Tab,
    chromium,
    new_tab,
    require_browser_and_cockpit,
)
from tests.hostbridge.pool_harness import Pool
from tests.support.postgres import PostgresCluster
from tests.support.tempdirs import short_tempdir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
expect.set_options(timeout=DEADLINE * 1000)

HOSTS = ("hv1", "hv2")
PLACES = {"web1": "hv1", "db1": "hv2"}  # each VM and the host whose libvirt runs it
PAGE_HOST = "hv1"  # the bridge whose API socket the page uses
LOG_TAIL = 100  # lines of each bridge's log printed with a failing test


@dataclass
class PoolPage:
    pool: Pool
    ws: CockpitWs
    tab: Tab


@pytest.fixture
def pool_page(postgres_server: PostgresCluster) -> Iterator[PoolPage]:
    """The pool with its two VMs booted (each known to both bridges with its host), cockpit-ws on
    hv1's socket, and a browser tab. Started here, stopped here; the bridges' logs are printed
    on the way out (pytest shows them when the test failed)."""
    require_browser_and_cockpit()
    with ExitStack() as stack:
        database = "cockpit_pool_page_%s" % uuid.uuid4().hex[:8]  # one a test
        pool = stack.enter_context(Pool(postgres_server, database, hosts=HOSTS))
        stack.callback(_print_logs, pool)
        pool.start()
        for vm, host in PLACES.items():
            pool.start_vm(vm, host)
        ws = stack.enter_context(closing(CockpitWs(pool.bridges[PAGE_HOST].api_socket)))
        ws.start().wait_ready()
        profile = short_tempdir("ovmd-chromium-")
        stack.callback(shutil.rmtree, profile, ignore_errors=True)
        browser = stack.enter_context(chromium(profile))
        tab = stack.enter_context(new_tab(browser))
        yield PoolPage(pool, ws, tab)


def _print_logs(pool: Pool) -> None:
    for name, bridge in pool.bridges.items():
        lines = bridge.log().splitlines()
        print("----- bridge %s (last %d lines) -----" % (name, LOG_TAIL))
        print("\n".join(lines[-LOG_TAIL:]))


def vm_row(page: Any, vm: str) -> Any:
    return page.locator('#vms tbody tr[data-vm="%s"]' % vm)


def test_the_page_of_a_pool_bridge_should_show_the_host_of_every_vm_of_the_pool(
    pool_page: PoolPage,
) -> None:
    # The API's word first: hv1 lists hv2's VM with its host.
    listed = {name: vm["host"] for name, vm in pool_page.pool.vm_list(PAGE_HOST).items()}
    assert listed == PLACES

    page = pool_page.tab.page
    page.goto(pool_page.ws.page_url("db1"))
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator("#vms tbody tr")).to_have_count(len(PLACES))

    # A Host column, a header cell of its own, second as in `vmmessage list`.
    host_header = page.locator("#vms-host")
    expect(host_header).to_be_visible()
    expect(host_header).to_have_attribute("scope", "col")
    headers = page.locator("#vms thead th:visible")
    expect(headers).to_have_text(["Name", "Host", "Run state", "Agent", "Last seen", "Queued"])
    for vm, host in PLACES.items():
        cells = vm_row(page, vm).locator("td")
        expect(cells).to_have_count(6)
        expect(cells.nth(1)).to_have_text(host)
        expect(cells.nth(1)).to_have_class("host")

    # The selected VM's summary says which host runs it: hv2, through hv1's API.
    expect(page.locator("#detail-title")).to_have_text("db1")
    expect(page.locator("#summary dd.host")).to_have_text("hv2")
    expect(page.locator("#summary dt").first).to_have_text("Host")

    # Another VM, chosen from the list: the summary follows.
    vm_row(page, "web1").locator("a").click()
    expect(page.locator("#detail-title")).to_have_text("web1")
    expect(page.locator("#summary dd.host")).to_have_text("hv1")
    assert pool_page.tab.errors == []


def test_the_page_should_follow_vms_of_other_hosts_as_they_appear_and_move(
    pool_page: PoolPage,
) -> None:
    page = pool_page.tab.page
    page.goto(pool_page.ws.page_url("web1"))
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator("#vms tbody tr")).to_have_count(len(PLACES))

    # A VM boots on hv2, not the page's host: it appears, with its host, without a reload.
    pool = pool_page.pool
    app = pool.start_vm("app1", "hv2")
    expect(vm_row(page, "app1").locator("td").nth(1)).to_have_text("hv2")

    # It migrates to hv1: its Host cell follows (hv1's stream tells the handoff), and so does
    # its summary once chosen.
    pool.migrate(app, "hv1")
    expect(vm_row(page, "app1").locator("td").nth(1)).to_have_text("hv1")
    vm_row(page, "app1").locator("a").click()
    expect(page.locator("#summary dd.host")).to_have_text("hv1")
    assert pool_page.tab.errors == []
