"""The daemon's settings: defaults, the INI-like file /etc/ovmd.conf, and command-line overrides.

    [ovmd]
    # A '#' or ';' starts a comment at the start of a line or after a space or tab.
    channel = /dev/virtio-ports/com.oracle.ovmd   # default: found by name
    socket = /run/ovmd/ovmd.sock
    # A persistent cache is simply another state directory.
    state_dir = /run/ovmd
    max_keys = 1024
    max_events = 64
    # Members of this group may use the local socket.
    group = ovmd
    # 0 off, 1 stderr, 2 syslog/journal.
    debug = 2
    # The local socket's clients (docs/reliability.md): in all, per non-root uid, kept for root.
    max_clients = 64
    max_clients_per_user = 16
    reserved_root_clients = 4
    # Seconds: to finish a request once begun; with nothing in progress (a wait is not idle).
    request_timeout = 10
    idle_timeout = 300
    # Publish the guest facts (host name, OS, addresses) under org.ovmd.guest.: yes or no.
    facts = yes

A value therefore cannot hold a '#' or ';' that follows whitespace ("a #b" reads as "a"); one
inside a word is kept ("a#b"). Keys may be written with '-' or '_'. Lines before any section
header count as [ovmd]; other sections are ignored. A missing file is fine; any other problem is
a ConfigError whose text is one line naming the file, the line and the key.

Imports nothing but os and the import-free error module: the CLI calls read_file() on its hot
path to find the socket.
"""

import os

from ovmproto.errors import OvmError

# No `from __future__ import annotations` (tests/guestagent/test_config.py keeps this module's
# imports to os and ovmproto.errors): annotations that 3.9 cannot evaluate are quoted.
TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

DEFAULT_PATH = "/etc/ovmd.conf"
DEFAULT_SOCKET = "/run/ovmd/ovmd.sock"
DEFAULT_STATE_DIR = "/run/ovmd"
DEFAULT_MAX_KEYS = 1024
DEFAULT_MAX_EVENTS = 64
DEFAULT_DEBUG = 2
# The local socket's limits (guestagent.localserver has the same numbers; a test keeps them equal).
DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_CLIENTS_PER_USER = 16
DEFAULT_RESERVED_ROOT_CLIENTS = 4
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
SECTION = "ovmd"
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


class ConfigError(OvmError):
    code = "config"


def _strip_comment(line: str) -> str:
    """``line`` up to its first '#' or ';' that follows a space or tab (the line is stripped)."""
    end = len(line)
    for mark in "#;":
        i = line.find(mark, 1)
        while i > 0 and line[i - 1] not in " \t":
            i = line.find(mark, i + 1)
        if 0 < i < end:
            end = i
    return line[:end].rstrip()


def _parse(path: str) -> dict[str, tuple[str, int]]:
    """{key: (value, line number)} of the [ovmd] section; {} when the file does not exist."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("%s: not valid UTF-8" % path) from None
    out: dict[str, tuple[str, int]] = {}
    section = SECTION
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        line = _strip_comment(line)
        if line[0] == "[":
            if line[-1] != "]":
                raise ConfigError("%s line %d: section header without ']'" % (path, lineno))
            section = line[1:-1].strip()
            continue
        if section != SECTION:
            continue
        key, sep, value = line.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError("%s line %d: expected 'key = value'" % (path, lineno))
        out[key] = (value.strip(), lineno)
    return out


def read_file(path: str = DEFAULT_PATH) -> dict[str, str]:
    """The [ovmd] settings of ``path`` as {key: string}, unvalidated; {} when it is missing."""
    return {k: v for k, (v, _) in _parse(path).items()}


def _path(value: str) -> str:
    if not value:
        raise ValueError("is empty")
    return value


def _socket_path(value: str) -> str:
    _path(value)
    if len(os.fsencode(value)) > _SUN_PATH_MAX:
        raise ValueError("is longer than %d bytes, the limit of a unix socket path" % _SUN_PATH_MAX)
    return value


def _optional_path(value: "str | None") -> "str | None":
    # "auto" (or nothing) lets the daemon find the virtio port itself.
    return None if value in (None, "", "auto") else value


def _optional_name(value: "str | None") -> "str | None":
    return value or None


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        try:
            n = int(str(value).strip(), 10)
        except ValueError:
            raise ValueError("must be a whole number, not %r" % value) from None
    if n < 1:
        raise ValueError("must be at least 1, not %d" % n)
    return n


def _positive_seconds(value: object) -> float:
    try:
        n = float(str(value).strip())
    except ValueError:
        raise ValueError("must be a number of seconds, not %r" % value) from None
    if not n > 0 or n == float("inf"):  # not n > 0: also NaN
        raise ValueError("must be a number of seconds above 0, not %r" % value)
    return n


_TRUE = ("yes", "true", "on", "1")
_FALSE = ("no", "false", "off", "0")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be yes or no, not %r" % value)


def _debug_level(value: object) -> int:
    try:
        n = int(str(value).strip(), 10)
    except ValueError:
        n = -1
    if n not in (0, 1, 2):
        raise ValueError("must be 0 (off), 1 (stderr) or 2 (syslog/journal), not %r" % value)
    return n


# key -> (parser, default). The parser raises ValueError with the reason (one line).
_FIELDS: "dict[str, tuple[Callable[[Any], object], object]]" = {
    "channel": (_optional_path, None),
    "socket": (_socket_path, DEFAULT_SOCKET),
    "state_dir": (_path, DEFAULT_STATE_DIR),
    "max_keys": (_positive_int, DEFAULT_MAX_KEYS),
    "max_events": (_positive_int, DEFAULT_MAX_EVENTS),
    "group": (_optional_name, None),
    "debug": (_debug_level, DEFAULT_DEBUG),
    "max_clients": (_positive_int, DEFAULT_MAX_CLIENTS),
    "max_clients_per_user": (_positive_int, DEFAULT_MAX_CLIENTS_PER_USER),
    "reserved_root_clients": (_positive_int, DEFAULT_RESERVED_ROOT_CLIENTS),
    "request_timeout": (_positive_seconds, DEFAULT_REQUEST_TIMEOUT),
    "idle_timeout": (_positive_seconds, DEFAULT_IDLE_TIMEOUT),
    "facts": (_boolean, True),
}


class Config:
    """Validated settings. ``channel`` None means: find the port (default link, then sysfs)."""

    __slots__ = ("path",) + tuple(_FIELDS)

    # The fields of _FIELDS (set in __init__), for the type checker.
    path: "str | None"
    channel: "str | None"
    socket: str
    state_dir: str
    max_keys: int
    max_events: int
    group: "str | None"
    debug: int
    max_clients: int
    max_clients_per_user: int
    reserved_root_clients: int
    request_timeout: float
    idle_timeout: float
    facts: bool

    def __init__(self, **fields: "Any") -> None:
        self.path = fields.pop("path", None)  # the file read, for messages
        for key, (_, default) in _FIELDS.items():
            setattr(self, key, fields.pop(key, default))
        if fields:
            raise TypeError("Config got unknown fields %s" % sorted(fields))

    def as_dict(self) -> "dict[str, Any]":
        return {k: getattr(self, k) for k in _FIELDS}

    def __repr__(self) -> str:
        return "Config(%s)" % ", ".join("%s=%r" % kv for kv in self.as_dict().items())


def load(path: "str | None" = None, overrides: "Mapping[str, object] | None" = None) -> Config:
    """Defaults, then the file (``path`` or /etc/ovmd.conf), then ``overrides``.

    ``overrides`` maps keys (as in the file; '-' or '_') to values; None means "not given",
    so an argparse namespace's vars() can be passed as it is.
    """
    file_path = path or DEFAULT_PATH
    fields: dict[str, object] = {"path": file_path}
    for key, (text, lineno) in _parse(file_path).items():
        spec = _FIELDS.get(key)
        if spec is None:
            raise ConfigError("%s line %d: unknown key %r" % (file_path, lineno, key))
        try:
            fields[key] = spec[0](text)
        except ValueError as e:
            raise ConfigError("%s line %d: %s %s" % (file_path, lineno, key, e)) from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        key = key.replace("-", "_")
        spec = _FIELDS.get(key)
        if spec is None:
            raise ConfigError("unknown setting %r" % key)
        try:
            fields[key] = spec[0](value)
        except ValueError as e:
            raise ConfigError("option --%s %s" % (key.replace("_", "-"), e)) from None
    config = Config(**fields)
    if config.reserved_root_clients >= config.max_clients:
        raise ConfigError(
            "%s: reserved_root_clients (%d) must be less than max_clients (%d)"
            % (file_path, config.reserved_root_clients, config.max_clients)
        )
    return config
