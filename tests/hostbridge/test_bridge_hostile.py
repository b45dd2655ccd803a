"""A hostile or broken guest affects nobody else.

One guest (a real process on its pty) floods garbage, floods valid frames, half-writes a frame,
or never reads; meanwhile another VM's queries to its real agent are all answered live, without
a timeout, and the bridge's memory stays bounded. (The latency figures under attack come from
bench/attacks.py: a timing is never asserted here, the machine is shared.)

Whatever listens on a guest's channel socket may accept each connection and close it at once, or
close it right after the hello: the bridge backs off across links and keeps to its reconnect
budget. A guest may announce keys that host input could never carry: they are refused, counted,
and never stored.
"""

import asyncio
import logging
import os
import time
from contextlib import closing

import pytest

from hostbridge.config import Config, Limits, VmSpec
from tests.hostbridge.bridge_harness import Hostile, pty_config, running_bridge
from tests.support.agent import Agent
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

FLOOD_SECONDS = 3.0
RSS_GROWTH_MAX_KB = 64 * 1024


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("mode", ["garbage", "changed", "half", "noread"])
def test_a_hostile_guest_should_not_slow_another_vms_queries(mode, short_dir):
    config = pty_config(short_dir, "good", "bad", delivery_timeout=2.0)

    async def main():
        async with running_bridge(config) as bridge:
            agent.start().wait_ready()
            await async_wait_for(lambda: bridge.vm("good").agent == "connected", what="good sync")
            assert agent.ovmd("-p", "probe=ok").returncode == 0
            hostile.start()
            await async_wait_for(
                lambda: (
                    bridge.vm("bad").counters["frames_in"] > 0
                    or bridge.vm("bad").agent != "disconnected"
                ),
                what="hostile guest",
            )
            if mode == "noread":
                # Make the bridge write to the guest that never reads: a send waits, times out.
                sends = [
                    asyncio.ensure_future(bridge.send("bad", "k%d" % i, "v" * 4000, timeout=1.0))
                    for i in range(20)
                ]
            rss_before = rss_kb()
            latencies = []
            deadline = time.monotonic() + FLOOD_SECONDS
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                kv = await bridge.query("good", "probe", timeout=2.0)
                latencies.append(time.perf_counter() - t0)
                assert (kv.value, kv.stale) == ("ok", False)
                await asyncio.sleep(0.005)
            if mode == "noread":
                outcomes = {r.outcome for r in await asyncio.gather(*sends)}
                assert outcomes <= {"queued", "delivered"}
            latencies.sort()
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            bad = bridge.vm("bad").counters
            growth = rss_kb() - rss_before
            print(
                "mode=%s queries=%d p50=%.1fms p99=%.1fms rss_growth=%dKB bad=%r"
                % (
                    mode,
                    len(latencies),
                    latencies[len(latencies) // 2] * 1000,
                    p99 * 1000,
                    growth,
                    bad,
                )
            )
            assert len(latencies) > 10
            assert growth < RSS_GROWTH_MAX_KB
            good = bridge.vm("good").counters
            assert (good["timeouts"], good["resyncs"], good["reconnects"]) == (0, 0, 0)
            if mode == "garbage":
                assert bad["bad_frames"] > 0
            if mode == "changed":
                s = bridge.guest("bad")
                assert len(s.mirror.entries) <= config.limits.mirror_keys
                assert bad["dropped_rate_limited"] > 0

    # Both programs start in main(), once the bridge has made their ptys.
    with closing(Agent(os.path.join(short_dir, "good"))) as agent:
        with closing(Hostile(os.path.join(short_dir, "bad"), mode)) as hostile:
            asyncio.run(main())


def unix_config(directory, limits, **channels):
    return Config(
        vms=[VmSpec(name, "unix:" + path, "flag") for name, path in channels.items()],
        db=os.path.join(directory, "bridge.sqlite3"),
        discover=False,
        limits=limits,
    )


def accepted(path):
    try:
        with open(path + ".clients") as f:
            return len(f.read().split())
    except OSError:
        return 0


@pytest.mark.parametrize("mode", ["acceptclose", "syncdrop"])
def test_a_channel_that_drops_every_link_should_be_reconnected_with_a_growing_delay(
    mode, short_dir
):
    # Before the fix, a channel that accepts and closes drew thousands of connects a second: the
    # backoff grew only when connect() failed, and restarted with each call.
    path = os.path.join(short_dir, "bad.sock")
    with closing(Hostile(path, mode)) as hostile:
        hostile.start().wait_ready()

        async def main():
            async with running_bridge(unix_config(short_dir, Limits(), bad=path)) as bridge:
                await asyncio.sleep(3.0)
                return dict(bridge.vm("bad").counters)

        counters = asyncio.run(main())
    print("mode=%s connects_in_3s=%d counters=%r" % (mode, accepted(path), counters))
    # 50 ms doubling with jitter: at most ~8 connects fit in 3 s.
    assert 2 <= accepted(path) <= 12, accepted(path)
    assert counters["failed_links"] >= 2
    if mode == "syncdrop":
        assert counters["reconnects"] >= 1


def test_the_reconnect_budget_should_cap_connects_whatever_the_backoff(short_dir):
    path = os.path.join(short_dir, "bad.sock")
    limits = Limits(reconnect_max=0.01, reconnect_budget=5)
    with closing(Hostile(path, "acceptclose")) as hostile:
        hostile.start().wait_ready()

        async def main():
            async with running_bridge(unix_config(short_dir, limits, bad=path)) as bridge:
                await async_wait_for(lambda: accepted(path) >= 5, what="five connects")
                await asyncio.sleep(1.0)
                return dict(bridge.vm("bad").counters)

        counters = asyncio.run(main())
    assert accepted(path) == 5
    assert counters["reconnects_delayed"] >= 1


def test_keys_the_protocol_forbids_should_be_refused_counted_and_logged_escaped(short_dir, caplog):
    config = pty_config(short_dir, "bad")
    caplog.set_level(logging.INFO)

    async def main():
        async with running_bridge(config) as bridge:
            hostile.start()
            await async_wait_for(
                lambda: "announced" in hostile.log() and bridge.guest("bad").mirror.gseq == 8,
                what="the guest's announcements",
            )
            live = await bridge.keys("bad", timeout=5.0)
            guest = bridge.guest("bad")
            guest.flush()
            stored = [r.key for r in guest.store.mirror("bad")]
            return guest, stored, [e.key for e in live.entries], dict(bridge.vm("bad").counters)

    with closing(Hostile(os.path.join(short_dir, "bad"), "badkeys")) as hostile:
        guest, stored, live_keys, counters = asyncio.run(main())
    good = ["good.one", "good.two"]
    assert sorted(guest.mirror.entries) == good
    assert sorted(stored) == good
    assert sorted(live_keys) == good
    assert counters["refused_keys"] == 6 + 6  # six announced, the same six listed
    assert counters["resyncs"] == 0  # a refusal is not a gap: no refresh loop
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refused (invalid_key)" in logged
    assert "\x1b" not in logged and "\r" not in logged and "\x00" not in logged
