"""Module `ssh`: the server's host keys. `cleanup` deletes them, so that no two VMs made from one
template share a host key; `configure` makes the missing ones (`ssh-keygen -A`) and restarts the
server if it runs. Takes no keys."""

from __future__ import annotations

import os

from .base import Module, Pairs, Param, System

KEY_DIR = "/etc/ssh"


def params(target: str) -> list[Param]:
    return []


def host_keys(system: System) -> list[str]:
    try:
        names = os.listdir(system.path(KEY_DIR))
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("ssh_host_") and "_key" in n)


def configure(pairs: Pairs, system: System) -> None:
    if not system.has_command("ssh-keygen") or not system.exists(KEY_DIR):
        return  # no ssh server here: nothing to do
    if not any(n.endswith("_key") for n in host_keys(system)):
        root = ["-f", system.root] if system.root not in ("", "/") else []
        system.run(["ssh-keygen", "-A", *root])
        for unit in ("ssh.service", "sshd.service"):
            system.run(["systemctl", "try-restart", unit], check=False)


def cleanup(pairs: Pairs, system: System) -> None:
    for name in host_keys(system):
        system.remove(os.path.join(KEY_DIR, name))


MODULE = Module(params, {"configure": configure, "cleanup": cleanup})

if __name__ == "__main__":
    MODULE.main()
