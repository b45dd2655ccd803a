"""The guest facts on the host: the parser of a VM's org.ovmd.guest.* keys against hostile values,
the mirror's index of them, their lines in `vmmessage status`, the refusal of a send under the
prefix, and a real bridge showing the addresses of a real agent in a network namespace."""

import asyncio
import json
import os
from contextlib import closing

import pytest

from hostbridge import errors
from hostbridge import facts as host_facts
from hostbridge.mirror import Mirror
from hostbridge.render import status_lines
from ovmproto.limits import FACTS_PREFIX
from tests.hostbridge.bridge_harness import BridgeProc, cli, pty_config, running_bridge
from tests.support.netns import NetNs, NsAgent, needs_netns
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

NET = FACTS_PREFIX + "net."
GOOD = [
    (FACTS_PREFIX + "hostname", "web1", 100.0, "guest"),
    (FACTS_PREFIX + "os.name", "Debian GNU/Linux", 101.0, "guest"),
    (FACTS_PREFIX + "os.version", "12", 101.0, "guest"),
    (FACTS_PREFIX + "agent.version", "0.1.0", 99.0, "guest"),
    (NET + "eth0", "192.0.2.10/24 2001:db8::5/64", 102.5, "guest"),
    (NET + "eth1", "", 98.0, "guest"),
    ("com.example.app", "not a fact", 500.0, "guest"),
]


def test_it_should_make_one_record_of_the_fact_keys():
    assert host_facts.from_items(GOOD).to_json() == {
        "hostname": "web1",
        "os_name": "Debian GNU/Linux",
        "os_version": "12",
        "agent_version": "0.1.0",
        "interfaces": {"eth0": ["192.0.2.10/24", "2001:db8::5/64"], "eth1": []},
        "updated": 102.5,
    }
    assert host_facts.from_items([("com.example.app", "v", 1.0, "guest")]).to_json() == {}


@pytest.mark.parametrize(
    "item",
    [
        (FACTS_PREFIX + "hostname", "web1", 1.0, "host"),  # not the agent's: it refuses the host
        (FACTS_PREFIX + "hostname", None, 1.0, "guest"),  # a value the mirror does not hold
        (FACTS_PREFIX + "hostname", 12, 1.0, "guest"),
        (NET + "eth0", "192.0.2.10/24 rm -rf /", 1.0, "guest"),
        (NET + "eth0", "192.0.2.10", 1.0, "guest"),  # no prefix length
        (NET + "eth0", "999.0.2.10/24", 1.0, "guest"),
        (NET + "eth0", "192.0.2.10/24\x1b[2J", 1.0, "guest"),
        (NET + "eth0", "1" * 5000 + "/24", 1.0, "guest"),
        (NET + "", "192.0.2.10/24", 1.0, "guest"),
        (NET + "x" * 200, "192.0.2.10/24", 1.0, "guest"),
        (FACTS_PREFIX + "unknown.fact", "x", 1.0, "guest"),
        (None, "x", 1.0, "guest"),
    ],
)
def test_a_hostile_fact_should_be_left_out_without_a_crash(item):
    assert host_facts.from_items([item]).to_json() == {}


def test_hostile_facts_should_stay_bounded():
    huge = [(NET + "if%04d" % i, "192.0.2.1/24", 1.0, "guest") for i in range(5000)]
    many_addresses = " ".join("10.0.%d.%d/32" % (i // 256, i % 256) for i in range(1000))
    huge.insert(0, (NET + "aaa", many_addresses, float("nan"), "guest"))
    huge.append((FACTS_PREFIX + "hostname", "h" * 9000 + "\x1b]0;owned\x07", 1e300, "guest"))
    record = host_facts.from_items(huge)
    assert len(record.interfaces) == host_facts.MAX_INTERFACES
    assert len(record.interfaces["aaa"]) == host_facts.MAX_ADDRESSES
    assert len(record.hostname) == host_facts.TEXT_MAX
    assert record.updated == 1.0  # NaN and absurd times are not "the newest"
    json.dumps(record.to_json(), allow_nan=False)


def test_the_mirror_should_keep_its_fact_keys_apart_through_every_change():
    mirror = Mirror(max_keys=3, max_bytes=10_000)
    mirror.apply("set", NET + "eth0", "192.0.2.1/24", 1.0, "guest")
    mirror.apply("set", "app", "v", 1.0, "guest")
    mirror.apply("set", FACTS_PREFIX + "hostname", "h", 1.0, "guest")
    assert mirror.fact_keys == {NET + "eth0", FACTS_PREFIX + "hostname"}
    assert not mirror.apply("set", NET + "eth1", "", 1.0, "guest")  # over the quota
    assert NET + "eth1" not in mirror.fact_keys
    mirror.apply("del", NET + "eth0", None, 2.0, "guest")
    assert mirror.fact_keys == {FACTS_PREFIX + "hostname"}
    mirror.apply("clear", None, None, 3.0, "guest")
    assert mirror.fact_keys == set()
    mirror.replace([(NET + "eth2", "", 4.0, "guest"), ("app", "v", 4.0, "guest")], "gid", 5)
    assert mirror.fact_keys == {NET + "eth2"}
    record = host_facts.from_mirror(mirror.entries, mirror.fact_keys)
    assert record.interfaces == {"eth2": []}


def test_status_should_show_the_facts_escaped_and_nothing_without_them():
    vm = {"name": "web1", "agent": "connected", "queued": 0, "counters": {}}
    assert not [line for line in status_lines(vm, 200.0) if line.startswith("Guest")]
    vm["facts"] = host_facts.from_items(GOOD + [(NET + "evil", "", 1.0, "guest")]).to_json() | {
        "hostname": "web1\x1b[2J\u202e"
    }
    lines = [line for line in status_lines(vm, 200.0) if line.startswith("Guest")]
    assert lines == [
        "Guest host name: web1\\x1b[2J\\u202e",
        "Guest OS: Debian GNU/Linux 12",
        "Guest interface eth0: 192.0.2.10/24 2001:db8::5/64",
        "Guest interface eth1: (no address)",
        "Guest interface evil: (no address)",
        "Guest facts set: 1970-01-01 00:01:42 UTC (1 minute ago)",
    ]


def test_a_send_of_a_fact_key_should_be_refused_before_it_is_queued(short_dir):
    async def main():
        async with running_bridge(pty_config(str(short_dir), "vm1")) as bridge:
            with pytest.raises(errors.InvalidInput) as ei:
                await bridge.send("vm1", FACTS_PREFIX + "hostname", "fake")
            assert ei.value.code == "bad_request"
            assert bridge.vm("vm1").queued == 0
            # A delete is allowed (the agent publishes the fact again).
            result = await bridge.delete("vm1", FACTS_PREFIX + "hostname")
            assert result.outcome == "queued"

    asyncio.run(main())


@needs_netns
def test_vmmessage_status_should_show_the_addresses_of_a_real_agent(short_dir):
    channel = os.path.join(str(short_dir), "ch")
    with NetNs() as ns:
        ns.ip("link", "add", "ovt0", "type", "veth", "peer", "name", "ovt1")
        ns.ip("addr", "add", "192.0.2.10/24", "dev", "ovt0")
        with closing(BridgeProc({"vm1": "pty:" + channel})) as bridge:
            bridge.start().wait_ready()
            with NsAgent(ns, channel, args=["--facts", "yes"]) as agent:
                agent.wait_ready()

                def shown():
                    r = cli(bridge, "status", "vm1")
                    return r.returncode == 0 and "Guest interface ovt0: 192.0.2.10/24" in r.stdout

                wait_for(shown, 30.0, interval=0.1, what="the address in `vmmessage status`")
                doc = json.loads(cli(bridge, "status", "vm1", "--json").stdout)
                assert doc["facts"]["interfaces"]["ovt0"] == ["192.0.2.10/24"]
                assert doc["facts"]["agent_version"] == doc["agent_version"].split()[-1]
                listed = json.loads(cli(bridge, "list", "--json").stdout)
                assert listed["vms"][0]["facts"] == doc["facts"]
                refused = cli(bridge, "send", "vm1", FACTS_PREFIX + "hostname", "fake")
                assert refused.returncode == 2 and refused.stdout == ""
                assert refused.stderr.count("\n") == 1
                assert "the guest agent's own facts" in refused.stderr
                # The address goes: the status follows.
                ns.ip("addr", "del", "192.0.2.10/24", "dev", "ovt0")
                wait_for(
                    lambda: (
                        "Guest interface ovt0: (no address)" in cli(bridge, "status", "vm1").stdout
                    ),
                    30.0,
                    interval=0.1,
                    what="the address gone from `vmmessage status`",
                )
