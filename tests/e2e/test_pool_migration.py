"""The pool's promise with every part real: a QEMU guest running the real `ovmd` agent is
live-migrated by `virsh migrate --live` between two real libvirtds while 500 sends go through two
real pool bridges, one per libvirtd, that share one real PostgreSQL database (docs/pool.md).

Host A and host B are the two private libvirtds of tests/e2e/libvirt_pair.py. Each runs a bridge
(`python -m hostbridge.daemon --config`, pool hosts hvA and hvB) that follows that libvirtd's
lifecycle events (libvirt_uri) and discovers the channels in that libvirtd's channel directory; the
bridges serve their API over TLS on 127.0.0.1 and are in one pool on a database of this module's
own in the suite's cluster (tests/support/postgres.py). The guest (tests/e2e/guest_image.py) boots
on A with both channels' paths chosen by libvirt.

What "delivered once, in order" is proven with: the guest agent's own journal (/run/ovmd, read
inside the guest through the control port), in which every host set is recorded with the host seq
the agent applied (hseq); never the bridges' word for it. The agent applies a seq at most once and
only above its hseq, so hseq having grown by exactly the number of sends, with every key once and
in send order, is the proof.

The tests run in file order and share the hosts, the guest and the bridges:
 0. hvA owns the guest, and a send through hvB reaches it;
 1. 500 sends through B (the non-owner) and A alternately during a migration A -> B;
 2. the guest migrates back to A (A claims it again);
 3. 500 sends during a migration A -> B whose source bridge (A) is killed with SIGKILL as soon as
    the migration has begun;
 4. the handoff times: from the destination bridge's RESUMED_MIGRATED to its first delivery (after
    the migration back, with nothing queued, that delivery is simply the test's next send).
Figures are printed (run with -s); no timing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from guestagent.store import CacheStore, unframe
from hostbridge.apiclient import ApiError, Client
from tests.e2e.guest_image import AGENT_PORT, CONTROL_PORT, Image
from tests.e2e.libvirt_daemon import CHANNEL_TARGET_DIR, LibvirtError, domain_xml
from tests.e2e.libvirt_pair import MIGRATE_TIMEOUT, LibvirtHost, migrate, preflight, running_pair
from tests.e2e.qemu import GuestControl
from tests.hostbridge.pool_harness import PoolSecrets, api_send, free_port, store_url
from tests.support.postgres import PostgresCluster
from tests.support.processes import PYTHON, Process, child_env, script
from tests.support.waiting import wait_for

# At most 20 characters: libvirt's channel directory carries the name whole.
VM = "ovmd-pool-%s" % os.urandom(3).hex()
HOSTS = {"A": "hvA", "B": "hvB"}
SENDS = 500
BEFORE = 100  # sends answered before the migration begins
LAST = 100  # sends held back until the migration has ended: some go to the new owner directly
BOOT_TIMEOUT = 120.0  # boot to control program ready: ~7 s idle, far slower on a loaded machine
TIMEOUT = 60.0
# Longer than any stall of a heartbeat on a loaded machine: no test here is about a dead host's
# lease (the killed source's VM is taken by the destination's forced claim at RESUMED_MIGRATED).
LEASE = 10.0
SEND_WAIT = 5.0  # how long a send waits for the agent's acknowledgement before it is "queued"
RETRY_CODES = ("unreachable", "owner_unavailable", "store_unavailable")
STATE_DIR = "/run/ovmd"  # the agent's cache in the guest (guest_image.py)
LOG_TAIL = 80

pytestmark = pytest.mark.timeout(300)


def _toml(value: object) -> str:
    return json.dumps(value)  # a JSON string or number, or a list of strings, is TOML too


# -- the parts -------------------------------------------------------------------------------


class PoolHost(Process):
    """The real bridge daemon of one libvirt host in the pool: ``python -m hostbridge.daemon``
    with a configuration file that names that libvirtd (lifecycle events) and its channel
    directory (discovery). Its log is kept in ``logdir`` (the API socket needs a short path, the
    log does not)."""

    def __init__(self, name: str, lv: LibvirtHost, secrets: PoolSecrets, url: str, logdir: str):
        super().__init__()
        self.name = name
        self.lv = lv
        self.secrets = secrets
        os.makedirs(logdir, exist_ok=True)
        self.log_path = os.path.join(logdir, "bridge.log")
        self.api_socket = os.path.join(self.dir, "api.sock")
        self.port = free_port()
        self.url = "https://127.0.0.1:%d" % self.port
        self.config_path = os.path.join(logdir, "bridge.toml")
        s = secrets
        lines = [
            "[bridge]",
            "db = %s" % _toml(os.path.join(logdir, "unused.sqlite3")),
            "discover = true",
            "libvirt_dirs = %s" % _toml([lv.outside(CHANNEL_TARGET_DIR)]),
            "libvirt_uri = %s" % _toml(lv.uri),
            "api_socket = %s" % _toml(self.api_socket),
            'api_tcp = "127.0.0.1:%d"' % self.port,
            "tls_cert = %s" % _toml(s.cert),
            "tls_key = %s" % _toml(s.tls_key),
            "tokens_file = %s" % _toml(s.tokens_file),
            "",
            "[store]",
            "url = %s" % _toml(url),
            "",
            "[pool]",
            "host = %s" % _toml(name),
            "url = %s" % _toml(self.url),
            "key_file = %s" % _toml(s.key_file),
            "ca_file = %s" % _toml(s.cert),
            "lease = %s" % _toml(LEASE),
            "",
        ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines))

    def command(self) -> list[str]:
        return [PYTHON, "-m", "hostbridge.daemon", "--config", self.config_path, "-d", "1"]

    def start(self) -> PoolHost:
        super().start()
        return self

    def wait_ready(self, timeout: float = TIMEOUT) -> PoolHost:
        def ready() -> bool:
            if not self.running:
                raise AssertionError("bridge %s exited:\n%s" % (self.name, self.log()[-4000:]))
            return "INFO: ready\n" in self.log()

        wait_for(ready, timeout, what="bridge %s to be ready" % self.name)
        return self

    def client(self) -> Client:
        """An API client over TLS with the pool's test token, as a remote manager has."""
        return Client(self.url, token=self.secrets.token, cacert=self.secrets.cert, timeout=30.0)

    def vmmessage(self, *args: str, tcp: bool = True) -> subprocess.CompletedProcess[str]:
        """`vmmessage ARGS` against this bridge: over TLS (the token and CA), or its unix socket."""
        if tcp:
            where = ["--bridge", self.url, "--token", self.secrets.token]
            where += ["--cacert", self.secrets.cert]
        else:
            where = ["--bridge", self.api_socket]
        return subprocess.run(
            [script("vmmessage"), *where, *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=child_env(drop_prefixes=("VMMESSAGE_",)),
        )

    def json(self, *args: str) -> Any:
        r = self.vmmessage("--json", *args, tcp=False)
        assert r.returncode == 0, "vmmessage %s via %s: %s" % (args[0], self.name, r.stderr)
        return json.loads(r.stdout)

    def owner(self) -> str | None:
        """The owner of VM in this bridge's `vmmessage list` ("?" when it does not list VM)."""
        doc = self.json("list")
        vms = doc["vms"] if isinstance(doc, dict) else doc
        return next((vm.get("host") for vm in vms if vm["name"] == VM), "?")

    def wait_owner(self, owner: str) -> None:
        wait_for(lambda: self.owner() == owner, TIMEOUT, 0.2, "%s to list %s" % (self.name, owner))

    def agent(self) -> str | None:
        r = self.vmmessage("--json", "status", VM, tcp=False)
        return json.loads(r.stdout).get("agent") if r.returncode == 0 else None

    def tail(self, lines: int = LOG_TAIL) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class Watch:
    """`vmmessage watch --json` on one bridge, as an operator runs it: every event of VM, kept
    with the stream's own time (the bridge's clock), in order."""

    def __init__(self, host: PoolHost) -> None:
        self.host = host
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [script("vmmessage"), "--bridge", host.api_socket, "watch", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=child_env(drop_prefixes=("VMMESSAGE_",)),
        )
        self.thread = threading.Thread(target=self._read, name="watch", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("vm") == VM:
                self.events.append(ev)

    def of(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.events)
            if e.get("type") == kind and all(e.get(k) == v for k, v in match.items())
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.thread.join(10)


@dataclass
class Sent:
    index: int
    via: str
    outcome: str
    answered: float  # time.time() when the answer came
    seq: int | None  # the VM's seq the bridge gave it


class Sender(threading.Thread):
    """Sends PREFIX.k000=0, PREFIX.k001=1, ... to VM one after the other (each answered before the
    next goes), through the bridges of ``via`` in turn, each with its own idempotency key; when a
    bridge cannot be reached or answers that it cannot now, the same key goes to the next bridge
    (a retry, never a second message: docs/api.md). Send LAST-from-the-end waits for
    ``may_finish``: the last sends go once the migration has ended."""

    def __init__(self, hosts: dict[str, PoolHost], prefix: str, via: tuple[str, ...]) -> None:
        super().__init__(name="sender", daemon=True)
        self.prefix = prefix
        self.via = via
        self.clients = {h: hosts[h].client() for h in via}
        self.sent: list[Sent] = []
        self.retries: dict[str, int] = {}
        self.replayed = 0
        self.failures: list[str] = []
        self.may_finish = threading.Event()
        self.stop = threading.Event()
        self.elapsed = 0.0

    def key(self, i: int) -> str:
        return "%s.k%03d" % (self.prefix, i)

    def run(self) -> None:
        started = time.monotonic()
        for i in range(SENDS):
            if i == SENDS - LAST:
                self.may_finish.wait(MIGRATE_TIMEOUT + TIMEOUT)
            if self.stop.is_set() or not self.one(i):
                break
        self.elapsed = time.monotonic() - started

    def one(self, i: int) -> bool:
        ident = "%s-%s-%d" % (VM, self.prefix, i)
        for attempt in range(200):
            via = self.via[(i + attempt) % len(self.via)]
            try:
                answer = api_send(self.clients[via], VM, self.key(i), str(i), ident, SEND_WAIT)
            except ApiError as e:
                if e.code in RETRY_CODES and not self.stop.is_set():
                    self.retries[e.code] = self.retries.get(e.code, 0) + 1
                    if attempt % len(self.via) == len(self.via) - 1:
                        time.sleep(0.05)  # every bridge refused once: give them a moment
                    continue
                self.failures.append("send %d through %s: %s" % (i, via, e.code))
                return False
            outcome = str(answer.get("outcome"))
            if answer.get("replayed"):
                self.replayed += 1  # a retry of a send that had been taken: its first answer
            seq = answer.get("seq")
            self.sent.append(
                Sent(i, via, outcome, time.time(), seq if isinstance(seq, int) else None)
            )
            if outcome not in ("delivered", "queued"):
                self.failures.append("send %d through %s: outcome %s" % (i, via, outcome))
                return False
            return True
        self.failures.append("send %d: no bridge took it after 200 attempts" % i)
        return False

    def wait_done(self, count: int, timeout: float = TIMEOUT) -> None:
        def there() -> bool:
            if self.failures:
                raise AssertionError("; ".join(self.failures))
            if not self.is_alive() and len(self.sent) < count:
                raise AssertionError("the sender stopped after %d sends" % len(self.sent))
            return len(self.sent) >= count

        wait_for(there, timeout, interval=0.05, what="%d sends answered" % count)

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.sent:
            if since <= s.answered < until:
                counts[s.outcome] = counts.get(s.outcome, 0) + 1
        return counts


class Migration(threading.Thread):
    """`virsh migrate --live` of VM from ``src`` to ``dst`` on a thread of its own, so that the
    test acts while it runs."""

    def __init__(self, src: LibvirtHost, dst: LibvirtHost) -> None:
        super().__init__(name="migration", daemon=True)
        self.src, self.dst = src, dst
        self.began = 0.0  # time.time()
        self.ended = 0.0
        self.error: str | None = None

    def run(self) -> None:
        self.began = time.time()
        try:
            migrate(self.src, self.dst, VM)
        except (LibvirtError, subprocess.SubprocessError) as e:
            self.error = str(e)
        finally:
            self.ended = time.time()

    def finish(self) -> None:
        self.join(MIGRATE_TIMEOUT + 10)
        assert not self.is_alive(), "virsh migrate did not return"
        assert self.error is None, self.error


@dataclass
class Handoff:
    """One migration's handoff, as the destination bridge saw it (its stream's clock)."""

    what: str
    resumed: float | None = None  # RESUMED_MIGRATED on the destination
    resumed_from: str = ""  # where that time was read
    first_delivery: float | None = None
    first_seq: int | None = None
    backlog: int = 0  # sends answered "queued" during the migration, before RESUMED_MIGRATED
    drained: float | None = None  # when the destination delivered the last of them
    notes: list[str] = field(default_factory=list)

    def seconds(self) -> float | None:
        if self.resumed is None or self.first_delivery is None:
            return None
        return self.first_delivery - self.resumed


class Env:
    def __init__(self, a: LibvirtHost, b: LibvirtHost, workdir: str) -> None:
        self.lv = {"A": a, "B": b}
        self.workdir = workdir
        self.serial_log = os.path.join(workdir, "serial.log")
        self.bridges: dict[str, PoolHost] = {}
        self.on = "A"  # the libvirt host that runs the guest
        self._ctl: GuestControl | None = None
        self.handoffs: list[Handoff] = []
        self.watches: list[Watch] = []

    def bridge(self, host: str) -> PoolHost:
        return self.bridges[HOSTS[host]]

    def control(self) -> GuestControl:
        """The guest's control program, through the control channel of the host it runs on."""
        if self._ctl is None:
            path = self.lv[self.on].channel_socket(VM, CONTROL_PORT)
            self._ctl = GuestControl(path, self.serial_log)
            self._ctl.wait_ready(BOOT_TIMEOUT)
        return self._ctl

    def moved_to(self, host: str) -> None:
        self.on = host
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def watch(self, host: str) -> Watch:
        w = Watch(self.bridge(host))
        self.watches.append(w)
        return w

    def logs(self) -> str:
        return "\n".join(
            "----- bridge %s (last %d lines) -----\n%s" % (name, LOG_TAIL, b.tail())
            for name, b in self.bridges.items()
        )

    def close(self) -> None:
        for w in self.watches:
            w.stop()
        if self._ctl is not None:
            self._ctl.close()
        for b in self.bridges.values():
            b.close()


# -- the guest's own record ------------------------------------------------------------------


@dataclass
class GuestRecord:
    hseq: int
    host_sets: list[tuple[int, str, str]]  # (seq, key, value) in the order applied
    epochs: int  # host streams followed since the journal began


def guest_record(ctl: GuestControl) -> GuestRecord:
    """The agent's journal and snapshot, read in the guest: every host set with the host seq the
    agent recorded as applied for it, and its hseq now."""
    snap = ctl.run(["cat", os.path.join(STATE_DIR, CacheStore.FILENAME)])
    hseq = int(json.loads(snap.stdout)["hseq"]) if snap.rc == 0 and snap.stdout else 0
    r = ctl.run(["cat", os.path.join(STATE_DIR, CacheStore.JOURNAL)])
    lines = r.stdout.split(b"\n") if r.rc == 0 else []
    ops: list[list[Any]] = []
    for line in lines[1:]:  # the first line is the journal's header
        if line:
            record = unframe(line)
            assert isinstance(record, list), record
            ops.extend(record)
    sets: list[tuple[int, str, str]] = []
    pending: tuple[str, str] | None = None
    epochs = 0
    for op in ops:
        if op[0] == "p":
            epochs += 1
            hseq = 0
        elif op[0] == "s" and op[4] == "host":
            pending = (str(op[1]), str(op[2]))
        elif op[0] == "h":
            hseq = int(op[1])
            if pending is not None:
                sets.append((hseq, *pending))
                pending = None
    return GuestRecord(hseq, sets, epochs)


def guest_cache(ctl: GuestControl) -> dict[str, str]:
    """`ovmd -l` in the guest: {key: value} in the cache's order."""
    r = ctl.run(["ovmd", "-l"])
    assert r.rc == 0, r.stderr
    cache: dict[str, str] = {}
    for line in r.stdout.decode().splitlines():
        if line.strip():
            cache.update(json.loads(line))
    return cache


# -- fixture ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(image: Image, postgres_cluster: PostgresCluster) -> Iterator[Env]:
    why = preflight()
    if why is not None:
        pytest.skip("libvirt or QEMU is missing: %s" % why)
    cluster = postgres_cluster.start()  # running, whatever an earlier test did to it
    workdir = tempfile.mkdtemp(prefix="e2e-pool-", dir="/tmp")
    url = store_url(cluster.create_database("pool_e2e_%s" % os.urandom(4).hex()))
    secrets = PoolSecrets.make(Path(workdir), "e2e")
    try:
        with running_pair(workdir) as (a, b), contextlib.ExitStack() as stack:
            print("\nhost A up in %.1f s, host B up in %.1f s" % (a.start_seconds, b.start_seconds))
            e = Env(a, b, workdir)
            stack.callback(e.close)
            xml = domain_xml(
                VM,
                image.kernel,
                image.initrd,
                image.cmdline,
                channels=[(AGENT_PORT, None), (CONTROL_PORT, None)],
                serial_log=e.serial_log,
            )
            started = time.monotonic()
            a.create(xml)
            assert e.control().call("ping")["agent_pid"] is not None, "no agent in the guest"
            print(
                "guest control ready on A %.1f s after virsh create" % (time.monotonic() - started)
            )
            for host, lv in e.lv.items():
                name = HOSTS[host]
                e.bridges[name] = PoolHost(
                    name, lv, secrets, url, os.path.join(workdir, "bridge-" + name)
                )
            # Both at once: hvA's claim may land while hvB starts, and hvB must hear of it (it
            # LISTENs before it reads the placements).
            e.bridge("A").start()
            e.bridge("B").start()
            e.bridge("A").wait_ready()
            e.bridge("B").wait_ready()
            e.bridge("A").wait_owner("hvA")
            e.bridge("B").wait_owner("hvA")
            try:
                yield e
            finally:
                # What each bridge said, for a failure's report (pytest shows it then).
                print(e.logs())
    except LibvirtError as err:
        pytest.fail("libvirt: %s" % err)
    finally:
        if os.environ.get("OVMD_E2E_KEEP") is None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the tests -------------------------------------------------------------------------------


def test_the_guest_on_host_a_should_be_owned_by_hva_and_reachable_through_hvb(env: Env) -> None:
    a, b = env.bridge("A"), env.bridge("B")
    wait_for(lambda: a.agent() == "connected", TIMEOUT, 0.2, "hvA to sync with the guest's agent")
    for bridge in (a, b):
        bridge.wait_owner("hvA")
    r = b.vmmessage("send", VM, "warmup", "through-hvB")
    assert (r.returncode, r.stdout) == (0, "Message sent successfully.\n"), r.stderr
    assert guest_cache(env.control())["warmup"] == "through-hvB"


def _sends_during_a_migration(env: Env, prefix: str, kill_source: bool) -> tuple[Sender, Handoff]:
    """SENDS sends through B and A in turn while the guest migrates from A to B (A's bridge
    killed with SIGKILL as soon as the migration has begun, with ``kill_source``); then the
    guest's journal, cache, owner and outbox are checked."""
    a, b = env.bridge("A"), env.bridge("B")
    ctl = env.control()
    before = guest_record(ctl)
    watch = env.watch("B")
    sender = Sender(env.bridges, prefix, via=("hvB", "hvA"))
    mig = Migration(env.lv["A"], env.lv["B"])
    killed_at = None
    try:
        sender.start()
        sender.wait_done(BEFORE)
        mig.start()
        if kill_source:
            # The destination's QEMU, paused, is listed by B's libvirtd as soon as the incoming
            # migration has begun; the memory copy takes seconds after that.
            wait_for(lambda: VM in env.lv["B"].domains(), TIMEOUT, 0.05, "the incoming domain")
            a.kill()
            killed_at = time.time()
            assert mig.is_alive(), "the migration ended before the source bridge was killed"
        mig.finish()
    finally:
        sender.may_finish.set()
    try:
        sender.wait_done(SENDS, timeout=TIMEOUT * 2)
    finally:
        sender.stop.set()
        sender.join(TIMEOUT)
    env.moved_to("B")
    print(
        "%s: %d sends in %.1f s (%s); retried elsewhere: %s; virsh migrate %.2f s, %s sends "
        "answered during it: %s%s"
        % (
            prefix,
            len(sender.sent),
            sender.elapsed,
            sender.outcomes(),
            sender.retries or "none",
            mig.ended - mig.began,
            sum(sender.outcomes(mig.began, mig.ended).values()),
            sender.outcomes(mig.began, mig.ended),
            ""
            if killed_at is None
            else "; hvA killed %.2f s after it began" % (killed_at - mig.began),
        )
    )
    assert not sender.failures, sender.failures
    assert env.lv["A"].domains() == [] and VM in env.lv["B"].domains()

    # Every message leaves the shared outbox: delivered by B, the new owner.
    wait_for(lambda: b.json("status", VM)["queued"] == 0, TIMEOUT, 0.2, "the outbox to be empty")
    b.wait_owner("hvB")
    if not kill_source:
        a.wait_owner("hvB")
        assert a.json("status", VM)["queued"] == 0
    r = b.vmmessage("list")
    row = [line for line in r.stdout.splitlines() if line.split()[:1] == [VM]]
    assert r.returncode == 0 and len(row) == 1 and "hvB" in row[0].split(), r.stdout

    # The guest's own record: each send applied once, in send order, with hseq as its count.
    ctl = env.control()
    after = guest_record(ctl)
    assert after.epochs == before.epochs, "the agent followed a new host stream"
    sets = [s for s in after.host_sets if s[1].startswith(prefix + ".")]
    keys = [key for _, key, _ in sets]
    expected = [sender.key(i) for i in range(SENDS)]
    missing = sorted(set(expected) - set(keys))
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not missing and not twice, "missing %s, applied twice %s" % (missing[:10], twice[:10])
    assert keys == expected, "applied out of order"
    assert [value for _, _, value in sets] == [str(i) for i in range(SENDS)]
    seqs = [seq for seq, _, _ in sets]
    assert all(x < y for x, y in zip(seqs, seqs[1:])), "host seqs not strictly increasing"
    assert after.hseq - before.hseq == SENDS, (before.hseq, after.hseq)
    cache = guest_cache(ctl)
    assert all(cache.get(sender.key(i)) == str(i) for i in range(SENDS))
    # The audit (shared) holds each send once, delivered.
    audit = b.json("audit", VM, "--limit", "1000")["entries"]
    mine = [row for row in audit if row["key"].startswith(prefix + ".")]
    assert sorted(row["key"] for row in mine) == expected, "the audit does not hold each send once"
    outcomes: dict[str, int] = {}
    for row in mine:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    print(
        "%s: the audit's outcomes: %s; answers replayed: %d" % (prefix, outcomes, sender.replayed)
    )

    handoff = measure_handoff(
        env, watch, mig.began, sender, "A -> B" + (", hvA killed" if kill_source else "")
    )
    watch.stop()
    return sender, handoff


def forced_claims(log: str) -> list[float]:
    """When the bridge's log says it claimed VM by force (what it does at RESUMED_MIGRATED), to
    the millisecond of its log's clock."""
    pattern = r"^(\S+ \S+),(\d+) \S+ INFO: VM '%s': claimed \(fence \d+, forced\)" % re.escape(VM)
    return [
        time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
        for m in re.finditer(pattern, log, re.M)
    ]


def measure_handoff(
    env: Env, watch: Watch, began: float, sender: Sender | None, what: str
) -> Handoff:
    """From the destination's RESUMED_MIGRATED (its stream's vm.state, else its log's forced
    claim) of the migration that ``began`` (time.time()) to its first message.delivered; the
    destination never delivers before."""
    h = Handoff(what)
    dest = watch.host
    wait_for(lambda: watch.of("message.delivered"), TIMEOUT, 0.1, "a delivery on the stream")
    resumed = [
        float(e["time"])
        for e in watch.of("vm.state", reason="RESUMED_MIGRATED")
        if float(e["time"]) >= began
    ]
    if resumed:
        h.resumed, h.resumed_from = resumed[0], "vm.state on its stream"
    else:
        h.notes.append("no vm.state RESUMED_MIGRATED on %s's stream" % dest.name)
        # The log's clock has milliseconds: a claim in the same millisecond as ``began`` counts.
        claims = [t for t in forced_claims(dest.log()) if t >= began - 0.001]
        if claims:
            h.resumed, h.resumed_from = claims[0], "its log's forced claim (ms)"
    assert h.resumed is not None, "%s never saw RESUMED_MIGRATED:\n%s" % (dest.name, dest.tail())
    delivered = watch.of("message.delivered")
    early = [e for e in delivered if float(e["time"]) < h.resumed]
    assert not early, "%s delivered before RESUMED_MIGRATED: %s" % (dest.name, early[:3])
    h.first_delivery, h.first_seq = float(delivered[0]["time"]), delivered[0].get("seq")
    kinds: list[str] = []  # what the destination's stream said, in order, until that delivery
    for e in list(watch.events):
        if began <= float(e["time"]) <= h.first_delivery and e["type"] not in kinds:
            kinds.append(e["type"])
    h.notes.append("%s's stream from the migration on: %s" % (dest.name, ", ".join(kinds)))
    if sender is not None:
        backlog = [
            s.seq
            for s in sender.sent
            if s.outcome == "queued" and began <= s.answered < h.resumed and s.seq is not None
        ]
        h.backlog = len(backlog)
        last = [e for e in delivered if backlog and e.get("seq") == max(backlog)]
        if last:
            h.drained = float(last[0]["time"])
    env.handoffs.append(h)
    return h


def test_500_sends_through_both_bridges_during_a_live_migration_should_be_applied_once_in_order(
    env: Env,
) -> None:
    _sends_during_a_migration(env, "m1", kill_source=False)


def test_the_guest_should_migrate_back_to_host_a_and_be_delivered_to_by_hva_again(
    env: Env,
) -> None:
    a, b = env.bridge("A"), env.bridge("B")
    watch = env.watch("A")
    began = time.time()
    took = migrate(env.lv["B"], env.lv["A"], VM)
    env.moved_to("A")
    print("virsh migrate --live B -> A: %.2f s" % took)
    for bridge in (a, b):
        bridge.wait_owner("hvA")
    r = b.vmmessage("send", VM, "back", "on-A")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: guest_cache(env.control()).get("back") == "on-A", TIMEOUT, 0.2, "back=on-A")
    measure_handoff(env, watch, began, None, "B -> A, no sends during it")
    watch.stop()


def test_sends_during_a_migration_whose_source_bridge_is_killed_should_be_applied_once_in_order(
    env: Env,
) -> None:
    _sends_during_a_migration(env, "m2", kill_source=True)


def test_the_handoff_times_should_be_recorded(env: Env) -> None:
    assert len(env.handoffs) == 3, env.handoffs
    for h in env.handoffs:
        took = h.seconds()
        assert took is not None
        assert h.resumed is not None
        drained = "" if h.drained is None else ", the last of them %.3f s" % (h.drained - h.resumed)
        print(
            "handoff %s: RESUMED_MIGRATED (%s) -> first delivery (seq %s) %.3f s; %d sends "
            "answered queued during the migration before it%s%s"
            % (
                h.what,
                h.resumed_from,
                h.first_seq,
                took,
                h.backlog,
                drained,
                "".join("; " + n for n in h.notes),
            )
        )
