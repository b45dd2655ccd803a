"""A pool of three hosts, as users meet it: three bridge processes on one PostgreSQL database, real
`ovmd` agents, `vmmessage` over the bridges' TLS APIs, live migrations whose channel socket moves
from one host's libvirt directory to another's, bridges killed with SIGKILL, the database
restarted (docs/pool.md). libvirt's lifecycle events are played by the test
(tests/hostbridge/pool_harness.py).

What "delivered once, in order" is proven with: the agent's own journal of what it applied (each
host set with the seq it recorded as applied, hseq), never the bridges' word for it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hostbridge.pool_harness import HOSTS, ApiError, Pool, Vm, api_send
from tests.support.postgres import PostgresCluster
from tests.support.waiting import wait_for

# Every test stays well under a minute on an idle machine; the bound leaves room for a busy one.
pytestmark = pytest.mark.timeout(90)

LOG_TAIL = 200  # lines of each bridge's log printed with a failing test


def _database(request: pytest.FixtureRequest) -> str:
    name = request.node.name.removeprefix("test_")
    return ("pool_" + "".join(c if c.isalnum() else "_" for c in name))[:60].lower()


def _print_logs(pool: Pool) -> None:
    # pytest shows what a test printed only when it fails: then, what each bridge said.
    for name, bridge in pool.bridges.items():
        lines = bridge.log().splitlines()
        print("----- bridge %s (last %d lines) -----" % (name, LOG_TAIL))
        print("\n".join(lines[-LOG_TAIL:]))


@contextlib.contextmanager
def new_pool(
    cluster: PostgresCluster, request: pytest.FixtureRequest, lease: float = 3.0
) -> Iterator[Pool]:
    """A pool of three bridges on a new database of ``cluster``, not started yet; their logs
    are printed on the way out (pytest shows them when the test failed)."""
    with Pool(cluster, _database(request), lease=lease) as p:
        try:
            yield p
        finally:
            _print_logs(p)


def start_in_order(pool: Pool) -> Pool:
    """hv1, then hv2, then hv3: each bridge knows the hosts started before it, so a test that
    sends through a later host is not about a host joining the pool (the first test is)."""
    for host in HOSTS:
        pool.start(host)
    return pool


@pytest.fixture
def pool(postgres_server: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[Pool]:
    with new_pool(postgres_server, request) as p:
        yield start_in_order(p)


def sent(r: Any) -> bool:
    return r.returncode == 0 and r.stdout == "Message sent successfully.\n"


def queued(r: Any) -> bool:
    return r.returncode == 0 and r.stdout.startswith("Message queued")


def wait_value(vm: Vm, key: str, value: str, timeout: float = 20.0) -> None:
    wait_for(
        lambda: vm.value(key) == value,
        timeout,
        interval=0.2,
        what="%s's agent to have %s=%s" % (vm.name, key, value),
    )


def host_sets(vm: Vm) -> list[tuple[int, str, str]]:
    """(seq, key, value) of every host set the agent applied, in the order it applied them, from
    its journal: each set is recorded with the host seq it applied (hseq). A new epoch (a host
    stream started again from seq 1) fails: in a pool the stream follows the VM."""
    out = []
    pending: tuple[str, str] | None = None
    for op in vm.journal():
        if op[0] == "p":
            raise AssertionError("the agent followed a new host stream (epoch %s)" % op[1])
        if op[0] == "s" and op[4] == "host":
            pending = (op[1], op[2])
        elif op[0] == "h":
            assert pending is not None, "a host seq applied without its set"
            out.append((int(op[1]), *pending))
            pending = None
    return out


# -- any bridge answers for any VM ---------------------------------------------------------------


def test_a_send_through_a_bridge_that_does_not_run_the_vm_should_be_acknowledged_by_its_owner(
    postgres_server: PostgresCluster, request: pytest.FixtureRequest
) -> None:
    # hv1 joins the pool last, and the lease is long: hv2 and hv3 forward to a host that
    # registered after they started, well before their next heartbeat reads the hosts again.
    with new_pool(postgres_server, request, lease=15.0) as pool:
        pool.start("hv2", "hv3")
        pool.start("hv1")
        forwarded_to_a_new_host(pool)


def forwarded_to_a_new_host(pool: Pool) -> None:
    web = pool.start_vm("web1", "hv1")
    pool.start_vm("db1", "hv2")

    r = pool.vmmessage("send", "web1", "color", "blue", via="hv2")
    assert sent(r), (r.returncode, r.stdout, r.stderr)
    # Acknowledged: the agent had it before the answer.
    assert web.value("color") == "blue"

    # A query through a third host is live: the guest's own change, seen at once.
    assert web.agent.ovmd("-p", "from.guest=g1").returncode == 0
    r = pool.vmmessage("--json", "query", "web1", "from.guest", "--fresh", via="hv3")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert (answer["value"], answer["stale"], answer["origin"]) == ("g1", False, "guest")

    for via in HOSTS:
        vms = pool.vm_list(via)
        assert {name: vm["host"] for name, vm in vms.items()} == {"web1": "hv1", "db1": "hv2"}
    r = pool.vmmessage("list", via="hv3")
    assert r.returncode == 0 and "HOST" in r.stdout.splitlines()[0]


def test_a_send_to_a_vm_whose_owner_is_down_should_be_queued_and_delivered_when_it_is_back(
    pool: Pool,
) -> None:
    web = pool.start_vm("web1", "hv1")
    pool.kill("hv1")

    r = pool.vmmessage("send", "web1", "k1", "while-down", via="hv2")
    assert queued(r), (r.returncode, r.stdout, r.stderr)
    r = pool.vmmessage("--json", "send", "web1", "k2", "while-down-too", via="hv3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outcome"] == "queued"
    assert web.value("k1") is None

    pool.restart("hv1")
    wait_value(web, "k2", "while-down-too")
    assert web.value("k1") == "while-down"
    assert [key for _, key, _ in host_sets(web)] == ["k1", "k2"]


# -- live migration ------------------------------------------------------------------------------


class Sender(threading.Thread):
    """Sends k000=0, k001=1, ... to one VM, one after the other (each answered before the next
    is sent), through ``via`` in turn, each with its own idempotency key; a bridge that cannot
    be reached is replaced by the next one, with the same key (a retry, never a second message).
    """

    def __init__(self, pool: Pool, vm: str, count: int, via: tuple[str, ...]) -> None:
        super().__init__(name="sender", daemon=True)
        self.vm = vm
        self.count = count
        self.via = via
        self.clients = {h: pool.bridges[h].client() for h in via}
        self.done = 0
        self.outcomes: dict[str, int] = {}
        self.retries = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.elapsed = 0.0

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.count):
            if self.stop.is_set() or not self.one(i):
                break
            self.done = i + 1
        self.elapsed = time.monotonic() - start

    def one(self, i: int) -> bool:
        ident = "%s-%d" % (self.vm, i)
        for attempt in range(40):
            host = self.via[(i + attempt) % len(self.via)]
            try:
                answer = api_send(self.clients[host], self.vm, "k%03d" % i, str(i), ident)
            except ApiError as e:
                # A bridge down, the VM's host dying with the request, the database away: the
                # same key again (elsewhere) is a retry, never a second message (docs/api.md).
                if e.code in RETRY_CODES and not self.stop.is_set():
                    self.retries += 1
                    time.sleep(0.05)
                    continue
                self.failures.append("send %d through %s: %s: %s" % (i, host, e.code, e.message))
                return False
            outcome = answer.get("outcome", "?")
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome not in ("delivered", "queued"):
                self.failures.append("send %d through %s: outcome %s" % (i, host, outcome))
                return False
            return True
        self.failures.append("send %d: no bridge could be reached" % i)
        return False

    def wait_done(self, count: int, timeout: float = 30.0) -> None:
        def there() -> bool:
            if self.failures:
                raise AssertionError("; ".join(self.failures))
            if not self.is_alive() and self.done < count:
                raise AssertionError("the sender stopped after %d sends" % self.done)
            return self.done >= count

        wait_for(there, timeout, interval=0.05, what="%d sends answered" % count)


SENDS = 500
RETRY_CODES = ("unreachable", "owner_unavailable", "store_unavailable")


def _sends_during_a_migration(pool: Pool, kill_source: bool) -> None:
    vm = pool.start_vm("web1", "hv1")
    r = pool.vmmessage("send", "web1", "warmup", "1", via="hv1")
    assert sent(r), (r.returncode, r.stdout, r.stderr)
    sender = Sender(pool, "web1", SENDS, via=("hv3", "hv1"))
    sender.start()
    try:
        sender.wait_done(100)
        pool.migration_begin(vm, "hv2")  # hv1: SUSPENDED_MIGRATED; hv2: STARTED_MIGRATED
        sender.wait_done(sender.done + 40)
        if kill_source:
            pool.kill("hv1")
            sender.wait_done(sender.done + 40)
        pool.migration_resume(vm)  # the socket moves; hv2: RESUMED_MIGRATED
        sender.wait_done(sender.done + 40)
        pool.migration_end(vm)  # hv1: STOPPED_MIGRATED (missed when it is dead)
        sender.wait_done(SENDS, timeout=60)
    finally:
        sender.stop.set()
        sender.join(30)
    print(
        "%d sends in %.1f s: %s, %d retries elsewhere"
        % (sender.done, sender.elapsed, sender.outcomes, sender.retries)
    )
    assert not sender.failures, sender.failures

    wait_value(vm, "k%03d" % (SENDS - 1), str(SENDS - 1), timeout=30)
    sets = [s for s in host_sets(vm) if s[1] != "warmup"]
    keys = [key for _, key, _ in sets]
    expected = ["k%03d" % i for i in range(SENDS)]
    missing = sorted(set(expected) - set(keys))
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not missing and not twice, "missing %s, applied twice %s" % (missing[:10], twice[:10])
    assert keys == expected, "applied out of order"
    seqs = [seq for seq, _, _ in sets]
    assert seqs == sorted(set(seqs)), "host seqs not strictly increasing"
    assert [value for _, _, value in sets] == [str(i) for i in range(SENDS)]
    # The cache agrees: each key once, in the order set.
    assert [k for k in vm.keys() if k != "warmup"] == expected
    pool.wait_owner("web1", "hv2", via="hv3")


def test_sends_through_two_bridges_during_a_live_migration_should_be_applied_once_in_order(
    pool: Pool,
) -> None:
    _sends_during_a_migration(pool, kill_source=False)


def test_sends_during_a_migration_whose_source_bridge_is_killed_should_be_applied_once_in_order(
    pool: Pool,
) -> None:
    _sends_during_a_migration(pool, kill_source=True)


def test_a_failed_migration_should_leave_delivery_with_the_source(pool: Pool) -> None:
    vm = pool.start_vm("web1", "hv1")
    pool.migration_begin(vm, "hv2")
    assert vm.incoming is not None
    incoming = vm.incoming[1]

    r = pool.vmmessage("send", "web1", "k1", "during", via="hv3")
    assert queued(r), (r.returncode, r.stdout, r.stderr)

    pool.migration_fail(vm)  # hv2: STOPPED_FAILED, its socket gone; hv1: RESUMED_MIGRATED
    wait_value(vm, "k1", "during")
    r = pool.vmmessage("send", "web1", "k2", "after", via="hv2")
    assert sent(r), (r.returncode, r.stdout, r.stderr)
    assert vm.value("k2") == "after"
    for via in HOSTS:
        assert pool.vm_list(via)["web1"]["host"] == "hv1"
    assert vm.standin.connects(incoming) == 0
    assert [key for _, key, _ in host_sets(vm)] == ["k1", "k2"]


def test_the_destination_should_not_connect_to_the_channel_while_the_vm_is_paused(
    pool: Pool,
) -> None:
    vm = pool.start_vm("web1", "hv1")
    pool.migration_begin(vm, "hv2")
    assert vm.incoming is not None
    incoming = vm.incoming[1]
    # hv2 rescans its whole libvirt directory each round: once it has attached a VM whose socket
    # appeared after web1's, it has seen web1's socket too (more than once).
    pool.start_vm("marker", "hv2")
    pool.start_vm("marker2", "hv2")
    assert vm.standin.connects(incoming) == 0

    pool.migration_resume(vm)
    pool.wait_agent("web1", "hv2")
    pool.migration_end(vm)
    assert vm.standin.connects(incoming) >= 1
    r = pool.vmmessage("send", "web1", "k1", "after", via="hv1")
    assert sent(r), (r.returncode, r.stdout, r.stderr)
    assert vm.value("k1") == "after"
    assert pool.vm_list("hv1")["web1"]["host"] == "hv2"


# -- faults ---------------------------------------------------------------------------------------


def test_a_killed_bridges_vms_should_be_released_after_the_lease_and_claimed_at_its_restart(
    pool: Pool,
) -> None:
    web1 = pool.start_vm("web1", "hv1")
    pool.start_vm("web2", "hv1")
    pool.start_vm("db1", "hv2")
    pool.kill("hv1")

    pool.wait_owner("web1", None, via="hv2", timeout=pool.lease * 3 + 10)
    pool.wait_owner("web2", None, via="hv3")
    assert pool.vm_list("hv3")["db1"]["host"] == "hv2"  # a live host's VM stays its own

    r = pool.vmmessage("send", "web1", "k1", "while-released", via="hv3")
    assert queued(r), (r.returncode, r.stdout, r.stderr)

    pool.restart("hv1")
    pool.wait_owner("web1", "hv1", via="hv2")
    pool.wait_owner("web2", "hv1", via="hv3")
    wait_value(web1, "k1", "while-released")
    r = pool.vmmessage("send", "web2", "k2", "after", via="hv2")
    assert sent(r), (r.returncode, r.stdout, r.stderr)


def test_a_database_restart_should_fail_sends_meanwhile_and_lose_nothing_acknowledged(
    request: pytest.FixtureRequest,
) -> None:
    # A cluster of its own: stopping the session's would fail every other test using it. A lease
    # longer than the outage: this test is about the store, not about dead hosts.
    with PostgresCluster() as pg, Pool(pg, _database(request), lease=15.0) as pool:
        try:
            start_in_order(pool)
            web1 = pool.start_vm("web1", "hv1")
            web2 = pool.start_vm("web2", "hv2", agent=False)

            r = pool.vmmessage("send", "web1", "k1", "before", via="hv2")
            assert sent(r), (r.returncode, r.stdout, r.stderr)
            r = pool.vmmessage("send", "web2", "k1", "queued-before", via="hv3")
            assert queued(r), (r.returncode, r.stdout, r.stderr)

            pg.stop()
            # vmmessage tries a send again while the database is away, within its --timeout.
            for via, vm in (("hv1", "web1"), ("hv3", "web2")):
                r = pool.vmmessage("send", vm, "k2", "v-in-the-outage", "--timeout", "2", via=via)
                assert r.returncode == 3, (via, r.returncode, r.stdout, r.stderr)
                assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
                assert "v-in-the-outage" not in r.stderr
            pg.start()

            def after() -> bool:
                r = pool.vmmessage("send", "web1", "k3", "after", "--id", "after-1", via="hv1")
                assert r.returncode in (0, 3), (r.returncode, r.stdout, r.stderr)
                return sent(r)

            wait_for(after, 30, interval=0.5, what="a send to work after the restart")
            web2.agent.start()
            web2.agent.wait_ready()
            wait_value(web2, "k1", "queued-before")
            assert [key for _, key, _ in host_sets(web1)] == ["k1", "k3"]
            assert [key for _, key, _ in host_sets(web2)] == ["k1"]
            r = pool.vmmessage("--json", "audit", "web1", via="hv3")
            assert r.returncode == 0, r.stderr
            rows = json.loads(r.stdout)["entries"]
            assert sorted((row["key"], row["outcome"]) for row in rows) == [
                ("k1", "delivered"),
                ("k3", "delivered"),
            ]
        finally:
            _print_logs(pool)
