"""The Cockpit page's rig, shared by the module's tests: a real bridge (a process) with two VMs on
pty channels, a real ovmd agent on each, cockpit-ws serving the page from the checkout, and
chromium; each test gets a fresh tab. Everything is started here and stopped here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any

import pytest

from hostbridge.apiclient import Client
from tests.cockpit.cockpit_harness import (
    DEADLINE,
    CockpitWs,
    Tab,
    chromium,
    new_tab,
    require_browser_and_cockpit,
)
from tests.hostbridge.bridge_harness import BridgeProc
from tests.support.agent import Agent
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import wait_for

VMS = ("web1", "db1")
FACTS_VM = "db1"


@dataclass
class Rig:
    bridge: BridgeProc
    api: Client
    agents: dict[str, Agent]
    ws: CockpitWs
    browser: Any  # playwright's BrowserContext

    def wait_agent(self, vm: str, wanted: str) -> None:
        """Until the bridge itself says ``vm``'s agent is ``wanted`` (connected...)."""
        wait_for(
            lambda: self.api.vm(vm)["agent"] == wanted,
            DEADLINE,
            interval=0.1,
            what="the bridge to see %s's agent %s" % (vm, wanted),
        )


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    require_browser_and_cockpit()
    with ExitStack() as stack:
        channels = short_tempdir()
        stack.callback(shutil.rmtree, channels, ignore_errors=True)
        bridge = stack.enter_context(
            closing(BridgeProc({vm: "pty:" + os.path.join(channels, vm) for vm in VMS}))
        )
        bridge.start().wait_ready(DEADLINE)
        agents = {}
        for vm in VMS:
            # db1's agent publishes the guest facts (this machine's, as seen from its agent).
            args = ["--facts", "yes"] if vm == FACTS_VM else []
            agents[vm] = stack.enter_context(closing(Agent(os.path.join(channels, vm), args=args)))
            agents[vm].start().wait_ready(DEADLINE)
        ws = stack.enter_context(closing(CockpitWs(bridge.api_socket)))
        ws.start().wait_ready()
        profile = short_tempdir("ovmd-chromium-")
        stack.callback(shutil.rmtree, profile, ignore_errors=True)
        browser = stack.enter_context(chromium(profile))
        rig = Rig(bridge, Client(bridge.api_socket), agents, ws, browser)
        for vm in VMS:
            rig.wait_agent(vm, "connected")
        yield rig


@pytest.fixture
def tab(rig: Rig) -> Iterator[Tab]:
    with new_tab(rig.browser) as tab:
        yield tab
