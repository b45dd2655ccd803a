"""FakeBridge: the interface hostbridge.api serves (that of hostbridge.bridge.Bridge) in memory, for
the API's and the CLIs' unit tests only. Real-process tests use the real daemon (test_api_real.py).

It keeps the real bridge's observable rules: unknown VM -> UnknownVm, limits -> InvalidInput,
send to a disconnected agent queues (or AgentNotConnected with queue=False), a query of a
disconnected VM answers from the "mirror" marked stale, audit rows newest first without the value
when log is off. ``fail_with`` makes the next call of a method raise a given error.
"""

from __future__ import annotations

import dataclasses
import time

from hostbridge.errors import AgentNotConnected, InvalidInput, NotFound, UnknownVm
from hostbridge.events import EventHub
from hostbridge.model import (
    AuditRow,
    CancelResult,
    KeyList,
    KeyValue,
    QueuedMessage,
    QueueList,
    SendResult,
    VmInfo,
)
from ovmproto import limits


class FakeVm:
    def __init__(self, name: str, connected: bool = True):
        self.info = VmInfo(
            name=name,
            channel="pty:/tmp/fake-%s" % name,
            source="flag",
            agent="connected" if connected else "disconnected",
            agent_version="fake" if connected else None,
            last_seen=time.time(),
            connected_since=time.time() if connected else None,
        )
        self.keys: dict[str, tuple[str, float, str]] = {}
        self.outbox: list[tuple[int, str, str | None]] = []
        self.audit: list[AuditRow] = []
        self.seq = 0

    @property
    def connected(self) -> bool:
        return self.info.agent == "connected"

    def key_value(self, key: str) -> KeyValue:
        """``key`` as the bridge answers it: stale while the agent is not connected."""
        value, ts, origin = self.keys[key]
        return KeyValue(
            vm=self.info.name,
            key=key,
            value=value,
            ts=ts,
            origin=origin,
            stale=not self.connected,
            last_seen=self.info.last_seen,
        )

    def set_connected(self, connected: bool) -> None:
        self.info.agent = "connected" if connected else "disconnected"
        if connected:
            self.info.connected_since = time.time()
            for _, key, value in self.outbox:
                if value is None:
                    self.keys.pop(key, None)
                else:
                    self.keys[key] = (value, time.time(), "host")
            self.outbox.clear()
            self.info.queued = 0
        else:
            self.info.last_seen = time.time()


class FakeBridge:
    def __init__(self, vms=()):
        self._vms: dict[str, FakeVm] = {}
        self.calls: list[tuple] = []
        self.idempotency_keys: list[str | None] = []  # each send's, in order
        self.sent: dict[tuple[str, str], SendResult] = {}  # (vm, idempotency key) -> its answer
        self.fail_with: dict[str, Exception] = {}
        self.expires: float | None = None
        self.fresh: bool | None = None  # the last query's fresh
        self.started = time.time()
        self.events = EventHub()
        for name in vms:
            self.add_vm(name)

    def add_vm(self, name: str, connected: bool = True) -> FakeVm:
        vm = FakeVm(name, connected)
        self._vms[name] = vm
        return vm

    def fake(self, name: str) -> FakeVm:
        return self._vms[name]

    def _get(self, name: str) -> FakeVm:
        if name not in self._vms:
            raise UnknownVm(name)
        return self._vms[name]

    def _maybe_fail(self, method: str) -> None:
        exc = self.fail_with.pop(method, None)
        if exc is not None:
            raise exc

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def vms(self) -> list[VmInfo]:
        return [vm.info for vm in self._vms.values()]

    def vm(self, name: str) -> VmInfo:
        return self._get(name).info

    def check_vm(self, name: str) -> None:
        self._get(name)

    async def send(
        self,
        name,
        key,
        value,
        *,
        log=True,
        queue=True,
        timeout=5.0,
        expires=None,
        idempotency_key=None,
    ) -> SendResult:
        self.calls.append(("send", name, key, log, queue, timeout))
        self.expires = expires  # the last send's
        self.idempotency_keys.append(idempotency_key)
        vm = self._get(name)
        prior = self.sent.get((name, idempotency_key)) if idempotency_key else None
        if prior is not None:  # the real bridge's rules are tested on the real bridge
            return dataclasses.replace(prior, replayed=True)
        result = await self._send(vm, name, key, value, log, queue)
        if idempotency_key:
            self.sent[(name, idempotency_key)] = result
        return result

    async def _send(self, vm, name, key, value, log, queue) -> SendResult:
        for problem in (limits.check_key(key), limits.check_value(value)):
            if problem is not None:
                raise InvalidInput(problem[1], problem[0])
        self._maybe_fail("send")
        if not vm.connected and not queue:
            vm.audit.insert(0, self._row(vm, key, value, log, "refused"))
            raise AgentNotConnected("the agent in VM %r is not connected" % name)
        vm.seq += 1
        if vm.connected:
            vm.keys[key] = (value, time.time(), "host")
            outcome = "delivered"
        else:
            vm.outbox.append((vm.seq, key, value))
            vm.info.queued = len(vm.outbox)
            outcome = "queued"
        vm.audit.insert(0, self._row(vm, key, value, log, outcome))
        return SendResult(
            vm=name, key=key, outcome=outcome, seq=vm.seq, run_state=vm.info.run_state
        )

    def _row(self, vm, key, value, log, outcome) -> AuditRow:
        return AuditRow(
            id=len(vm.audit) + 1,
            vm=vm.info.name,
            key=key,
            size=len(value.encode("utf-8")),
            ts=time.time(),
            outcome=outcome,
            value=value.encode("utf-8")[:1024].decode("utf-8", "ignore") if log else None,
        )

    async def query(self, name, key, *, timeout=5.0, fresh=False) -> KeyValue:
        self.calls.append(("query", name, key, timeout))
        self.fresh = fresh  # the last query's
        problem = limits.check_key(key)  # the bridge checks the key, not the API
        if problem is not None:
            raise InvalidInput(problem[1], problem[0])
        vm = self._get(name)
        self._maybe_fail("query")
        if key not in vm.keys:
            raise NotFound("key %r is not set in VM %r" % (key, name))
        return vm.key_value(key)

    async def keys(self, name, *, timeout=5.0) -> KeyList:
        self.calls.append(("keys", name, timeout))
        vm = self._get(name)
        self._maybe_fail("keys")
        entries = [vm.key_value(k) for k in sorted(vm.keys)]
        return KeyList(
            vm=name, entries=entries, stale=not vm.connected, last_seen=vm.info.last_seen
        )

    async def delete(self, name, key, *, timeout=5.0) -> SendResult:
        self.calls.append(("delete", name, key, timeout))
        vm = self._get(name)
        self._maybe_fail("delete")
        vm.seq += 1
        if vm.connected:
            if key not in vm.keys:
                raise NotFound("key %r is not set in VM %r" % (key, name))
            del vm.keys[key]
            return SendResult(vm=name, key=key, outcome="delivered", seq=vm.seq)
        vm.outbox.append((vm.seq, key, None))
        vm.info.queued = len(vm.outbox)
        return SendResult(
            vm=name, key=key, outcome="queued", seq=vm.seq, run_state=vm.info.run_state
        )

    def queue(self, name, *, limit=100) -> QueueList:
        self.calls.append(("queue", name, limit))
        vm = self._get(name)
        self._maybe_fail("queue")
        messages = [
            QueuedMessage(
                seq=seq,
                key=key,
                op="del" if value is None else "set",
                size=0 if value is None else len(value.encode("utf-8")),
                log=True,
                created=self.started,
            )
            for seq, key, value in vm.outbox[:limit]
        ]
        return QueueList(vm=name, messages=messages)

    def cancel(self, name, seq=None) -> CancelResult:
        self.calls.append(("cancel", name, seq))
        vm = self._get(name)
        self._maybe_fail("cancel")
        gone = [row[0] for row in vm.outbox if seq is None or row[0] == seq]
        if seq is not None and not gone:
            raise NotFound("VM %r has no message %d waiting for delivery" % (name, seq))
        vm.outbox = [row for row in vm.outbox if row[0] not in gone]
        vm.info.queued = len(vm.outbox)
        return CancelResult(vm=name, cancelled=gone)

    def audit(self, name, *, limit=100) -> list[AuditRow]:
        self.calls.append(("audit", name, limit))
        vm = self._get(name)
        self._maybe_fail("audit")
        return vm.audit[:limit]

    def stats(self) -> dict:
        return {
            "vms": len(self._vms),
            "connected": sum(vm.connected for vm in self._vms.values()),
            "uptime": time.time() - self.started,
        }


class ServedApp:
    """The real API (hostbridge.api.make_app + start) serving ``bridge`` on real sockets, from an
    event loop in a background thread, so tests can call it with real clients and CLI processes.

        with ServedApp(FakeBridge(["vm1"]), config) as served:
            served.unix_path, served.tcp_port, served.call(coro_fn)
    """

    def __init__(self, bridge, config):
        self.bridge = bridge
        self.config = config
        self.server = None
        self.error = None
        self.loop = None
        self._ready = None
        self._thread = None

    @property
    def unix_path(self):
        return self.server.unix_path

    @property
    def tcp_port(self):
        return self.server.tcp_addresses[0][1]

    def exchange(self, data: bytes) -> bytes:
        """Send raw request bytes on the unix socket; all the server wrote until it closed."""
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(self.unix_path)
        s.sendall(data)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
        s.close()
        return b"".join(chunks)

    def __enter__(self):
        import asyncio
        import threading

        self._ready = threading.Event()

        async def serve():
            from hostbridge import api

            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                self.server = await api.start(api.make_app(self.bridge, self.config), self.config)
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread, raised there)
                self.error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.close()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API did not start within 30 s")
        if self.error is not None:
            raise self.error
        return self

    def call(self, fn):
        """Run plain function ``fn`` on the server's loop (to poke the FakeBridge safely); return
        its result."""
        import concurrent.futures

        fut = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001 (handed to the test thread)
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(30)

    def __exit__(self, *exc):
        if self.loop is not None and self.server is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        return False


def api_config(tmp_path, **overrides):
    """A config object with the attributes hostbridge.api reads (the real Config has more)."""
    import types

    values = {
        "api_socket": str(tmp_path / "api.sock"),
        "api_socket_mode": 0o660,
        "api_group": None,
        "api_tcp": None,
        "tls_cert": None,
        "tls_key": None,
        "tokens_file": None,
        "users_file": None,
        "query_timeout": 5.0,
    }
    values.update(overrides)
    return types.SimpleNamespace(**values)


def make_tls_cert(directory):
    """A self-signed certificate for 127.0.0.1/localhost made with the openssl CLI; (cert, key)."""
    import subprocess

    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def tls_api_config(directory, token, **overrides):
    """api_config() for the API on 127.0.0.1 (any port) over TLS with one bearer ``token`` (its
    tokens file, certificate and key made in ``directory``); returns (config, cert)."""
    cert, key = make_tls_cert(directory)
    tokens = directory / "tokens"
    tokens.write_text("t:%s\n" % token)
    tokens.chmod(0o600)
    config = api_config(
        directory,
        api_tcp=("127.0.0.1", 0),
        tls_cert=cert,
        tls_key=key,
        tokens_file=str(tokens),
        **overrides,
    )
    return config, cert
