"""`ovm-template-initial-config`: the first boot's configuration, run once by
ovm-template-initial-config.service when the settings file says INITIAL_CONFIG=yes.

1. Wait for the agent's socket (the agent starts when its port appears), then for the key that
   completes the host's input, the root password, sent last (the agent's own wait: no polling),
   for INITIAL_CONFIG_TIMEOUT seconds (default 900; 0: for as long as it takes).
2. Run `configure` with every key the agent holds, reporting each module's outcome as it ends.
3. Delete the secrets from the agent's cache: every key a module declares a password (and the
   same key for other indexes), whatever the outcome.
4. Set INITIAL_CONFIG=no: a first boot configures once, even when a module failed (the report
   says which; `ovmd -s reconfigure` runs again after a fix).
On a timeout nothing is configured and the flag stays yes, but missing ssh host keys are made, so
that the VM is reachable as far as it can be.

The report, in keys the guest sets (the host reads them with `vmmessage query`):
    org.ovmd.template-config.state        waiting, running, done, failed or timeout
    org.ovmd.template-config.module.NAME  ok, or failed: ERROR / timeout: ERROR
    org.ovmd.template-config.error        the first module's error in one line ('' if none)
    org.ovmd.template-config.run          the host's org.ovmd.template-config.request, echoed
Exit status: 0 configured (or not armed); 1 a module failed; 3 no agent; 4 timed out.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence

from . import (
    ROOT_PASSWORD_KEY,
    SETTINGS_FILE,
    TEMPLATE_DIR,
)
from .agent import Agent, socket_path
from .common import read_file, write_file
from .log import Log
from .plugins import Registry
from .report import Reporter, outcome
from .runner import ModuleResult, run_target

DEFAULT_TIMEOUT = 900.0
AGENT_WAIT = 300.0  # for the agent's socket to appear
EXIT_FAILED, EXIT_AGENT, EXIT_TIMEOUT = 1, 3, 4


def read_settings(path: str = SETTINGS_FILE) -> dict[str, str]:
    """NAME=VALUE lines (shell style: quotes stripped, # comments skipped)."""
    out = {}
    for line in read_file(path).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, val = line.partition("=")
        out[name.strip()] = val.strip().strip("'\"")
    return out


def write_setting(path: str, name: str, value: str) -> None:
    lines = [ln for ln in read_file(path).splitlines() if not ln.strip().startswith(name + "=")]
    write_file(path, "\n".join(lines + ["%s=%s" % (name, value)]) + "\n", 0o644)


def _wait_for_socket(path: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)  # the agent is not up yet (udev starts it when the port appears)
        finally:
            s.close()


def main(argv: Sequence[str] | None = None) -> int:
    from guestagent.client import ClientError

    try:
        return run()
    except ClientError as e:  # the agent went away or refused: one line, and the run is over
        sys.stderr.write("ovm-template-initial-config: the agent: %s\n" % e)
        return EXIT_AGENT


def run() -> int:
    settings_file = os.environ.get("OVM_TEMPLATE_SETTINGS", SETTINGS_FILE)
    template_dir = os.environ.get("OVM_TEMPLATE_DIR", TEMPLATE_DIR)
    settings = read_settings(settings_file)
    if settings.get("INITIAL_CONFIG", "no").lower() != "yes":
        print("first boot configuration is not armed (INITIAL_CONFIG=yes in %s)" % settings_file)
        return 0
    log = Log()
    try:
        timeout = float(settings.get("INITIAL_CONFIG_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        timeout = DEFAULT_TIMEOUT
    trigger = settings.get("INITIAL_CONFIG_KEY") or ROOT_PASSWORD_KEY
    path = socket_path(settings.get("OVMD_CONFIG") or None)
    if not _wait_for_socket(path, AGENT_WAIT):
        log.line("first boot: no agent at %s" % path)
        sys.stderr.write("ovm-template-initial-config: no agent at %s\n" % path)
        return EXIT_AGENT
    agent = Agent(path)
    registry = Registry(template_dir)
    reporter = Reporter(agent)
    reporter.reset("waiting")
    log.line("first boot: waiting for %s" % trigger)
    print("waiting for %s from the host" % trigger, flush=True)
    started = time.monotonic()
    from guestagent.client import DaemonError

    try:
        agent.wait(trigger, timeout if timeout > 0 else None)
    except DaemonError as e:
        if e.code != "timeout":
            raise
        why = "%s did not arrive within %gs" % (trigger, timeout)
        log.line("first boot: " + why)
        if "ssh" in registry.installed():
            run_target(registry, "configure", {}, only="ssh")
        reporter.failed("timeout", why)
        sys.stderr.write("ovm-template-initial-config: %s\n" % why)
        return EXIT_TIMEOUT
    pairs = agent.keys()
    reporter.running(pairs)
    log.line("first boot: configure (%d keys)" % len(pairs))

    def report(r: ModuleResult) -> None:
        log.line("first boot: %s %s" % (r.name, outcome(r)))
        print("%s: %s" % (r.name, outcome(r)), flush=True)
        reporter.module(r)

    try:
        _, results = run_target(registry, "configure", pairs, on_result=report)
    finally:
        reporter.forget_secrets(registry, list(pairs))
        write_setting(settings_file, "INITIAL_CONFIG", "no")
    state = reporter.finish(results)
    log.line("first boot: %s in %.1fs" % (state, time.monotonic() - started))
    print("template configuration %s" % state, flush=True)
    return EXIT_FAILED if state != "done" else 0
