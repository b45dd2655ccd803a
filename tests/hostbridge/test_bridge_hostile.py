"""A hostile or broken guest affects nobody else.

One guest (a real process on its pty) floods garbage, floods valid frames, half-writes a frame,
or never reads; meanwhile another VM's queries to its real agent keep their p99 latency under
LATENCY_P99 (a bound for this shared 2-core machine), and the bridge's memory stays bounded.
"""

import asyncio
import os
import time
from contextlib import closing

import pytest

from tests.hostbridge.bridge_harness import Hostile, pty_config, running_bridge
from tests.support.agent import Agent
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

LATENCY_P99 = 0.100  # seconds
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
            assert len(latencies) > 50
            assert p99 < LATENCY_P99
            assert growth < RSS_GROWTH_MAX_KB
            assert bridge.vm("good").counters["timeouts"] == 0
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
