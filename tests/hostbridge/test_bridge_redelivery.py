"""A guest that answers `busy` (an agent restarted behind QEMU's socket, not yet resynced) must
get the message again after a resync: `busy` is never a refusal."""

import asyncio
import os

import pytest
from bridge_harness import Hostile, async_wait_for, short_tempdir

from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits, VmSpec

pytestmark = pytest.mark.timeout(60)


def test_a_busy_answer_should_resync_and_deliver_the_message_once():
    d = short_tempdir()
    channel = os.path.join(d, "vm")
    guest = Hostile(channel, "restarted")
    config = Config(
        vms=[VmSpec("vm", "pty:" + channel)],
        db=os.path.join(d, "bridge.sqlite3"),
        discover=False,
        limits=Limits(delivery_timeout=5.0),
    )

    async def main():
        bridge = Bridge(config)
        await bridge.start()
        try:
            guest.start().wait_ready()
            await async_wait_for(lambda: bridge.vm("vm").agent == "connected", what="sync")
            await bridge.send("vm", "first", "v1", timeout=10.0)
            await async_wait_for(lambda: "applied first" in guest.log(), what="redelivery")
            await async_wait_for(lambda: bridge.vm("vm").queued == 0, what="an empty outbox")
            audit = bridge.audit("vm")
            assert [(a.key, a.outcome) for a in audit] == [("first", "delivered")]
            assert guest.log().count("applied first") == 1
        finally:
            await bridge.stop()

    try:
        asyncio.run(main())
    finally:
        guest.stop()
