"""The guest facts (org.ovmd.guest.*): os-release and netlink parsing, key naming and limits, the
reserved prefix, the publisher in a real loop with a real store, and the real agent in a network
namespace of the test's own following its addresses and links."""

import logging
import os
import socket
import struct
import time

import pytest

from guestagent import __version__, facts, netlink
from guestagent.config import ConfigError, load
from guestagent.factwatch import FactWatch, read_os_release
from guestagent.loop import Loop
from guestagent.netlink import Addr, Link
from guestagent.service import ReservedKey, Service
from guestagent.store import CacheStore
from ovmproto.limits import FACTS_PREFIX, KEY_MAX, VALUE_MAX, check_key
from ovmproto.messages import Delete, Err, Get, Ok, Set
from tests.guestagent.harness import Daemon, Host
from tests.support.netns import NetNs, NsAgent, needs_netns
from tests.support.waiting import wait_for

NET = "org.ovmd.guest.net."
DEADLINE = 20.0  # seconds for the agent to follow a change: generous, the machine is shared

# Two RTM_NEWADDR messages and the NLMSG_DONE of a dump, as the kernel sent them (captured in a
# namespace: `ip addr add 192.0.2.10/24 dev ovt0`, `ip addr add 2001:db8::5/64 dev ovt0 nodad`).
CAPTURED_ADDRS = bytes.fromhex(
    "50000000140002000700000000000000021880000300000008000100c000020a08000200c000020a0900"
    "03006f76743000000000080008008000000014000600fffffffffffffffff6371f00f6371f00"
    "480000001400020007000000000000000a408200030000001400010020010db800000000000000000000"
    "000514000600fffffffffffffffff6371f00f6371f000800080082000000"
    "1400000003000200070000000000000000000000"
)


# -- os-release ------------------------------------------------------------------------------------


def test_it_should_read_os_release_values_as_a_shell_would():
    text = (
        "# a comment\n"
        'NAME="Debian GNU/Linux"\n'
        "VERSION_ID='12'\n"
        'PRETTY_NAME="say \\"hi\\" \\$HOME \\\\ done"\n'
        "ID=debian\n"
        "\n"
        "not an assignment\n"
        "BAD-NAME=x\n"
        'UNTERMINATED="abc\n'
    )
    release = facts.parse_os_release(text)
    assert release == {
        "NAME": "Debian GNU/Linux",
        "VERSION_ID": "12",
        "PRETTY_NAME": 'say "hi" $HOME \\ done',
        "ID": "debian",
        "UNTERMINATED": "abc",
    }


def test_the_os_facts_should_prefer_version_id_and_leave_out_what_is_missing():
    assert facts.os_facts(
        {"NAME": "Fedora Linux", "VERSION": "40 (Server)", "VERSION_ID": "40"}
    ) == {
        facts.OS_NAME: "Fedora Linux",
        facts.OS_VERSION: "40",
    }
    assert facts.os_facts({"NAME": "Arch Linux", "VERSION": "rolling"}) == {
        facts.OS_NAME: "Arch Linux",
        facts.OS_VERSION: "rolling",
    }
    assert facts.os_facts({"NAME": "", "ID": "x"}) == {}
    assert facts.os_facts({"NAME": "n" * 1000})[facts.OS_NAME] == "n" * facts.TEXT_MAX


def test_it_should_read_the_first_os_release_file_that_exists(tmp_path):
    second = tmp_path / "usr-lib-os-release"
    second.write_bytes(b'NAME="Second"\nVERSION_ID=2\n\xff\n')
    assert read_os_release([str(tmp_path / "missing"), str(second)]) == {
        "NAME": "Second",
        "VERSION_ID": "2",
    }
    assert read_os_release([str(tmp_path / "missing")]) is None


# -- key naming ------------------------------------------------------------------------------------


def test_every_interface_name_linux_allows_should_make_a_legal_distinct_key():
    # Linux refuses '/', ':', whitespace and NUL in a name, and allows every other byte.
    allowed = [b for b in range(1, 256) if b not in b"/: \t\n\v\f\r"]
    keys = {facts.interface_key(bytes([b, b, b])) for b in allowed}
    assert len(keys) == len(allowed)
    for key in keys:
        assert check_key(key) is None, key
    worst = facts.interface_key(bytes([0x80]) * 15)  # IFNAMSIZ - 1 bytes, each written %XX
    assert check_key(worst) is None and len(worst.encode()) <= KEY_MAX
    assert facts.interface_key(b"eth0.100") == NET + "eth0.100"
    assert facts.interface_key(b"we=ird\x1b") == NET + "we%3Dird%1B"
    assert facts.interface_key(b"50%") == NET + "50%25"


def test_the_config_should_turn_the_facts_off_and_refuse_a_bad_value(tmp_path):
    conf = tmp_path / "ovmd.conf"
    assert load(str(tmp_path / "missing")).facts is True
    conf.write_text("[ovmd]\nfacts = no\n")
    assert load(str(conf)).facts is False
    assert load(str(conf), {"facts": "yes"}).facts is True
    conf.write_text("[ovmd]\nfacts = maybe\n")
    with pytest.raises(ConfigError) as ei:
        load(str(conf))
    assert str(ei.value) == "%s line 2: facts must be yes or no, not 'maybe'" % conf


# -- netlink ---------------------------------------------------------------------------------------


def test_it_should_parse_address_messages_captured_from_the_kernel():
    parsed = list(netlink.messages(CAPTURED_ADDRS))
    assert [(kind, seq) for kind, _, seq, _ in parsed] == [
        (netlink.RTM_NEWADDR, 7),
        (netlink.RTM_NEWADDR, 7),
        (netlink.NLMSG_DONE, 7),
    ]
    v4 = netlink.parse_addr(parsed[0][3])
    v6 = netlink.parse_addr(parsed[1][3])
    assert (v4.index, v4.family, facts.address_text(v4), v4.scope) == (
        3,
        socket.AF_INET,
        "192.0.2.10/24",
        0,
    )
    assert (v6.index, v6.family, facts.address_text(v6)) == (3, socket.AF_INET6, "2001:db8::5/64")
    assert v6.flags & 0x80  # IFA_F_PERMANENT, from the 32-bit IFA_FLAGS attribute


def _attr(kind, payload):
    length = netlink.RTATTR.size + len(payload)
    return netlink.RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(kind, body, seq=1):
    return netlink.NLMSGHDR.pack(netlink.NLMSGHDR.size + len(body), kind, 0, seq, 0) + body


def test_it_should_parse_a_link_message_and_the_local_address_of_a_peer_link():
    link_body = netlink.IFINFOMSG.pack(0, 772, 1, netlink.IFF_LOOPBACK | 1, 0) + _attr(
        netlink.IFLA_IFNAME, b"lo\0"
    )
    ((kind, _, _, payload),) = netlink.messages(_message(netlink.RTM_NEWLINK, link_body))
    link = netlink.parse_link(payload)
    assert (kind, link.index, link.name, link.flags & netlink.IFF_LOOPBACK) == (16, 1, b"lo", 8)
    # A point-to-point IPv4 address: IFA_ADDRESS is the peer's, IFA_LOCAL ours.
    addr_body = (
        netlink.IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, 5)
        + _attr(netlink.IFA_ADDRESS, bytes([10, 0, 0, 2]))
        + _attr(netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))
    )
    addr = netlink.parse_addr(addr_body)
    assert facts.address_text(addr) == "10.0.0.1/32"


def test_cut_or_garbage_netlink_bytes_should_parse_to_nothing_without_raising():
    for cut in range(len(CAPTURED_ADDRS)):
        for _, _, _, payload in netlink.messages(CAPTURED_ADDRS[:cut]):
            netlink.parse_addr(payload)
            netlink.parse_link(payload)
    rng = __import__("random").Random(11)
    for _ in range(2000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        for _, _, _, payload in netlink.messages(junk):
            netlink.parse_addr(payload)
            netlink.parse_link(payload)
        netlink.parse_addr(junk)
        netlink.parse_link(junk)
    # A header whose length is below a header's, or past the end: the parse stops there.
    assert list(netlink.messages(struct.pack("=IHHII", 3, 20, 0, 0, 0) + CAPTURED_ADDRS)) == []
    assert list(netlink.messages(struct.pack("=IHHII", 999, 20, 0, 0, 0))) == []
    # An address of the wrong size for its family, or a prefix longer than the address.
    bad = netlink.IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, 1) + _attr(netlink.IFA_LOCAL, b"\1\2")
    assert netlink.parse_addr(bad) is None
    long_prefix = netlink.IFADDRMSG.pack(socket.AF_INET, 33, 0, 0, 1) + _attr(
        netlink.IFA_LOCAL, b"\1\2\3\4"
    )
    assert netlink.parse_addr(long_prefix) is None


def test_the_kernel_should_answer_a_dump_of_this_machine_without_error():
    links, addrs = netlink.snapshot()
    assert any(link.flags & netlink.IFF_LOOPBACK for link in links)
    assert {a.index for a in addrs} <= {link.index for link in links}


# -- from interfaces to keys ---------------------------------------------------------------------


def v4(index, text, prefixlen=24, scope=0, flags=0):
    return Addr(index, socket.AF_INET, prefixlen, scope, flags, socket.inet_aton(text))


def v6(index, text, prefixlen=64, scope=0, flags=0):
    return Addr(
        index, socket.AF_INET6, prefixlen, scope, flags, socket.inet_pton(socket.AF_INET6, text)
    )


def test_net_facts_should_skip_loopback_and_unreachable_addresses_and_put_ipv4_first():
    links = [Link(1, b"lo", netlink.IFF_LOOPBACK), Link(3, b"eth1", 0), Link(2, b"eth0", 0)]
    addrs = [
        v4(1, "127.0.0.1", 8, scope=netlink.RT_SCOPE_HOST),
        v6(2, "2001:db8::5"),
        v6(2, "fe80::1", scope=netlink.RT_SCOPE_LINK),
        v4(2, "192.0.2.20"),
        v4(2, "192.0.2.10"),
        v6(2, "2001:db8::9", flags=netlink.IFA_F_DADFAILED),
        v4(99, "198.51.100.1"),  # an interface the dump did not list (it raced a deletion)
    ]
    assert facts.net_facts(links, addrs) == {
        NET + "eth0": "192.0.2.10/24 192.0.2.20/24 2001:db8::5/64",
        NET + "eth1": "",
    }


def test_net_facts_should_bound_the_interfaces_and_cut_a_long_value_at_a_whole_address():
    links = [Link(i, b"if%d" % i, 0) for i in range(1, 201)]
    # Addresses of the longest form (39 characters): 399 of them are twice what a value holds.
    many = [v6(1, "2001:db8:1234:5678:9abc:def0:%x:ffff" % (0x1000 + i), 128) for i in range(399)]
    out = facts.net_facts(links, many)
    assert len(out) == facts.MAX_INTERFACES
    assert NET + "if1" in out and NET + "if64" in out and NET + "if65" not in out
    value = out[NET + "if1"]
    assert len(value.encode()) <= VALUE_MAX
    assert all(word.endswith("/128") for word in value.split(" "))
    assert len(value.split(" ")) < 399


def test_changes_should_name_only_what_differs_and_keep_interfaces_when_unknown():
    current = {facts.HOSTNAME: "a", NET + "eth0": "192.0.2.1/24", NET + "gone": ""}
    wanted = {facts.HOSTNAME: "a", NET + "eth0": "192.0.2.2/24", facts.AGENT_VERSION: "1"}
    assert facts.changes(current, wanted, keep_net=False) == (
        [[NET + "eth0", "192.0.2.2/24"], [facts.AGENT_VERSION, "1"]],
        [NET + "gone"],
    )
    no_net = {facts.HOSTNAME: "b", facts.AGENT_VERSION: "1"}
    assert facts.changes(current, no_net, keep_net=True) == (
        [[facts.HOSTNAME, "b"], [facts.AGENT_VERSION, "1"]],
        [],
    )


# -- the reserved prefix ---------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    return Service(CacheStore(str(tmp_path), 1024, 64))


def test_local_programs_and_the_host_should_not_set_a_fact_but_may_delete_one(service):
    service.publish([[facts.HOSTNAME, "real"]], [])
    for attempt in (
        lambda: service.set(facts.HOSTNAME, "fake", "guest"),
        lambda: service.put([["ok.key", "1"], [FACTS_PREFIX + "x", "2"]], "guest"),
        lambda: service.host_set(1, facts.HOSTNAME, "fake"),
        lambda: service.host_set(None, facts.HOSTNAME, "fake"),
    ):
        with pytest.raises(ReservedKey) as ei:
            attempt()
        assert ei.value.code == "denied"
        assert "\n" not in ei.value.message
    assert service.get(facts.HOSTNAME).value == "real"
    assert service.get("ok.key") is None  # a put is all or nothing
    assert service.cache.hseq == 0  # the refused host message was not applied
    assert service.delete(facts.HOSTNAME, "guest") is not None
    with pytest.raises(ValueError):
        service.publish([["not.a.fact", "1"]], [])


# -- the publisher in a real loop -----------------------------------------------------------------


class Kernel:
    """What netlink.snapshot() would return; raises when ``fail`` is set."""

    def __init__(self):
        self.links = [Link(1, b"lo", netlink.IFF_LOOPBACK), Link(2, b"eth0", 0)]
        self.addrs = [v4(2, "192.0.2.10")]
        self.fail = None

    def __call__(self):
        if self.fail:
            raise self.fail
        return self.links, self.addrs


def fact_values(service):
    return {e.key: e.value for e in service.entries() if e.key.startswith(FACTS_PREFIX)}


def run_until(loop, condition, timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        loop.run_once(0.05)


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def test_the_publisher_should_write_the_facts_once_and_only_what_changed(service, loop):
    kernel = Kernel()
    watch = FactWatch(loop, service, debounce=0.01, snapshot=kernel)
    watch.start()
    try:
        got = fact_values(service)
        assert got[NET + "eth0"] == "192.0.2.10/24"
        assert got[facts.AGENT_VERSION] == __version__
        assert got[facts.HOSTNAME] == os.uname().nodename
        assert NET + "lo" not in got
        gseq = service.cache.gseq
        watch.publish()  # nothing changed: nothing written
        assert service.cache.gseq == gseq
        kernel.addrs.append(v4(2, "192.0.2.11"))
        watch.publish()
        assert service.cache.gseq == gseq + 1  # one key, one change
        assert fact_values(service)[NET + "eth0"] == "192.0.2.10/24 192.0.2.11/24"
    finally:
        watch.close()


def test_the_publisher_should_write_its_facts_again_after_a_clear_or_a_delete(service, loop):
    watch = FactWatch(loop, service, debounce=0.01, snapshot=Kernel())
    watch.start()
    try:
        published = fact_values(service)
        service.set("app.key", "v", "guest")
        service.clear("guest")
        run_until(loop, lambda: fact_values(service) == published)
        assert service.get("app.key") is None
        service.host_delete(1, facts.HOSTNAME)
        run_until(loop, lambda: fact_values(service) == published)
    finally:
        watch.close()


def test_a_netlink_failure_should_warn_once_and_keep_the_addresses(service, loop, caplog):
    kernel = Kernel()
    watch = FactWatch(loop, service, debounce=0.01, snapshot=kernel)
    watch.start()
    try:
        before = fact_values(service)
        kernel.fail = PermissionError(1, "Operation not permitted")
        kernel.addrs = []
        with caplog.at_level(logging.WARNING, logger="guestagent.factwatch"):
            service.delete(facts.AGENT_VERSION, "guest")
            run_until(loop, lambda: fact_values(service) == before)
            service.delete(facts.AGENT_VERSION, "guest")
            run_until(loop, lambda: fact_values(service) == before)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "Operation not permitted" in warnings[0].getMessage()
    finally:
        watch.close()


def test_an_unreadable_os_release_should_keep_the_os_facts_published(service, loop, tmp_path):
    release = tmp_path / "os-release"
    release.write_text('NAME="Some OS"\nVERSION_ID=7\n')
    watch = FactWatch(loop, service, snapshot=Kernel(), os_release_paths=[str(release)])
    watch.start()
    assert fact_values(service)[facts.OS_NAME] == "Some OS"
    release.unlink()
    release.mkdir()  # exists, and reading it fails (EISDIR)
    watch.publish()
    assert (fact_values(service)[facts.OS_NAME], fact_values(service)[facts.OS_VERSION]) == (
        "Some OS",
        "7",
    )
    release.rmdir()  # gone: the OS is unknown now
    watch.publish()
    assert facts.OS_NAME not in fact_values(service)
    watch.close()


def test_facts_turned_off_should_remove_the_published_ones_and_leave_other_keys(service, loop):
    FactWatch(loop, service, snapshot=Kernel()).start()
    service.set("app.key", "v", "guest")
    assert fact_values(service)
    watch = FactWatch(loop, service, enabled=False, snapshot=Kernel())
    watch.start()
    assert fact_values(service) == {}
    assert service.get("app.key").value == "v"
    watch.close()


# -- the real agent ------------------------------------------------------------------------------


def cache_facts(agent):
    """The facts in the agent's cache, through `ovmd -l --json`."""
    import json

    result = agent.ovmd("-l", "--json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    return {e["key"]: e["value"] for e in entries if e["key"].startswith(FACTS_PREFIX)}


def follows(agent, key, value):
    """Wait until ``key`` holds ``value`` (None: until it is gone)."""

    def check():
        return cache_facts(agent).get(key) == value

    wait_for(check, DEADLINE, interval=0.05, what="%s to be %r" % (key, value))


@needs_netns
def test_the_agent_should_follow_addresses_and_links_in_its_network_namespace():
    with NetNs() as ns, Host() as host:
        ns.ip("link", "add", "ovt0", "type", "veth", "peer", "name", "ovt1")
        with NsAgent(ns, host.link, args=["--facts", "yes"]) as agent:
            agent.wait_ready()
            host.hello()
            follows(agent, NET + "ovt0", "")
            got = cache_facts(agent)
            assert got[facts.AGENT_VERSION] == __version__
            assert NET + "lo" not in got and NET + "ovt1" in got
            ns.ip("addr", "add", "192.0.2.10/24", "dev", "ovt0")
            follows(agent, NET + "ovt0", "192.0.2.10/24")
            ns.ip("addr", "add", "2001:db8::5/64", "dev", "ovt0", "nodad")
            follows(agent, NET + "ovt0", "192.0.2.10/24 2001:db8::5/64")
            # The host heard of it as of any guest key.
            host.drain(0.2)
            assert any(
                c.key == NET + "ovt0" and c.value == "192.0.2.10/24 2001:db8::5/64"
                for c in host.changed
            )
            # A link event that changes no fact writes nothing; the address change after it
            # writes one key, once.
            host.changed[:] = []
            ns.ip("link", "set", "ovt1", "mtu", "1400")
            ns.ip("addr", "del", "192.0.2.10/24", "dev", "ovt0")
            follows(agent, NET + "ovt0", "2001:db8::5/64")
            host.drain(0.5)
            assert [(c.op, c.key, c.value) for c in host.changed] == [
                ("set", NET + "ovt0", "2001:db8::5/64")
            ]
            ns.ip("link", "del", "ovt0")  # its peer goes with it
            follows(agent, NET + "ovt0", None)
            follows(agent, NET + "ovt1", None)
            assert agent.running


@needs_netns
def test_turning_the_facts_off_in_the_config_file_should_remove_them(tmp_path):
    conf = tmp_path / "ovmd.conf"
    conf.write_text("[ovmd]\nfacts = no\n")

    class FromFile(NsAgent):
        def options(self):
            opts = super().options()
            del opts[opts.index("--facts") : opts.index("--facts") + 2]
            return opts

    with NetNs() as ns, Host() as host:
        ns.ip("link", "add", "ovt0", "type", "veth", "peer", "name", "ovt1")
        with NsAgent(ns, host.link, args=["--facts", "yes"]) as first:
            first.wait_ready()
            follows(first, NET + "ovt0", "")
            first.ovmd("-p", "app.key=kept")
            first.stop()
            state = first.state_dir
            with FromFile(ns, host.link, state_dir=state, args=["--config", str(conf)]) as second:
                second.wait_ready()
                wait_for(lambda: cache_facts(second) == {}, DEADLINE, what="the facts removed")
                assert second.ovmd("-g", "app.key").stdout == "kept\n"


def test_ovmd_should_refuse_to_set_a_fact_and_bring_back_one_deleted():
    with Host() as host, Daemon(channel=host.link, args=["--facts", "yes"]) as daemon:
        daemon.wait_ready()
        follows(daemon, facts.HOSTNAME, os.uname().nodename)
        result = daemon.ovmd("-p", facts.HOSTNAME + "=fake")
        assert result.returncode == 4
        assert result.stderr == (
            "ovmd: keys under org.ovmd.guest. are the agent's own guest facts and cannot be set\n"
        )
        assert daemon.ovmd("-r", facts.HOSTNAME).returncode == 0
        follows(daemon, facts.HOSTNAME, os.uname().nodename)
        daemon.ovmd("-p", "app.key=1")
        assert daemon.ovmd("-x").returncode == 0
        follows(daemon, facts.HOSTNAME, os.uname().nodename)
        assert daemon.ovmd("-g", "app.key").returncode == 1
        # The host: a set is refused with "denied" and not applied; a delete comes back too.
        host.hello()
        refused = host.request(Set, key=facts.HOSTNAME, value="fake", seq=1)
        assert (type(refused), refused.code) == (Err, "denied")
        assert host.request(Get, key=facts.HOSTNAME).value == os.uname().nodename
        deleted = host.request(Delete, key=facts.HOSTNAME, seq=2)
        assert (type(deleted), deleted.found) == (Ok, True)
        follows(daemon, facts.HOSTNAME, os.uname().nodename)
