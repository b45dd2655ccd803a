"""The guest agent's cache, through its local socket (guestagent.client): the keys a run reads,
the report it writes, the secrets it deletes, and the wait for the host's last key."""

from __future__ import annotations

import os

from guestagent import config as agent_config
from guestagent.client import Client

# A wait without its own limit ends with the agent's connection; none here needs longer.
CALL_TIMEOUT = 30.0


def socket_path(config_file: str | None = None) -> str:
    """$OVMD_SOCKET (as for `ovmd`), else the agent's configuration file's socket."""
    return os.environ.get("OVMD_SOCKET") or agent_config.load(config_file).socket


class Agent:
    def __init__(self, path: str) -> None:
        self.path = path

    def keys(self) -> dict[str, str]:
        with Client(self.path, timeout=CALL_TIMEOUT) as c:
            return {item["key"]: item["value"] for item in c.collect("list")}

    def put(self, items: dict[str, str]) -> None:
        with Client(self.path, timeout=CALL_TIMEOUT) as c:
            c.call("put", items=[[k, v] for k, v in items.items()])

    def delete(self, key: str) -> None:
        with Client(self.path, timeout=CALL_TIMEOUT) as c:
            c.call("del", key=key)

    def wait(self, key: str, timeout: float | None) -> str:
        """The value of ``key`` once it exists (the agent wakes us; no polling). DaemonError
        (code ``timeout``) when ``timeout`` seconds pass first; None: as long as it takes."""
        fields: dict = {"key": key}
        if timeout is not None:
            fields["timeout"] = timeout
        with Client(self.path, timeout=None) as c:
            return c.call("wait", **fields)["value"]

    def clear(self) -> None:
        with Client(self.path, timeout=CALL_TIMEOUT) as c:
            c.call("clear")
