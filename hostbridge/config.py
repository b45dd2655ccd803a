"""The bridge's configuration: one Config object built from a TOML file and command-line flags.

[bridge]                      # every key optional
db = "/var/lib/hostbridge/bridge.sqlite3"
discover = true
libvirt_dirs = ["/var/lib/libvirt/qemu/channel/target"]
libvirt_uri = "qemu:///system"  # run states from libvirt (default with discover)
api_socket = "/run/hostbridge/api.sock"
api_group = "ovm"
api_tcp = "0.0.0.0:8443"      # with tls_cert and tls_key: TCP is always TLS
tls_cert = "/etc/hostbridge/cert.pem"
tls_key = "/etc/hostbridge/key.pem"
tokens_file = "/etc/hostbridge/tokens"
users_file = "/etc/hostbridge/users"
query_timeout = 5.0
metrics_listen = "127.0.0.1:9477"  # /metrics alone, no authentication: loopback or management

[store]                       # a pool of hosts (docs/pool.md); without it: the SQLite db above
url = "postgresql://hostbridge@db.example/ovmd"

[pool]                        # with [store] url
host = "hv1"                  # this host's name in the pool (default: the host name)
url = "https://hv1.example:8443"   # where the other bridges reach this API (default from api_tcp)
key_file = "/etc/hostbridge/pool.key"
ca_file = "/etc/hostbridge/pool-ca.pem"   # verifies the other bridges (default: system CAs)
lease = 15.0                  # seconds without a heartbeat before a host counts as dead

[limits]                      # per VM; see Limits
max_outstanding = 64
audit_rows = 10000
message_expiry = 0            # seconds a queued message may wait for delivery; 0: no limit

[[vm]]
name = "web1"
channel = "unix:/var/lib/libvirt/qemu/channel/target/domain-1-web1/com.oracle.ovmd"
"""

from __future__ import annotations

import dataclasses
import re
import socket
from dataclasses import dataclass, field

import tomllib

from . import DEFAULT_API_SOCKET, TIMEOUT_MAX, TIMEOUT_MIN
from .errors import BridgeError

DEFAULT_DB = "/var/lib/hostbridge/bridge.sqlite3"
DEFAULT_LIBVIRT_DIRS = (
    "/var/lib/libvirt/qemu/channel/target",
    "/root/.config/libvirt/qemu/channel/target",
)
CHANNEL_KINDS = ("unix", "pty")
MAX_EXPIRY = 10 * 366 * 86400  # the longest expiry of a queued message: about ten years
MIN_EXPIRY = 1.0  # the shortest; shorter is surely a mistake (seconds for milliseconds)
_VM_NAME = re.compile(r"^[^\x00-\x1f\x7f/]{1,200}$")


class ConfigError(BridgeError):
    code = "config"


@dataclass
class VmSpec:
    name: str
    channel: str  # "unix:/path" or "pty:/path"
    source: str = "config"  # "config" | "flag" | "discovered"

    @property
    def kind(self) -> str:
        return self.channel.split(":", 1)[0]

    @property
    def path(self) -> str:
        return self.channel.split(":", 1)[1]


@dataclass
class Limits:
    """What one guest may cost the bridge. Defaults fit 1,000 guests on a small host."""

    max_outstanding: int = 64  # live requests and waiting sends per VM; beyond: Busy
    frames_per_s: float = 2000.0  # token bucket on frames read from a guest
    frames_burst: int = 4000
    bytes_per_s: float = 4 * 1024 * 1024  # token bucket on bytes read (garbage never makes frames)
    bytes_burst: int = 8 * 1024 * 1024
    mirror_keys: int = 4096  # mirrored keys per VM (the guest's default quota is 1,024)
    mirror_bytes: int = 8 * 1024 * 1024  # mirrored key+value bytes per VM
    write_buffer: int = 1024 * 1024  # bytes queued towards a guest that does not read
    hello_interval: float = 1.0  # first hello retry; doubles up to hello_interval_max
    hello_interval_max: float = 5.0
    keepalive: float = 15.0  # ping a synced guest that has been silent this long
    delivery_timeout: float = 10.0  # an outbox message unacknowledged this long: resync
    reconnect_max: float = 5.0  # longest backoff between connects of a channel
    # Connects to one VM's channel per minute, at most, however its links end (hostbridge.backoff).
    reconnect_budget: int = 30
    audit_rows: int = 10000  # the newest audit rows kept per VM; older ones are deleted
    # Seconds a message may wait undelivered before it is dropped (a send's expires overrides);
    # 0: no limit, the outbox keeps it until the guest takes it.
    message_expiry: float = 0.0
    # A send's idempotency key is remembered for the VM's next idempotency_keys messages and at
    # most idempotency_ttl seconds: a retry within both is answered, not applied again.
    idempotency_keys: int = 10000
    idempotency_ttl: float = 86400.0


@dataclass
class ApiLimits:
    """What network clients may hold on the TCP API (hostbridge.admission); the `[api]` table."""

    max_connections: int = 1024
    max_unauthenticated: int = 128  # past this the oldest unauthenticated connection is closed
    max_per_address: int = 16  # unauthenticated connections per source address
    handshake_timeout: float = 10.0
    auth_timeout: float = 30.0  # an authenticated request within this long of the accept
    fd_reserve: int = 64  # descriptors kept free, beyond one per guest

    def check(self) -> None:
        for name in ("max_connections", "max_unauthenticated", "max_per_address", "fd_reserve"):
            if getattr(self, name) < 1:
                raise ConfigError("[api] %s must be at least 1" % name)
        for name in ("handshake_timeout", "auth_timeout"):
            if not 0.1 <= getattr(self, name) <= 3600:
                raise ConfigError("[api] %s must be from 0.1 to 3600 seconds" % name)


@dataclass
class PoolConfig:
    """The `[pool]` table: this bridge's place in a pool of hosts sharing `[store] url`."""

    host: str | None = None  # None: the host name
    url: str | None = None  # None: https://<api_tcp host, or the host's FQDN>:<api_tcp port>
    key_file: str | None = None
    ca_file: str | None = None  # None: the system's CAs verify the other bridges
    lease: float = 15.0

    def host_name(self) -> str:
        return self.host or socket.gethostname()


@dataclass
class Config:
    vms: list[VmSpec] = field(default_factory=list)
    discover: bool | None = None  # None: on when no VM was given
    libvirt_dirs: list[str] = field(default_factory=lambda: list(DEFAULT_LIBVIRT_DIRS))
    discover_interval: float = 2.0
    # libvirt to follow the VMs' run states on (hostbridge.lifecycle); None: the default URI,
    # and only when discovery is on
    libvirt_uri: str | None = None
    db: str = DEFAULT_DB
    api_socket: str | None = DEFAULT_API_SOCKET
    api_socket_mode: int = 0o660
    api_group: str | None = None
    api_tcp: tuple[str, int] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens_file: str | None = None
    users_file: str | None = None
    query_timeout: float = 5.0
    # Where hostbridge.metrics serves /metrics alone, unauthenticated; None: only on the API.
    metrics_listen: tuple[str, int] | None = None
    # A libpq URL of the pool's shared PostgreSQL database (docs/pool.md); None: SQLite at db.
    store_url: str | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    debug: int = 1
    limits: Limits = field(default_factory=Limits)
    api_limits: ApiLimits = field(default_factory=ApiLimits)
    # One-line notes about the file (obsolete settings) for the daemon to log once it logs.
    warnings: list[str] = field(default_factory=list)

    @property
    def discovery_enabled(self) -> bool:
        return (not self.vms) if self.discover is None else self.discover

    @property
    def pooled(self) -> bool:
        """Whether this bridge is one of a pool of hosts (a shared PostgreSQL store)."""
        return self.store_url is not None

    def pool_url(self) -> str:
        """Where the other bridges of the pool reach this one's API."""
        if self.pool.url:
            return self.pool.url
        assert self.api_tcp is not None  # check() requires it in a pool
        host, port = self.api_tcp
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        return "https://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    @property
    def libvirt_enabled(self) -> bool:
        """Whether the bridge follows libvirt's run states: discovery on, or a libvirt_uri."""
        return self.discovery_enabled or bool(self.libvirt_uri)

    def check(self) -> None:
        """Raise ConfigError (one line) for an inconsistent configuration."""
        seen = set()
        for vm in self.vms:
            if vm.name in seen:
                raise ConfigError("VM %r is configured twice" % vm.name)
            seen.add(vm.name)
        if self.api_tcp and not (self.tls_cert and self.tls_key):
            raise ConfigError("the TCP API needs tls_cert and tls_key: it is always TLS")
        if not TIMEOUT_MIN <= self.query_timeout <= TIMEOUT_MAX:
            raise ConfigError(
                "query_timeout must be from %g to %g seconds" % (TIMEOUT_MIN, TIMEOUT_MAX)
            )
        if self.limits.audit_rows < 1:
            raise ConfigError("[limits] audit_rows must be at least 1")
        expiry = self.limits.message_expiry
        if expiry != 0 and not MIN_EXPIRY <= expiry <= MAX_EXPIRY:
            raise ConfigError(
                "[limits] message_expiry must be 0 (no limit) or from %g to %d seconds"
                % (MIN_EXPIRY, MAX_EXPIRY)
            )
        self.api_limits.check()
        self._check_pool()
        if self.limits.reconnect_budget < 1 or self.limits.reconnect_max <= 0:
            raise ConfigError(
                "[limits] reconnect_budget must be at least 1 and reconnect_max over 0"
            )
        if self.limits.idempotency_keys < 1 or self.limits.idempotency_ttl <= 0:
            raise ConfigError(
                "[limits] idempotency_keys must be at least 1 and idempotency_ttl over 0"
            )

    def _check_pool(self) -> None:
        if self.store_url is None:
            return
        if not self.store_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("[store] url must be a postgresql:// URL")
        if not self.pool.key_file:
            raise ConfigError("a pool ([store] url) needs [pool] key_file: docs/pool.md")
        if not self.api_tcp:
            raise ConfigError(
                "a pool ([store] url) needs api_tcp with TLS: the other bridges forward to it"
            )
        if not 1.0 <= self.pool.lease <= 3600:
            raise ConfigError("[pool] lease must be from 1 to 3600 seconds")
        if self.pool.url is not None and not self.pool.url.startswith("https://"):
            raise ConfigError("[pool] url must be an https:// URL")


def parse_channel(text: str) -> str:
    """Validate "unix:PATH" / "pty:PATH"; return it normalized."""
    kind, sep, path = text.partition(":")
    if not sep or kind not in CHANNEL_KINDS or not path:
        raise ConfigError("channel %r is not unix:PATH or pty:PATH" % text)
    return "%s:%s" % (kind, path)


def parse_vm_flag(text: str, source: str = "flag") -> VmSpec:
    """ "NAME=unix:PATH" -> VmSpec."""
    name, sep, channel = text.partition("=")
    if not sep:
        raise ConfigError("--vm %r is not NAME=unix:PATH or NAME=pty:PATH" % text)
    return VmSpec(check_vm_name(name), parse_channel(channel), source)


def check_vm_name(name: str) -> str:
    if not isinstance(name, str) or not _VM_NAME.match(name):
        raise ConfigError(
            "VM name %r is empty, too long, or has '/' or control characters" % (name,)
        )
    return name


def parse_hostport(text: str, any_port: bool = False) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port); ``any_port``: port 0 (the system picks one) is accepted."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ConfigError("%r is not HOST:PORT" % text)
    return host.strip("[]") or "0.0.0.0", int(port)


_BRIDGE_KEYS: dict[str, type | tuple[type, ...]] = {
    "db": str,
    "discover": bool,
    "libvirt_dirs": list,
    "api_socket": str,
    "api_group": str,
    "api_tcp": str,
    "tls_cert": str,
    "tls_key": str,
    "tokens_file": str,
    "users_file": str,
    "query_timeout": (int, float),
    "log": bool,  # obsolete, ignored: see load_file
    "discover_interval": (int, float),
    "libvirt_uri": str,
    "metrics_listen": str,
}


def _has_type(value: object, kind: type | tuple[type, ...]) -> bool:
    # To isinstance a bool is an int, but `true` is no number of seconds.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def load_file(path: str, config: Config | None = None) -> Config:
    """Read a TOML file into ``config`` (a new Config when None)."""
    config = config if config is not None else Config()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError("cannot read config %s: %s" % (path, e.strerror)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config %s is not valid TOML: %s" % (path, e)) from None
    bridge = doc.get("bridge", {})
    for key, value in bridge.items():
        kind = _BRIDGE_KEYS.get(key)
        if kind is None:
            raise ConfigError("config %s: unknown setting [bridge] %s" % (path, key))
        if not _has_type(value, kind):
            raise ConfigError("config %s: [bridge] %s has the wrong type" % (path, key))
        if key == "log":
            # Once meant as the default of a send's log flag but never used: a file that has
            # it keeps working, and says so once.
            config.warnings.append(
                "config %s: [bridge] log is obsolete and ignored; a send's log flag defaults to "
                "true (--no-log or log=no per message)" % path
            )
            continue
        if key == "api_tcp":
            value = parse_hostport(value)
        elif key == "metrics_listen":
            value = parse_hostport(value, any_port=True)
        elif key == "libvirt_dirs":
            value = [str(v) for v in value]
        elif key in ("query_timeout", "discover_interval"):
            value = float(value)
        setattr(config, key, value)
    limit_fields = {f.name: f.type for f in dataclasses.fields(Limits)}
    for key, value in doc.get("limits", {}).items():
        if (
            key not in limit_fields
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            raise ConfigError("config %s: bad setting [limits] %s" % (path, key))
        setattr(config.limits, key, type(getattr(config.limits, key))(value))
    api_fields = {f.name for f in dataclasses.fields(ApiLimits)}
    for key, value in doc.get("api", {}).items():
        if key not in api_fields or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("config %s: bad setting [api] %s" % (path, key))
        setattr(config.api_limits, key, type(getattr(config.api_limits, key))(value))
    _load_pool(path, doc, config)
    for i, table in enumerate(doc.get("vm", [])):
        if not isinstance(table, dict) or "name" not in table or "channel" not in table:
            raise ConfigError("config %s: [[vm]] number %d needs name and channel" % (path, i + 1))
        config.vms.append(
            VmSpec(
                check_vm_name(str(table["name"])), parse_channel(str(table["channel"])), "config"
            )
        )
    return config


_POOL_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "url": str,
    "key_file": str,
    "ca_file": str,
    "lease": (int, float),
}


def _load_pool(path: str, doc: dict[str, object], config: Config) -> None:
    """The `[store]` and `[pool]` tables (docs/pool.md)."""
    store = doc.get("store", {})
    pool = doc.get("pool", {})
    if not isinstance(store, dict) or not isinstance(pool, dict):
        raise ConfigError("config %s: [store] and [pool] must be tables" % path)
    for key, value in store.items():
        if key != "url" or not isinstance(value, str):
            raise ConfigError("config %s: bad setting [store] %s" % (path, key))
        config.store_url = value
    for key, value in pool.items():
        kind = _POOL_KEYS.get(key)
        if kind is None or not _has_type(value, kind):
            raise ConfigError("config %s: bad setting [pool] %s" % (path, key))
        setattr(config.pool, key, float(value) if key == "lease" else value)
