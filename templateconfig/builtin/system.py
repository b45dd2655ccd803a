"""Module `system`: `cleanup` seals the image, last (priority 90), so that its next boot is a first
boot that configures again:

- /etc/machine-id emptied (systemd makes a new one at the next boot) and D-Bus's copy removed;
- logs: the journal's files and the run log of template configuration removed, *.log emptied;
- the agent's cache cleared (the host's keys, the root password among them);
- INITIAL_CONFIG=yes in the first boot's settings file.
Takes no keys."""

from __future__ import annotations

import os

from .. import LOG_FILE, SETTINGS_FILE
from .base import Module, Pairs, Param, System


def params(target: str) -> list[Param]:
    return []


def set_setting(system: System, name: str, value_: str) -> None:
    """Set NAME=VALUE in the first boot's settings file, keeping its other lines."""
    lines = system.read(SETTINGS_FILE).splitlines()
    out = [ln for ln in lines if not ln.strip().startswith(name + "=")]
    out.append("%s=%s" % (name, value_))
    system.write(SETTINGS_FILE, "\n".join(out) + "\n")


def _logs(system: System) -> None:
    system.remove(LOG_FILE)
    journal = system.path("/var/log/journal")
    for dirpath, _, files in os.walk(journal):
        for f in files:
            if f.endswith((".journal", ".journal~")):
                os.unlink(os.path.join(dirpath, f))
    log_dir = system.path("/var/log")
    for dirpath, _, files in os.walk(log_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(".log") and os.path.isfile(path) and not os.path.islink(path):
                with open(path, "w"):
                    pass  # emptied, not removed: its owner and mode stay what the package set


def cleanup(pairs: Pairs, system: System) -> None:
    if system.exists("/etc/machine-id"):
        system.write("/etc/machine-id", "", 0o444)
    if os.path.isfile(system.path("/var/lib/dbus/machine-id")) and not os.path.islink(
        system.path("/var/lib/dbus/machine-id")
    ):
        system.remove("/var/lib/dbus/machine-id")
    _logs(system)
    set_setting(system, "INITIAL_CONFIG", "yes")
    if system.root in ("", "/") and not system.command_log:
        _clear_agent_cache()
    else:
        system.run(["ovmd", "-x"])


def _clear_agent_cache() -> None:
    from guestagent.client import ClientError
    from guestagent.config import ConfigError

    from ..agent import Agent, socket_path

    try:
        Agent(socket_path()).clear()
    except (ClientError, ConfigError):
        pass  # no agent running: its cache lives in /run and is gone at the next boot anyway


MODULE = Module(params, {"cleanup": cleanup})

if __name__ == "__main__":
    MODULE.main()
