"""Discovery through the Bridge: a libvirt-style channel directory appears (QEMU stand-in and a
real agent behind it), disappears, and reappears under a new domain id; no bridge restart."""

import asyncio
import os
import shutil

import pytest

from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits
from tests.hostbridge.bridge_harness import QemuStandIn
from tests.support.agent import Agent
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


def test_the_bridge_should_follow_a_vm_through_stop_and_restart_with_a_new_id(short_dir):
    d = str(short_dir)
    base = os.path.join(d, "target")
    link = os.path.join(d, "port")
    procs = []

    def boot(dom_id):
        chan_dir = os.path.join(base, "domain-%d-guest-one" % dom_id)
        os.makedirs(chan_dir)
        qemu = QemuStandIn(os.path.join(chan_dir, "com.oracle.ovmd"), link).start().wait_ready()
        agent = Agent(link).start().wait_ready()
        procs.extend([qemu, agent])
        return chan_dir, qemu, agent

    async def main():
        os.makedirs(base)
        bridge = Bridge(
            Config(
                db=os.path.join(d, "db.sqlite3"),
                libvirt_dirs=[base],
                discover_interval=0.2,
                limits=Limits(reconnect_max=0.3),
            )
        )
        await bridge.start()
        try:
            assert bridge.vms() == []
            chan_dir, qemu, agent = boot(1)
            await async_wait_for(
                lambda: [v.name for v in bridge.vms()] == ["guest-one"], what="discovery"
            )
            info = bridge.vm("guest-one")
            assert info.source == "discovered" and info.channel.endswith(
                "domain-1-guest-one/com.oracle.ovmd"
            )
            await async_wait_for(lambda: bridge.vm("guest-one").agent == "connected", what="sync")
            assert (await bridge.send("guest-one", "k", "v1")).outcome == "delivered"
            # The VM stops: libvirt removes the directory. The VM stays known, disconnected.
            qemu.kill()
            agent.kill()
            shutil.rmtree(chan_dir)
            await async_wait_for(
                lambda: bridge.vm("guest-one").agent == "disconnected", what="stop noticed"
            )
            assert (await bridge.send("guest-one", "k", "v2")).outcome == "queued"
            # It starts again with a new id.
            _, _, agent2 = boot(2)
            await async_wait_for(lambda: bridge.vm("guest-one").queued == 0, what="redelivery")
            assert "domain-2-guest-one" in bridge.vm("guest-one").channel
            r = agent2.ovmd("-g", "k")
            assert r.stdout.strip() == "v2"
        finally:
            await bridge.stop()

    try:
        asyncio.run(main())
    finally:
        for p in procs:
            p.close()
