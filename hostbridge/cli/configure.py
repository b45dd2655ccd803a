"""`vmmessage configure VM`: a whole template configuration, sent in order with the secrets last
and unlogged, then (--wait) the guest's report read back (docs/template-config.md).

The settings come from options (--hostname, --ip...), a TOML or JSON file of full keys, and
--set KEY=VALUE, in that order (a later one wins for the same key). The messages go in this order:
the request's name (org.ovmd.template-config.request, a fresh random one that the guest's report
echoes, so that an earlier run's report is never taken for this one's), every setting, then the
user passwords and the root password last, the signal that the input is complete. Each is a send
with an idempotency key derived from the request, so a retry after a lost answer is never applied
twice; the bridge queues them durably when the agent is not connected and delivers them in order.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ovmproto import templatekeys as tk
from ovmproto.limits import check_key, check_value

N = "com.oracle.linux.network."
D = "com.oracle.linux.datetime."
U = "com.oracle.linux.user."
POLL_INTERVAL = 1.0
# A static address an earlier configuration left in the guest would contradict --dhcp (the guest
# refuses both at once): these keys are deleted first when --dhcp is given.
STATIC_KEYS = (
    N + "ipaddr.0",
    N + "netmask.0",
    N + "gateway.0",
)  # seconds between reads of the report (the bridge's mirror of guest keys)


class ConfigureError(ValueError):
    """Bad settings: one line, naming the option, file or key; never a value."""


@dataclass
class Message:
    key: str
    value: str | None  # None: delete the key in the guest
    log: bool


def load_file(path: str) -> dict[str, str]:
    """Full keys to values from a TOML (by its .toml name) or JSON file; numbers and booleans
    become the strings the original's modules read (True/False)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigureError("%s: %s" % (path, e.strerror)) from None
    try:
        if path.endswith(".toml"):
            import tomllib

            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        why = str(e).splitlines()[0][:80]
        raise ConfigureError("%s: not valid %s (%s)" % (path, kind, why)) from None
    if not isinstance(doc, dict):
        raise ConfigureError("%s: not a table of keys and values" % path)
    out = {}
    for key, value in _flatten(doc):
        if isinstance(value, bool):
            value = "True" if value else "False"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if not isinstance(value, str):
            raise ConfigureError("%s: %s: not a string, number, boolean or list" % (path, key))
        out[key] = value
    return out


def _flatten(doc: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    # TOML may nest a dotted key as tables ([com.oracle.linux.network] hostname = ...).
    for k, v in doc.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k), v


def _netmask(prefix: int) -> str:
    return str(ipaddress.IPv4Network("0.0.0.0/%d" % prefix).netmask)


def from_options(o: dict[str, Any], read_secret: Callable[[str], str]) -> dict[str, str]:
    """The keys the options give (None: not given)."""
    out: dict[str, str] = {}
    if o.get("hostname"):
        out[N + "hostname"] = o["hostname"]
    if o.get("device"):
        out[N + "device.0"] = o["device"]
    if o.get("ip"):
        try:
            iface = ipaddress.IPv4Interface(o["ip"])
        except ValueError:
            raise ConfigureError("--ip: expected an IPv4 address with its prefix, e.g. "
                                 "192.0.2.10/24") from None  # fmt: skip
        if "/" not in o["ip"]:
            raise ConfigureError("--ip: give the prefix length too, e.g. 192.0.2.10/24")
        out[N + "bootproto.0"] = "static"
        out[N + "ipaddr.0"] = str(iface.ip)
        out[N + "netmask.0"] = _netmask(iface.network.prefixlen)
    if o.get("dhcp"):
        if o.get("ip"):
            raise ConfigureError("--dhcp and --ip cannot be combined")
        out[N + "bootproto.0"] = "dhcp"
    if o.get("gateway"):
        out[N + "gateway.0"] = o["gateway"]
    if o.get("dns"):
        out[N + "dns-servers.0"] = ",".join(o["dns"])
    if o.get("search"):
        out[N + "dns-search-domains.0"] = ",".join(o["search"])
    if o.get("timezone"):
        out[D + "timezone"] = o["timezone"]
    if o.get("ntp_server"):
        out[D + "ntp-servers"] = ",".join(o["ntp_server"])
        out[D + "ntp"] = "True"
    if o.get("account"):
        out[U + "name.0"] = o["account"]
    if o.get("groups"):
        if not o.get("account"):
            raise ConfigureError("--groups goes with --account")
        out[U + "groups.0"] = ",".join(o["groups"])
    if o.get("ssh_key"):
        if not o.get("account"):
            raise ConfigureError("--ssh-key goes with --account (root's keys: --account root)")
        keys = [read_secret(path).strip() for path in o["ssh_key"]]
        out[U + "ssh-authorized-keys.0"] = "\n".join(k for k in keys if k)
    if o.get("account_password_file"):
        if not o.get("account"):
            raise ConfigureError("--account-password-file goes with --account")
        out[U + "password.0"] = _password(read_secret(o["account_password_file"]))
    if o.get("root_password_file") and o.get("root_password_hash"):
        raise ConfigureError("--root-password-file and --root-password-hash cannot be combined")
    if o.get("root_password_file"):
        out[tk.ROOT_PASSWORD_KEY] = _password(read_secret(o["root_password_file"]))
    if o.get("root_password_hash"):
        out[tk.ROOT_PASSWORD_KEY] = tk.CRYPT_PREFIX + o["root_password_hash"]
    for pair in o.get("set") or ():
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigureError("--set expects KEY=VALUE, and its argument has no '='")
        out[key] = value
    return out


def _password(text: str) -> str:
    # A file's last line break is not part of the password; a password is one line.
    return text[:-1] if text.endswith("\n") else text


def plan(settings: dict[str, str], request: str) -> list[Message]:
    """The messages, in the order they must go: the request's name, the deletes (with DHCP, an
    earlier static address), the settings, the secrets (unlogged), the root password last."""
    for key, value in settings.items():
        problem = check_key(key) or check_value(value)
        if problem is not None:
            raise ConfigureError("%s: %s" % (key, problem[1]))
        if key.startswith(tk.REPORT_PREFIX):
            raise ConfigureError("%s: reserved for the guest's report" % key)
    if tk.ROOT_PASSWORD_KEY not in settings:
        raise ConfigureError(
            "no root password (--root-password-file, --root-password-hash or the file's "
            "%s): the guest's first boot waits for it" % tk.ROOT_PASSWORD_KEY
        )
    plain = [Message(k, v, True) for k, v in settings.items() if not tk.is_secret(k)]
    secret = [Message(k, v, False) for k, v in settings.items()
              if tk.is_secret(k) and k != tk.ROOT_PASSWORD_KEY]  # fmt: skip
    last = Message(tk.ROOT_PASSWORD_KEY, settings[tk.ROOT_PASSWORD_KEY], False)
    deletes = []
    if settings.get(N + "bootproto.0") == "dhcp":
        deletes = [Message(k, None, True) for k in STATIC_KEYS if k not in settings]
    return [Message(tk.REQUEST_KEY, request, True), *deletes, *plain, *secret, last]


def new_request() -> str:
    return "cfg-" + os.urandom(8).hex()


def read_secret_file(path: str) -> str:
    """A file's text; '-' is standard input (a password piped in never shows in `ps`)."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigureError("%s: %s" % (path, e.strerror)) from None
    except UnicodeDecodeError:
        raise ConfigureError("%s: not UTF-8 text" % path) from None


@dataclass
class Report:
    state: str
    error: str
    modules: dict[str, str]


def read_report(entries: list[dict[str, Any]], request: str) -> Report | None:
    """The guest's report for ``request`` among a VM's keys, once it is final; else None."""
    keys = {e.get("key"): e.get("value") for e in entries if isinstance(e, dict)}
    if keys.get(tk.RUN_KEY) != request or keys.get(tk.STATE_KEY) not in tk.FINAL_STATES:
        return None
    modules = {
        str(k)[len(tk.MODULE_KEY_PREFIX) :]: str(v)
        for k, v in keys.items()
        if isinstance(k, str) and k.startswith(tk.MODULE_KEY_PREFIX)
    }
    return Report(str(keys[tk.STATE_KEY]), str(keys.get(tk.ERROR_KEY) or ""), modules)


def wait_report(
    fetch: Callable[[], list[dict[str, Any]]], request: str, timeout: float
) -> Report | None:
    """Read the VM's keys until the report for ``request`` is final or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        report = read_report(fetch(), request)
        if report is not None or time.monotonic() >= deadline:
            return report
        time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
