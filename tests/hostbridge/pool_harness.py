"""A pool of three hosts on one machine, every part real but libvirt: three bridge processes
(hv1, hv2, hv3) sharing one PostgreSQL database, guests that are real `ovmd` agents on ptys, and
QEMU stand-ins whose channel socket moves from one host's libvirt directory to another's, as a
live migration moves it. libvirt's lifecycle events are played by the test
(tests.support.simlifecycle, through tests.support.sim_bridge).

    with Pool(postgres_cluster, "pool_test") as pool:
        pool.start()
        vm = pool.start_vm("web1", "hv1")         # discovered by hv1, which claims it
        pool.vmmessage("send", "web1", "k", "v", via="hv3")     # forwarded to hv1
        pool.migrate(vm, "hv2")                   # the events and the socket, in libvirt's order
        pool.kill("hv2"); pool.restart("hv2")

Each bridge has its own libvirt channel directory (discovery on, rescanned every 0.2 s), its own
API socket, a TLS API on 127.0.0.1 (one certificate for all three, also the pool's CA), the
pool's key, and a short lease, so that a dead host's VMs are released within seconds.

A migration pauses the guest as libvirt does for the switch-over: the agent is stopped (SIGSTOP)
and the stand-in reads nothing from the source's socket, so what the source's bridge writes then
is lost with that socket, as with a real source QEMU; the agent's process, cache and hseq survive.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostbridge import IDEMPOTENCY_HEADER
from hostbridge.apiclient import ApiError, Client, path
from hostbridge.poolkey import PoolKey
from tests.hostbridge.fakes import make_tls_cert
from tests.support.agent import Agent
from tests.support.closing import Closing
from tests.support.postgres import PostgresCluster
from tests.support.processes import PYTHON, Process, child_env, script
from tests.support.simlifecycle import send_event
from tests.support.tempdirs import short_tempdir
from tests.support.waiting import TIMEOUT, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTS = ("hv1", "hv2", "hv3")
CHANNEL = "com.oracle.ovmd"
TOKEN_NAME = "pooltest"


def write_private(path: str, text: str) -> str:
    """A new file only its owner may read (the bridge refuses a pool key others can); ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def write_pool_key(path: str) -> str:
    """A new pool key file at ``path``; ``path``."""
    return write_private(path, PoolKey.generate() + "\n")


@dataclass
class PoolSecrets:
    """What every bridge of a pool shares: the pool key, the TLS certificate (also the pool's
    CA) and an API token, made in ``directory`` by make()."""

    key_file: str
    cert: str
    tls_key: str
    token: str
    tokens_file: str

    @classmethod
    def make(cls, directory: Path, token_name: str) -> PoolSecrets:
        key_file = write_pool_key(str(directory / "pool.key"))
        cert, tls_key = make_tls_cert(directory)
        token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        tokens_file = write_private(str(directory / "tokens"), "%s:%s\n" % (token_name, token))
        return cls(key_file, cert, tls_key, token, tokens_file)


# The pool key of the stores the tests open in their own process (no bridge reads it from a file).
STORE_KEY = PoolKey(os.urandom(32))


def open_pg(
    url: str,
    stores: list[Any],
    host: str = "hv1",
    *,
    live: bool = False,
    claims: Iterable[str] = (),
    **kwargs: Any,
) -> Any:
    """A PgStore on ``url`` as host ``host``, added to ``stores`` (the ``stores`` fixture closes
    them at the test's end). ``live``, or any ``claims``: registered as a live host; then the
    owner of each VM of ``claims`` (added, claimed at fence 1). Keyword arguments as PgStore's."""
    from hostbridge.pgstore import PgStore  # psycopg: the pool's tests only

    s = PgStore(url, host, STORE_KEY, **kwargs)
    stores.append(s)
    claims = list(claims)
    if live or claims:
        s.register_host("https://%s.example:8443" % host, 15)
    for vm in claims:
        s.vm(vm)
        assert s.claim(vm) == 1
    return s


def store_url(conninfo: str) -> str:
    """A libpq key=value conninfo (PostgresCluster's) as the postgresql:// URL [store] url
    wants: the host is the cluster's socket directory."""
    parts = dict(p.split("=", 1) for p in conninfo.split())
    query = urllib.parse.urlencode(
        {"host": parts["host"], "port": parts["port"], "user": parts["user"]}
    )
    return "postgresql:///%s?%s" % (urllib.parse.quote(parts["dbname"]), query)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the bridge binds it with SO_REUSEADDR, so
    a restarted bridge gets it back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(value: object) -> str:
    return json.dumps(value)  # a JSON string, number or list of strings is TOML too


class PoolBridge(Process):
    """One host's bridge: ``python -m tests.support.sim_bridge`` with its own configuration file,
    libvirt directory (``libvirt_dir``), API socket and TLS port. Restartable: its log goes on."""

    def __init__(self, pool: Pool, name: str, debug: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.name = name
        self.debug = debug
        self.libvirt_dir = os.path.join(self.dir, "channels")
        os.mkdir(self.libvirt_dir)
        self.api_socket = os.path.join(self.dir, "api.sock")
        self.events = os.path.join(self.dir, "events.sock")
        self.port = free_port()
        self.url = "https://127.0.0.1:%d" % self.port
        self.config_path = os.path.join(self.dir, "bridge.toml")
        self._log_from = 0
        self.write_config()

    def write_config(self) -> None:
        p = self.pool
        lines = [
            "[bridge]",
            "db = %s" % _toml(os.path.join(self.dir, "unused.sqlite3")),
            "discover = true",
            "libvirt_dirs = %s" % _toml([self.libvirt_dir]),
            "discover_interval = 0.2",
            'libvirt_uri = "sim"',
            "api_socket = %s" % _toml(self.api_socket),
            'api_tcp = "127.0.0.1:%d"' % self.port,
            "tls_cert = %s" % _toml(p.secrets.cert),
            "tls_key = %s" % _toml(p.secrets.tls_key),
            "tokens_file = %s" % _toml(p.secrets.tokens_file),
            "",
            "[store]",
            "url = %s" % _toml(p.store_url),
            "",
            "[pool]",
            "host = %s" % _toml(self.name),
            "url = %s" % _toml(self.url),
            "key_file = %s" % _toml(p.secrets.key_file),
            "ca_file = %s" % _toml(p.secrets.cert),
            "lease = %s" % _toml(p.lease),
            "",
        ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines))

    def command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "tests.support.sim_bridge",
            "--events",
            self.events,
            "--config",
            self.config_path,
            "-d",
            str(self.debug),
        ]

    def start(self) -> PoolBridge:
        self._log_from = len(self.log())
        super().start()
        return self

    def this_run(self) -> str:
        """The log of the current run only (the file keeps every run's)."""
        return self.log()[self._log_from :]

    def wait_ready(self, timeout: float = TIMEOUT) -> PoolBridge:
        def ready() -> bool:
            if not self.running:
                raise AssertionError("bridge %s exited:\n%s" % (self.name, self.this_run()))
            return "INFO: ready\n" in self.this_run()

        wait_for(ready, timeout, what="bridge %s to be ready" % self.name)
        return self

    def client(self, timeout: float = 30.0) -> Client:
        """An API client of this bridge over TLS, with the test's token."""
        return Client(
            self.url, token=self.pool.secrets.token, cacert=self.pool.secrets.cert, timeout=timeout
        )


class MigratingStandIn(Process):
    """tests/hostbridge/migrating_standin.py: the VM's QEMU chardev, first at ``socket_path``;
    the guest agent opens ``link``. command() moves it (see that file)."""

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.control = os.path.join(self.dir, "ctl.sock")
        self.link = os.path.join(self.dir, "port")
        self.first = socket_path

    def command(self) -> list[str]:
        script_path = os.path.join(HERE, "migrating_standin.py")
        return [PYTHON, script_path, self.control, self.link, self.first]

    def wait_ready(self, timeout: float = TIMEOUT) -> MigratingStandIn:
        self.wait_log("ready", timeout)
        return self

    def command_line(self, verb: str, arg: str = "") -> str:
        """Run one control command; its answer (AssertionError unless "ok" or an answer)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(self.control)
            s.sendall(("%s %s\n" % (verb, arg)).encode())
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise AssertionError("the stand-in closed the control connection")
                answer += chunk
        text = answer.decode().strip()
        if text.startswith("error"):
            raise AssertionError("stand-in: %s %s: %s" % (verb, arg, text))
        return text

    def connects(self, socket_path: str | None = None) -> int:
        """Clients accepted so far (at ``socket_path`` only, when given)."""
        try:
            with open(self.control + ".clients") as f:
                lines = f.read().split()
        except OSError:
            return 0
        return len([p for p in lines if socket_path is None or p == socket_path])


class Vm(Closing):
    """A guest of the pool: its QEMU stand-in, its real agent, the host that runs it."""

    def __init__(self, name: str, host: str, socket_path: str) -> None:
        self.name = name
        self.host = host
        self.socket = socket_path
        self.standin = MigratingStandIn(socket_path)
        self.agent = Agent(self.standin.link)
        # A migration under way: (destination host, its socket).
        self.incoming: tuple[str, str] | None = None

    def pause(self) -> None:
        """Pause the guest, as libvirt does for a migration's switch-over: its agent stops
        (SIGSTOP) and its port takes nothing in (what the host writes waits in the socket)."""
        self.standin.command_line("pause")
        self.agent.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Run the paused guest again (on whichever host its port is behind now)."""
        self.agent.signal(signal.SIGCONT)
        self.standin.command_line("resume")

    def value(self, key: str) -> str | None:
        """``key``'s value in the guest's cache (None: not set), asked of the agent itself (which
        must not be paused)."""
        r = self.agent.ovmd("-g", key)
        return r.stdout.rstrip("\n") if r.returncode == 0 else None

    def keys(self) -> list[str]:
        """The guest's keys in the cache's order (a set moves its key to the end)."""
        r = self.agent.ovmd("-l")
        assert r.returncode == 0, r.stderr
        # One {key: value} object per line.
        return [k for line in r.stdout.splitlines() if line.strip() for k in json.loads(line)]

    def journal(self) -> list[list[Any]]:
        """Every change the agent recorded in its journal since its last snapshot, in order: ops
        such as ["s", key, value, ts, origin] (a set), ["h", seq] (host seq applied), ["p",
        epoch] (a new host stream). What the agent applied, exactly as it made it durable."""
        from guestagent.store import CacheStore, unframe

        try:
            with open(os.path.join(self.agent.state_dir, CacheStore.JOURNAL), "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        ops: list[list[Any]] = []
        for line in lines[1:]:  # the first line is the journal's header
            if line:
                record = unframe(line)
                assert isinstance(record, list), record
                ops.extend(record)
        return ops

    def close(self) -> None:
        self.agent.close()
        self.standin.close()


class Pool(Closing):
    """Three pool bridges on a new database of ``cluster`` named ``database`` (see the module
    docstring); start() starts them. close() stops every process it started."""

    def __init__(
        self,
        cluster: PostgresCluster,
        database: str,
        lease: float = 3.0,
        hosts: Iterable[str] = HOSTS,
        debug: int = 1,
    ) -> None:
        self.dir = short_tempdir("ovmd-pool-")
        self.cluster = cluster
        self.lease = lease
        self.vms: dict[str, Vm] = {}
        self._ids: dict[str, int] = {}
        self.bridges: dict[str, PoolBridge] = {}
        try:
            self.store_url = store_url(cluster.create_database(database))
            self.secrets = PoolSecrets.make(Path(self.dir), TOKEN_NAME)
            for name in hosts:
                self.bridges[name] = PoolBridge(self, name, debug)
        except BaseException:
            self.close()
            raise

    # -- the bridges ----------------------------------------------------------------------------

    def start(self, *hosts: str) -> Pool:
        """Start the bridges (all of them by default) together, and wait until each is ready."""
        chosen = [self.bridges[h] for h in (hosts or tuple(self.bridges))]
        for b in chosen:
            b.start()
        for b in chosen:
            b.wait_ready()
        return self

    def kill(self, host: str) -> None:
        """SIGKILL host's bridge: no clean stop, no release, its heartbeat just stops."""
        self.bridges[host].kill()

    def restart(self, host: str) -> None:
        """Start host's bridge again (after kill() or stop()) and wait until it is ready."""
        b = self.bridges[host]
        if b.running:
            b.stop()
        b.start().wait_ready()

    def logs(self) -> str:
        """Every bridge's log, for an assertion's message."""
        return "\n".join("----- %s -----\n%s" % (name, b.log()) for name, b in self.bridges.items())

    # -- libvirt ---------------------------------------------------------------------------------

    def event(self, host: str, vm: str, event: str, detail: str | None, state: str) -> bool:
        """Play a lifecycle event of ``vm`` on ``host``'s libvirt; whether its bridge saw it (a
        dead bridge does not: the state is recorded and listed at its restart)."""
        return send_event(self.bridges[host].events, vm, event, detail, state)

    def _channel_path(self, host: str, vm: str) -> str:
        """A new boot's channel socket in ``host``'s libvirt directory, as libvirt names it."""
        self._ids[host] = self._ids.get(host, 0) + 1
        directory = "domain-%d-%s" % (self._ids[host], vm[:20])
        return os.path.join(self.bridges[host].libvirt_dir, directory, CHANNEL)

    def start_vm(self, name: str, host: str, agent: bool = True) -> Vm:
        """Boot VM ``name`` on ``host``: its channel socket appears in host's libvirt directory,
        libvirt says STARTED_BOOTED, a real agent opens the guest end, and this waits until the
        host's bridge has synced with it. Without ``agent``, the guest runs no agent (yet):
        vm.agent.start() starts it later."""
        sock = self._channel_path(host, name)
        os.makedirs(os.path.dirname(sock))
        vm = Vm(name, host, sock)
        self.vms[name] = vm
        vm.standin.start()
        vm.standin.wait_ready()
        if agent:
            vm.agent.start()
            vm.agent.wait_ready()
        self.event(host, name, "STARTED", "STARTED_BOOTED", "running")
        if agent:
            self.wait_agent(name, host)
        for other, b in self.bridges.items():
            if b.running:  # every bridge of the pool knows it, and who runs it
                self.wait_owner(name, host, via=other)
        return vm

    # A live migration in libvirt's order, in steps, so that a test can act between them.

    def migration_begin(self, vm: Vm, dst: str) -> None:
        """The source pauses the VM for the switch-over (SUSPENDED_MIGRATED, once paused: what
        the source's bridge writes meanwhile waits in the socket, and is lost with it); the
        destination's QEMU, paused, has made the channel socket in its directory
        (STARTED_MIGRATED)."""
        assert vm.incoming is None and dst != vm.host
        vm.pause()
        self.event(vm.host, vm.name, "SUSPENDED", "SUSPENDED_MIGRATED", "migrating")
        sock = self._channel_path(dst, vm.name)
        vm.standin.command_line("listen", sock)
        self.event(dst, vm.name, "STARTED", "STARTED_MIGRATED", "migrating")
        vm.incoming = (dst, sock)

    def migration_resume(self, vm: Vm) -> None:
        """The guest runs on the destination (RESUMED_MIGRATED there): its port is behind the
        destination's socket now, the source's socket is gone."""
        assert vm.incoming is not None
        dst, sock = vm.incoming
        vm.standin.command_line("move", sock)
        vm.resume()
        self.event(dst, vm.name, "RESUMED", "RESUMED_MIGRATED", "running")

    def migration_end(self, vm: Vm) -> None:
        """The source's QEMU ends (STOPPED_MIGRATED): the VM is the destination's."""
        assert vm.incoming is not None
        dst, sock = vm.incoming
        self.event(vm.host, vm.name, "STOPPED", "STOPPED_MIGRATED", "shutoff")
        vm.host, vm.socket, vm.incoming = dst, sock, None

    def migrate(self, vm: Vm, dst: str) -> None:
        """A whole live migration of ``vm`` to ``dst``."""
        self.migration_begin(vm, dst)
        self.migration_resume(vm)
        self.migration_end(vm)

    def migration_fail(self, vm: Vm) -> None:
        """The migration begun fails before the switch-over: the destination's QEMU is destroyed
        (its socket gone, STOPPED_FAILED) and the source resumes the VM (RESUMED_MIGRATED)."""
        assert vm.incoming is not None
        dst, sock = vm.incoming
        vm.standin.command_line("unlisten", sock)
        self.event(dst, vm.name, "STOPPED", "STOPPED_FAILED", "shutoff")
        vm.resume()
        self.event(vm.host, vm.name, "RESUMED", "RESUMED_MIGRATED", "running")
        vm.incoming = None

    # -- asking the bridges ----------------------------------------------------------------------

    def cli_argv(self, args: Iterable[str], via: str, tcp: bool = True) -> list[str]:
        """`vmmessage ARGS` against ``via``'s bridge: over its TLS API with the test's token and
        CA, or (tcp False) its unix socket."""
        b = self.bridges[via]
        if tcp:
            where = [
                "--bridge",
                b.url,
                "--token",
                self.secrets.token,
                "--cacert",
                self.secrets.cert,
            ]
        else:
            where = ["--bridge", b.api_socket]
        return [script("vmmessage"), *where, *args]

    def vmmessage(
        self, *args: str, via: str = "hv1", tcp: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `vmmessage ARGS` against ``via``'s bridge (text output)."""
        return subprocess.run(
            self.cli_argv(args, via, tcp),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(drop_prefixes=("VMMESSAGE_",)),
        )

    def local_client(self, via: str) -> Client:
        """An API client of ``via``'s bridge over its unix socket (no TLS: quicker to poll)."""
        return Client(self.bridges[via].api_socket, timeout=TIMEOUT)

    def vm_list(self, via: str) -> dict[str, dict[str, Any]]:
        """``via``'s list of the pool's VMs (GET /v1/vms, what `vmmessage --json list` prints):
        name -> the VM's object, whose "host" is its owner."""
        return {vm["name"]: vm for vm in self.local_client(via).vms()}

    def agent_state(self, vm: str, via: str) -> str | None:
        """What ``via``'s bridge says of ``vm``'s agent (connected...); None if it cannot."""
        try:
            state: str | None = self.local_client(via).vm(vm).get("agent")
        except ApiError:
            return None
        return state

    def wait_agent(self, vm: str, host: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``host``'s bridge is synced with ``vm``'s agent."""
        wait_for(
            lambda: self.agent_state(vm, host) == "connected",
            timeout,
            interval=0.1,
            what="bridge %s to sync with the agent of %s" % (host, vm),
        )

    def wait_owner(self, vm: str, owner: str | None, via: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``via``'s list says ``owner`` owns ``vm`` (None: nobody)."""
        wait_for(
            lambda: self.vm_list(via).get(vm, {}).get("host", "?") == owner,
            timeout,
            interval=0.1,
            what="%s to list %s as owned by %s" % (via, vm, owner),
        )

    def close(self) -> None:
        for vm in self.vms.values():
            vm.close()
        for b in self.bridges.values():
            b.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def api_send(
    client: Client, vm: str, key: str, value: str, ident: str, timeout: float = 5.0
) -> dict[str, Any]:
    """One attempt of a send through ``client``, with idempotency key ``ident`` and no retry of
    its own (the caller decides where to try again); the answer, or ApiError."""
    body = {"key": key, "value": value, "log": True, "queue": True, "timeout": timeout}
    answer: dict[str, Any] = client.request(
        "POST",
        path("vms", vm, "messages"),
        body,
        timeout=timeout + 5,
        headers={IDEMPOTENCY_HEADER: ident},
    )
    return answer


__all__ = [
    "HOSTS",
    "ApiError",
    "MigratingStandIn",
    "Pool",
    "PoolBridge",
    "Vm",
    "api_send",
    "free_port",
    "store_url",
]
