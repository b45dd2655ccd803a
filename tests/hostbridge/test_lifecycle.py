"""hostbridge.lifecycle: the pure mapping of libvirt's codes, checked against every constant of
libvirt-python; the follower without libvirt-python or without libvirtd; and the follower and the
bridge's wiring against libvirt's real in-process test driver (test:///default: a real libvirt,
one running domain named "test", lifecycle events included), across several event loops."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys

import pytest

from hostbridge import lifecycle
from hostbridge.bridge import Bridge
from hostbridge.config import Config, VmSpec
from hostbridge.lifecycle import RUN_STATES, Lifecycle, LifecycleEvent, event_state, listed_state
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

# What each lifecycle event means, written by libvirt's names (the module keys its table by code).
EXPECTED_EVENTS = {
    "DEFINED_ADDED": None,
    "DEFINED_UPDATED": None,
    "DEFINED_RENAMED": None,
    "DEFINED_FROM_SNAPSHOT": None,
    "UNDEFINED_REMOVED": None,
    "UNDEFINED_RENAMED": None,
    "STARTED_BOOTED": "running",
    "STARTED_MIGRATED": "migrating",
    "STARTED_RESTORED": "running",
    "STARTED_FROM_SNAPSHOT": "running",
    "STARTED_WAKEUP": "running",
    "SUSPENDED_PAUSED": "paused",
    "SUSPENDED_MIGRATED": "migrating",
    "SUSPENDED_IOERROR": "paused",
    "SUSPENDED_WATCHDOG": "paused",
    "SUSPENDED_RESTORED": "paused",
    "SUSPENDED_FROM_SNAPSHOT": "paused",
    "SUSPENDED_API_ERROR": "paused",
    "SUSPENDED_POSTCOPY": "migrating",
    "SUSPENDED_POSTCOPY_FAILED": "paused",
    "RESUMED_UNPAUSED": "running",
    "RESUMED_MIGRATED": "running",
    "RESUMED_FROM_SNAPSHOT": "running",
    "RESUMED_POSTCOPY": "migrating",
    "RESUMED_POSTCOPY_FAILED": "running",
    "STOPPED_SHUTDOWN": "shutoff",
    "STOPPED_DESTROYED": "shutoff",
    "STOPPED_CRASHED": "crashed",
    "STOPPED_MIGRATED": "shutoff",
    "STOPPED_SAVED": "shutoff",
    "STOPPED_FAILED": "shutoff",
    "STOPPED_FROM_SNAPSHOT": "shutoff",
    "SHUTDOWN_FINISHED": None,
    "SHUTDOWN_GUEST": None,
    "SHUTDOWN_HOST": None,
    "PMSUSPENDED_MEMORY": "paused",
    "PMSUSPENDED_DISK": "paused",
    "CRASHED_PANICKED": "crashed",
    "CRASHED_CRASHLOADED": None,
}

# virDomainGetState's (state, reason), by libvirt's names: the state's run state unless listed.
EXPECTED_STATES = {
    "NOSTATE": "unknown",
    "RUNNING": "running",
    "BLOCKED": "running",
    "PAUSED": "paused",
    "SHUTDOWN": "running",
    "SHUTOFF": "shutoff",
    "CRASHED": "crashed",
    "PMSUSPENDED": "paused",
}
EXPECTED_REASONS = {
    "RUNNING_POSTCOPY": "migrating",
    "PAUSED_MIGRATION": "migrating",
    "PAUSED_POSTCOPY": "migrating",
    "SHUTOFF_CRASHED": "crashed",
}
# VIR_DOMAIN_SHUTDOWN_* also names the modes of virDomainShutdownFlags; only these are reasons.
SHUTDOWN_REASONS = {"VIR_DOMAIN_SHUTDOWN_UNKNOWN", "VIR_DOMAIN_SHUTDOWN_USER"}


def _libvirt():
    return pytest.importorskip("libvirt")


def _constants(libvirt, pattern):
    return {
        name: getattr(libvirt, name)
        for name in dir(libvirt)
        if re.match(pattern, name) and isinstance(getattr(libvirt, name), int)
    }


# -- the pure mapping ------------------------------------------------------------------------------


def test_it_should_know_every_lifecycle_event_type_libvirt_has_by_its_code():
    libvirt = _libvirt()
    types = _constants(libvirt, r"^VIR_DOMAIN_EVENT_[A-Z]+$")
    assert {code: name[len("VIR_DOMAIN_EVENT_") :] for name, code in types.items()} == (
        lifecycle.EVENTS
    )


def test_it_should_map_every_lifecycle_event_and_detail_of_libvirt_to_its_state_and_name():
    libvirt = _libvirt()
    seen = set()
    for code, event in lifecycle.EVENTS.items():
        details = _constants(libvirt, r"^VIR_DOMAIN_EVENT_%s_[A-Z_]+$" % event)
        details.pop("VIR_DOMAIN_EVENT_%s_LAST" % event, None)
        assert details, event
        for constant, detail in details.items():
            name = constant[len("VIR_DOMAIN_EVENT_") :]
            state, event_name, detail_name = event_state(code, detail)
            assert (event_name, detail_name) == (event, name)
            assert state == EXPECTED_EVENTS[name], name
            seen.add(name)
    # Every expectation is a detail libvirt has, and the module maps no detail libvirt lacks.
    assert seen == set(EXPECTED_EVENTS)
    assert sum(len(d) for d in lifecycle.DETAILS.values()) == len(seen)
    assert {s for s in EXPECTED_EVENTS.values() if s} <= set(RUN_STATES)


def test_it_should_change_nothing_for_codes_a_newer_libvirt_may_add():
    assert event_state(3, 99) == (None, "SUSPENDED", "SUSPENDED_99")
    assert event_state(42, 0) == (None, "EVENT_42", "EVENT_42_0")
    assert listed_state(42, 1) == ("unknown", "STATE_42_1")
    assert listed_state(3, 99) == ("paused", "PAUSED_99")


def test_it_should_map_every_domain_state_and_reason_of_libvirt():
    libvirt = _libvirt()
    states = {
        name: code
        for name, code in _constants(libvirt, r"^VIR_DOMAIN_[A-Z]+$").items()
        if name[len("VIR_DOMAIN_") :] in EXPECTED_STATES
    }
    assert {code: name[len("VIR_DOMAIN_") :] for name, code in states.items()} == lifecycle.STATES
    seen = set()
    for constant, code in states.items():
        state = constant[len("VIR_DOMAIN_") :]
        reasons = _constants(libvirt, r"^%s_[A-Z_]+$" % constant)
        reasons.pop(constant + "_LAST", None)
        if state == "SHUTDOWN":
            reasons = {n: c for n, c in reasons.items() if n in SHUTDOWN_REASONS}
        if state == "PMSUSPENDED":  # VIR_DOMAIN_PMSUSPENDED_DISK_* is another enum
            reasons = {n: c for n, c in reasons.items() if "_DISK_" not in n}
        assert reasons, state
        for reason_constant, reason in reasons.items():
            name = reason_constant[len("VIR_DOMAIN_") :]
            expected = EXPECTED_REASONS.get(name, EXPECTED_STATES[state])
            assert listed_state(code, reason) == (expected, name)
            seen.add(name)
    assert set(EXPECTED_REASONS) <= seen
    assert sum(len(r) for r in lifecycle.REASONS.values()) == len(seen)


# -- without libvirt ----------------------------------------------------------------------------


def test_it_should_leave_every_state_unknown_with_one_log_line_when_libvirt_python_is_missing(
    monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt -> ImportError
    events = []

    async def main():
        lc = Lifecycle("test:///default", events.append)
        await lc.start()
        await lc.start()
        assert lc.state("test") == lifecycle.UNKNOWN
        assert (lc.state("test").state, lc.states(), lc.connected) == ("unknown", {}, False)
        await lc.stop()

    with caplog.at_level(logging.INFO, logger="hostbridge.lifecycle"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "hostbridge.lifecycle"]
    assert len(lines) == 1 and "libvirt-python is not installed" in lines[0], lines
    assert events == []


def test_it_should_keep_trying_an_unreachable_libvirtd_and_log_it_once(
    monkeypatch, caplog, short_dir
):
    _libvirt()
    monkeypatch.setattr(lifecycle, "RECONNECT_FIRST", 0.01)
    monkeypatch.setattr(lifecycle, "RECONNECT_MAX", 0.02)
    attempts = []
    original = Lifecycle._connect

    def counted(self, gen):
        attempts.append(gen)
        return original(self, gen)

    monkeypatch.setattr(Lifecycle, "_connect", counted)
    uri = "qemu:///system?socket=%s" % os.path.join(short_dir, "no-libvirtd.sock")

    async def main():
        lc = Lifecycle(uri, lambda ev: None)
        await lc.start()
        await async_wait_for(lambda: len(attempts) >= 5, what="reconnect attempts")
        assert (lc.state("test").state, lc.connected) == ("unknown", False)
        await lc.stop()

    with caplog.at_level(logging.INFO, logger="hostbridge.lifecycle"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.name == "hostbridge.lifecycle" and r.levelno >= 30]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "no-libvirtd.sock" in warnings[0].getMessage()


# -- against libvirt's test driver ----------------------------------------------------------------


class DomainUnderTest:
    """A connection of the test's own to test:///default, to act on its domain "test"; the
    domain is left running (the driver's state lives as long as a connection to it is open)."""

    def __init__(self):
        libvirt = _libvirt()
        self.conn = libvirt.open("test:///default")
        self.dom = self.conn.lookupByName("test")

    async def do(self, what):
        await asyncio.to_thread(getattr(self.dom, what))

    def close(self):
        state = self.dom.state()[0]
        if state == 3:
            self.dom.resume()
        elif state == 5:
            self.dom.create()
        self.conn.close()


@pytest.fixture
def test_domain():
    d = DomainUnderTest()
    try:
        yield d
    finally:
        d.close()


def test_it_should_list_the_domains_then_follow_their_events_with_libvirts_names(test_domain):
    events: list[LifecycleEvent] = []

    async def main():
        lc = Lifecycle("test:///default", events.append)
        await lc.start()
        try:
            assert lc.connected
            assert lc.state("test").state == "running"
            assert lc.state("not-a-domain").state == "unknown"
            for action, state, detail in [
                ("suspend", "paused", "SUSPENDED_PAUSED"),
                ("resume", "running", "RESUMED_UNPAUSED"),
                ("destroy", "shutoff", "STOPPED_DESTROYED"),
                ("create", "running", "STARTED_BOOTED"),
            ]:
                await test_domain.do(action)
                await async_wait_for(lambda s=state: lc.state("test").state == s, what=action)
                assert lc.state("test").reason == detail
        finally:
            await lc.stop()
        assert lc.states() == {}

    asyncio.run(main())
    assert events[0].event == "LISTED" and events[0].state == "running" and events[0].changed
    uuid = test_domain.dom.UUIDString()
    assert [(e.name, e.uuid, e.state, e.event, e.detail) for e in events[1:] if e.changed] == [
        ("test", uuid, "paused", "SUSPENDED", "SUSPENDED_PAUSED"),
        ("test", uuid, "running", "RESUMED", "RESUMED_UNPAUSED"),
        ("test", uuid, "shutoff", "STOPPED", "STOPPED_DESTROYED"),
        ("test", uuid, "running", "STARTED", "STARTED_BOOTED"),
    ]


def test_it_should_follow_in_each_of_several_event_loops_and_survive_a_failing_consumer(
    test_domain,
):
    """libvirt keeps the first event implementation of the process: a second loop (a second
    asyncio.run, as here and in any test suite) must still get its events."""

    def broken(ev):
        raise RuntimeError("consumer bug")

    async def one_round(action, state):
        lc = Lifecycle("test:///default", broken)
        await lc.start()
        try:
            await test_domain.do(action)
            await async_wait_for(lambda: lc.state("test").state == state, what=action)
        finally:
            await lc.stop()

    asyncio.run(one_round("suspend", "paused"))
    asyncio.run(one_round("resume", "running"))


def test_the_bridge_should_show_and_publish_the_run_state_of_its_libvirt_vms(
    test_domain, short_dir
):
    """A bridge with a libvirt URI: the VM named like the domain has its run state in VmInfo,
    every change is a vm.state event and a send answer carries it; a VM that is no domain stays
    unknown."""
    config = Config(
        vms=[
            VmSpec("test", "unix:" + os.path.join(short_dir, "test.sock"), "flag"),
            VmSpec("static", "unix:" + os.path.join(short_dir, "static.sock"), "flag"),
        ],
        db=os.path.join(short_dir, "bridge.sqlite3"),
        libvirt_uri="test:///default",
    )
    assert not config.discovery_enabled and config.libvirt_enabled

    async def main():
        bridge = Bridge(config)
        await bridge.start()
        try:
            since = bridge.events.last_id
            assert bridge.vm("test").run_state == "running"
            assert bridge.vm("static").run_state == "unknown"
            await test_domain.do("destroy")
            await async_wait_for(lambda: bridge.vm("test").run_state == "shutoff", what="stop")
            answer = await bridge.send("test", "k", "v")
            assert (answer.outcome, answer.run_state) == ("queued", "shutoff")
            assert answer.to_json()["run_state"] == "shutoff"
            await test_domain.do("create")
            await async_wait_for(lambda: bridge.vm("test").run_state == "running", what="start")
            states = [
                (e.vm, e.fields["run_state"], e.fields["reason"])
                for e in bridge.events.after(since).events
                if e.type == "vm.state"
            ]
            assert states == [
                ("test", "shutoff", "STOPPED_DESTROYED"),
                ("test", "running", "STARTED_BOOTED"),
            ]
            assert [v.run_state for v in bridge.vms()] == ["unknown", "running"]
        finally:
            await bridge.stop()

    asyncio.run(main())
