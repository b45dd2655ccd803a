"""The report of a run to the host, in guest keys (org.ovmd.template-config.*): the state, each
module's outcome as it ends, the first error, and the host's request name echoed. The first boot
reports, and so does a run of `ovm-template-config` on the agent's keys (`ovmd -s reconfigure`),
so that the host sees the outcome of either with `vmmessage query` or `configure --wait`."""

from __future__ import annotations

import re

from ovmproto.templatekeys import is_secret

from . import ERROR_KEY, MODULE_KEY_PREFIX, REPORT_PREFIX, REQUEST_KEY, RUN_KEY, STATE_KEY
from .agent import Agent
from .common import TemplateError
from .plugins import Registry
from .runner import ModuleResult, enumerate_module, selected

LIMIT = 1000  # characters of an error kept in a key


def outcome(r: ModuleResult) -> str:
    return "ok" if r.status == "ok" else "%s: %s" % (r.status, r.error)


class Reporter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.run_id = ""

    def reset(self, state: str) -> None:
        """Forget an earlier run's report; say ``state`` (waiting, running)."""
        for key in self.agent.keys():
            if key.startswith(REPORT_PREFIX) and key != REQUEST_KEY:
                self.agent.delete(key)
        self.agent.put({STATE_KEY: state})

    def running(self, pairs: dict[str, str]) -> None:
        self.run_id = pairs.get(REQUEST_KEY, "")
        self.agent.put({STATE_KEY: "running", RUN_KEY: self.run_id})

    def module(self, r: ModuleResult) -> None:
        self.agent.put({MODULE_KEY_PREFIX + r.name: outcome(r)[:LIMIT]})

    def forget_secrets(self, registry: Registry, keys: list[str]) -> None:
        """Delete from the agent's cache the secrets among ``keys`` (secret_keys), once used."""
        for key in secret_keys(registry, keys):
            self.agent.delete(key)

    def finish(self, results: list[ModuleResult]) -> str:
        """The final state (done or failed), reported with the first error."""
        failed = [r for r in results if r.status != "ok"]
        error = "%s: %s" % (failed[0].name, failed[0].error) if failed else ""
        state = "failed" if failed else "done"
        self.failed(state, error)
        return state

    def failed(self, state: str, error: str) -> None:
        """The final ``state`` with ``error`` (one line, cut at LIMIT characters)."""
        self.agent.put({STATE_KEY: state, ERROR_KEY: error[:LIMIT], RUN_KEY: self.run_id})


def secret_keys(registry: Registry, keys: list[str]) -> list[str]:
    """The keys among ``keys`` that hold a secret: the root and account passwords, and any key a
    module of `configure` declares a password, whatever its index (.N)."""
    patterns: set[str] = set()
    for _, plugin in selected(registry, "configure"):
        try:
            params = enumerate_module(plugin, "configure", timeout=60)
        except TemplateError:
            continue
        for p in params:
            if isinstance(p, dict) and p.get("password") and isinstance(p.get("key"), str):
                patterns.add(re.sub(r"\.\d+$", "", p["key"]))
    return [k for k in keys if is_secret(k) or re.sub(r"\.\d+$", "", k) in patterns]
