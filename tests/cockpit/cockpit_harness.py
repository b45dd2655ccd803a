"""Real parts for the Cockpit page's tests: cockpit-ws serving the page from this checkout, and
Debian's chromium driven by Playwright.

cockpit-ws runs in its local-session mode (no login: it starts cockpit-bridge as this user) on
127.0.0.1 and a free port, without TLS. The page is found, and pointed at the test's bridge, the
way an operator's own overrides would be, through the XDG directories cockpit-bridge honours,
set in cockpit-ws's environment only (never /usr/share, /etc or /run):

    XDG_DATA_HOME/cockpit/hostbridge            -> <checkout>/cockpit/hostbridge (a symlink)
    XDG_CONFIG_DIRS/cockpit/hostbridge.override.json   {"config": {"api_socket": <the test's>}}
    XDG_CONFIG_HOME                              an empty directory (not root's ~/.config)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support.processes import ROOT, Process
from tests.support.waiting import wait_for

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
CHROMIUM = "/usr/bin/chromium"
PAGE_SOURCE = os.path.join(ROOT, "cockpit", "hostbridge")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEADLINE = 60.0  # seconds for a process or the page to come up on a loaded 2-core machine


def require_browser_and_cockpit() -> None:
    """Skip unless chromium and cockpit-ws are installed (scripts/bootstrap.sh installs both)."""
    missing = [p for p in (CHROMIUM, COCKPIT_WS) if not os.access(p, os.X_OK)]
    if not shutil.which("cockpit-bridge"):
        missing.append("cockpit-bridge")
    if missing:
        pytest.skip("missing %s (scripts/bootstrap.sh --test installs them)" % ", ".join(missing))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CockpitWs(Process):
    """cockpit-ws in local-session mode serving the page from the checkout, configured to reach
    the bridge API socket ``api_socket``."""

    def __init__(self, api_socket: str):
        super().__init__()
        self.port = free_port()
        data = os.path.join(self.dir, "data")
        config_dirs = os.path.join(self.dir, "etc")
        config_home = os.path.join(self.dir, "home-config")
        os.makedirs(os.path.join(data, "cockpit"))
        os.makedirs(os.path.join(config_dirs, "cockpit"))
        os.makedirs(config_home)
        os.symlink(PAGE_SOURCE, os.path.join(data, "cockpit", "hostbridge"))
        override = os.path.join(config_dirs, "cockpit", "hostbridge.override.json")
        with open(override, "w", encoding="utf-8") as f:
            json.dump({"config": {"api_socket": api_socket}}, f)
        self.env = {
            "XDG_DATA_HOME": data,
            "XDG_CONFIG_DIRS": config_dirs,
            "XDG_CONFIG_HOME": config_home,
        }

    def command(self) -> list[str]:
        return [
            COCKPIT_WS,
            "--local-session=cockpit-bridge",
            "--no-tls",
            "--address",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    @property
    def base(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def page_url(self, vm: str | None = None) -> str:
        """The page's address, standalone (not framed by the shell), ``vm`` selected."""
        url = self.base + "/cockpit/@localhost/hostbridge/index.html"
        return url + ("#/" + vm if vm else "")

    def manifests(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            self.base + "/cockpit/@localhost/manifests.json", timeout=10
        ) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = DEADLINE) -> CockpitWs:
        """Until cockpit-ws answers and its bridge lists the page (with the test's socket)."""

        def ready() -> bool:
            if not self.running:
                raise AssertionError("cockpit-ws exited:\n" + self.log())
            try:
                return "hostbridge" in self.manifests()
            except OSError:
                return False

        wait_for(ready, timeout, interval=0.2, what="cockpit-ws to serve the page")
        return self


@contextmanager
def chromium(user_data_dir: str) -> Iterator[Any]:
    """Debian's chromium, headless, through Playwright: a browser context on a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
            timeout=DEADLINE * 1000,
        )
        try:
            context.set_default_timeout(DEADLINE * 1000)
            yield context
        finally:
            context.close()


@dataclass
class Tab:
    """One browser tab on the page, and what the page said on its console."""

    page: Any  # playwright's Page
    errors: list[str] = field(default_factory=list)


@contextmanager
def new_tab(browser: Any) -> Iterator[Tab]:
    """A fresh tab of ``browser`` (a BrowserContext) that records the page's errors and its
    console's error messages; closed on the way out."""
    page = browser.new_page()
    tab = Tab(page)
    page.on("pageerror", lambda exc: tab.errors.append("page error: %s" % exc))
    page.on(
        "console",
        lambda msg: (
            tab.errors.append("console %s: %s" % (msg.type, msg.text))
            if msg.type == "error"
            else None
        ),
    )
    try:
        yield tab
    finally:
        page.close()
