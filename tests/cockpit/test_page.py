"""The Cockpit page in a real browser: chromium on the page served by a real cockpit-ws, in front
of a real bridge and real ovmd agents (conftest.py). What an operator does on the page reaches
the guest; what happens in a guest or to its agent reaches the page through the bridge's change
stream, without a reload; what a guest writes is shown as text and never runs.

OVMD_COCKPIT_SCREENSHOT=docs/cockpit.png saves the README's screenshot from the first test.
"""

from __future__ import annotations

import os
import socket
from contextlib import closing

import pytest
from playwright.sync_api import expect

from tests.cockpit.cockpit_harness import DEADLINE, CockpitWs
from tests.cockpit.conftest import FACTS_VM
from tests.hostbridge.bridge_harness import BridgeProc
from tests.support.processes import ROOT
from tests.support.tempdirs import short_dir
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
expect.set_options(timeout=DEADLINE * 1000)

# The cells of the keys table's row for a key (null when there is none): found by the row's
# data-key property, compared in the page, so that no key has to be written as a selector.
KEY_ROW = """key => {
    const tr = Array.from(document.querySelectorAll("#keys tbody tr"))
        .find(row => row.dataset.key === key);
    if (!tr) return null;
    const text = cls => tr.querySelector("td." + cls).textContent;
    return {key: text("key"), value: text("value"), origin: text("origin")};
}"""
AUDIT_ROWS = """() => Array.from(document.querySelectorAll("#audit tbody tr")).map(tr => ({
    key: tr.querySelector("td.key").textContent,
    outcome: tr.querySelector("td.outcome").textContent,
    value: tr.querySelector("td.value").textContent,
}))"""


def open_page(rig, tab, vm):
    """The page with ``vm`` selected, connected to the stream, its keys and audit read; marked so
    that a reload would show (the mark lives in the page's window)."""
    page = tab.page
    page.goto(rig.ws.page_url(vm))
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator("#detail-title")).to_have_text(vm)
    expect(page.locator("#vms tbody tr")).to_have_count(len(rig.agents))
    page.evaluate("() => { window.__sameDocument = true; }")
    return page


def assert_not_reloaded(page):
    assert page.evaluate("() => window.__sameDocument === true"), "the page was reloaded"


def wait_key(page, key, value):
    """Until the keys table shows ``key`` with ``value``; the row's cells."""
    page.wait_for_function(
        "([key, value]) => { const r = (%s)(key); return r !== null && r.value === value; }"
        % KEY_ROW,
        arg=[key, value],
        timeout=DEADLINE * 1000,
    )
    return page.evaluate(KEY_ROW, key)


def guest_value(agent, key):
    r = agent.ovmd("-g", key)
    return r.stdout.rstrip("\n") if r.returncode == 0 else None


def assert_clean_console(tab):
    """Nothing failed in the page: no script error, no content security policy refusal."""
    assert tab.errors == []


def send_from_form(page, key, value, log=True):
    page.fill("#send-key", key)
    page.fill("#send-value", value)
    page.set_checked("#send-nolog", not log)
    page.click("#send-button")


def test_a_message_sent_from_the_form_should_reach_the_guest_and_its_audit(rig, tab, tmp_path):
    page = open_page(rig, tab, "web1")
    agent = rig.agents["web1"]
    send_from_form(page, "app.mode", "blue")
    expect(page.locator("#send-result")).to_have_attribute("data-outcome", "delivered")
    assert guest_value(agent, "app.mode") == "blue"
    assert wait_key(page, "app.mode", "blue")["origin"] == "host"
    page.wait_for_function(
        "() => (%s)().some(r => r.key === 'app.mode' && r.value === 'blue')" % AUDIT_ROWS
    )

    # "Do not log": the guest gets the value; neither the audit nor the page shows it.
    secret = "s3cret-root-password"
    send_from_form(page, "app.secret", secret, log=False)
    expect(page.locator("#send-result")).to_have_attribute("data-outcome", "delivered")
    assert guest_value(agent, "app.secret") == secret
    page.wait_for_function(
        "() => (%s)().some(r => r.key === 'app.secret' && r.outcome === 'delivered')" % AUDIT_ROWS
    )
    [row] = [r for r in page.evaluate(AUDIT_ROWS) if r["key"] == "app.secret"]
    assert row["value"] == "(not logged)"
    assert [r["value"] for r in rig.api.audit("web1")["entries"] if r["key"] == "app.secret"] == [
        None
    ]
    assert secret not in page.inner_text("body")
    assert page.input_value("#send-value") == ""

    # A guest that reports itself, and a second VM: the README's screenshot.
    agent.ovmd("-p", "app.version=2.4.1")
    wait_key(page, "app.version", "2.4.1")
    target = os.environ.get("OVMD_COCKPIT_SCREENSHOT") or str(tmp_path / "cockpit.png")
    page.screenshot(path=os.path.join(ROOT, target), full_page=True)
    assert os.path.getsize(os.path.join(ROOT, target)) > 0
    assert_not_reloaded(page)
    assert_clean_console(tab)


def test_a_key_set_in_the_guest_should_show_without_a_reload_and_go_when_deleted(rig, tab):
    page = open_page(rig, tab, "web1")
    agent = rig.agents["web1"]
    assert agent.ovmd("-p", "guest.status=ready").returncode == 0
    assert wait_key(page, "guest.status", "ready")["origin"] == "guest"
    assert agent.ovmd("-p", "guest.status=serving").returncode == 0
    wait_key(page, "guest.status", "serving")
    assert_not_reloaded(page)

    # Delete from the page (the button asks once more): gone from the guest and from the page.
    # The key's name needs URL-encoding.
    key = "guest/odd key ü"
    assert agent.ovmd("-p", key + "=x").returncode == 0
    wait_key(page, key, "x")
    button = page.locator("#keys tbody tr", has=page.get_by_text(key, exact=True)).locator(
        "button.delete"
    )
    button.click()
    expect(button).to_have_text("Really delete?")
    button.click()
    page.wait_for_function("key => (%s)(key) === null" % KEY_ROW, arg=key)
    assert guest_value(agent, key) is None
    assert guest_value(agent, "guest.status") == "serving"
    assert_not_reloaded(page)
    assert_clean_console(tab)


def test_an_agent_that_stops_should_show_on_the_page_and_its_queue_drain_when_back(rig, tab):
    page = open_page(rig, tab, "db1")
    row = page.locator('#vms tbody tr[data-vm="db1"]')
    expect(row.locator("td.agent")).to_have_text("connected")
    expect(row.locator("td.queued")).to_have_text("0")
    agent = rig.agents["db1"]
    try:
        agent.stop()
        expect(row.locator("td.agent")).to_have_text("disconnected")
        # A message for the absent agent waits in the bridge's outbox: the list counts it.
        send_from_form(page, "after.restart", "1")
        expect(page.locator("#send-result")).to_have_attribute("data-outcome", "queued")
        expect(row.locator("td.queued")).to_have_text("1")
        expect(page.locator("#keys-note")).to_be_visible()
    finally:
        if not agent.running:
            agent.start().wait_ready(DEADLINE)
    expect(row.locator("td.agent")).to_have_text("connected")
    expect(row.locator("td.queued")).to_have_text("0")
    assert guest_value(agent, "after.restart") == "1"
    assert_not_reloaded(page)
    assert_clean_console(tab)


# A key cannot hold "=", so its markup has no attribute value; the value can hold anything.
HOSTILE_KEY = "<b>bold</b><img src onerror><script>window.__pwned_key++</script>"
HOSTILE_VALUE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
RAN_OR_PARSED = """() => ({
    pwned: window.__pwned === undefined ? null : window.__pwned,
    pwnedKey: window.__pwned_key === undefined ? null : window.__pwned_key,
    images: document.querySelectorAll("img").length,
    bold: document.querySelectorAll("b").length,
    inlineScripts: document.querySelectorAll("script:not([src])").length,
})"""
NOTHING = {"pwned": None, "pwnedKey": None, "images": 0, "bold": 0, "inlineScripts": 0}


def test_markup_a_guest_writes_should_be_shown_as_text_and_never_run(rig, tab):
    page = open_page(rig, tab, "db1")
    agent = rig.agents["db1"]
    assert agent.ovmd("-p", "%s=%s" % (HOSTILE_KEY, HOSTILE_VALUE)).returncode == 0
    # Through the stream...
    row = wait_key(page, HOSTILE_KEY, HOSTILE_VALUE)
    assert row == {"key": HOSTILE_KEY, "value": HOSTILE_VALUE, "origin": "guest"}
    assert page.evaluate(RAN_OR_PARSED) == NOTHING
    # ...and through the listing a fresh page reads.
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    assert wait_key(page, HOSTILE_KEY, HOSTILE_VALUE)["key"] == HOSTILE_KEY
    assert page.get_by_text(HOSTILE_VALUE, exact=True).count() == 1
    assert page.evaluate(RAN_OR_PARSED) == NOTHING
    assert_clean_console(tab)


def test_the_page_should_say_when_the_bridge_is_away_and_come_back_with_it(rig, tab):
    # A bridge of its own (the rig's stays up for the other tests), with a VM whose agent never
    # comes: the page follows the bridge through a restart on the same socket and database.
    with (
        short_dir() as channels,
        closing(BridgeProc({"lone": "pty:" + str(channels / "lone")})) as bridge,
        closing(CockpitWs(bridge.api_socket)) as ws,
    ):
        bridge.start().wait_ready(DEADLINE)
        ws.start().wait_ready()
        page = tab.page
        page.goto(ws.page_url("lone"))
        connection = page.locator("#connection")
        expect(connection).to_have_attribute("data-state", "connected")
        row = page.locator('#vms tbody tr[data-vm="lone"]')
        expect(row.locator("td.agent")).not_to_have_text("connected")
        page.evaluate("() => { window.__sameDocument = true; }")

        bridge.stop()
        expect(connection).to_have_attribute("data-state", "disconnected")
        expect(connection).to_contain_text("nothing listens on the socket")
        send_from_form(page, "k", "v")
        expect(page.locator("#send-result")).to_have_attribute("data-outcome", "error")

        bridge.start().wait_ready(DEADLINE)
        expect(connection).to_have_attribute("data-state", "connected")
        send_from_form(page, "k", "v")
        expect(page.locator("#send-result")).to_have_attribute("data-outcome", "queued")
        expect(row.locator("td.queued")).to_have_text("1")
        assert_not_reloaded(page)
    assert_clean_console(tab)


def test_the_guest_facts_should_show_the_agents_host_name_os_and_addresses(rig, tab):
    facts = wait_for(
        lambda: rig.api.vm(FACTS_VM)["facts"].get("hostname") and rig.api.vm(FACTS_VM)["facts"],
        what="the guest facts to reach the bridge",
    )
    assert facts["hostname"] == socket.gethostname()  # the agent runs on this machine
    page = open_page(rig, tab, FACTS_VM)
    expect(page.locator("#facts-block")).to_be_visible()
    expect(page.locator("#facts .fact-hostname")).to_have_text(facts["hostname"])
    for name in ("os_name", "os_version", "agent_version"):
        if name in facts:
            expect(page.locator("#facts .fact-" + name)).to_have_text(facts[name])
    # Each interface the agent reported has its row, with its addresses.
    for name, addresses in facts.get("interfaces", {}).items():
        row = page.locator("#interfaces tbody tr[data-interface='%s']" % name)
        expect(row.locator("td.addresses")).to_have_text(" ".join(addresses))
    # A single host, not a pool: no Host column, no host in the summary (test_page_pool.py).
    expect(page.locator("#summary dd.agent")).to_be_visible()
    expect(page.locator("#vms-host")).to_be_hidden()
    expect(page.locator("#vms td.host")).to_have_count(0)
    expect(page.locator("#summary .host")).to_have_count(0)
    assert_clean_console(tab)
