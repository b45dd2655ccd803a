"""A guest that answers `busy` (an agent restarted behind QEMU's socket, not yet resynced) must
get the message again after a resync: `busy` is never a refusal."""

import asyncio
import os
from contextlib import closing

import pytest

from tests.hostbridge.bridge_harness import Hostile, pty_config, running_bridge
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_busy_answer_should_resync_and_deliver_the_message_once(short_dir):
    config = pty_config(short_dir, "vm", delivery_timeout=5.0)

    async def main():
        async with running_bridge(config) as bridge:
            guest.start().wait_ready()
            await async_wait_for(lambda: bridge.vm("vm").agent == "connected", what="sync")
            await bridge.send("vm", "first", "v1", timeout=10.0)
            await async_wait_for(lambda: "applied first" in guest.log(), what="redelivery")
            await async_wait_for(lambda: bridge.vm("vm").queued == 0, what="an empty outbox")
            audit = bridge.audit("vm")
            assert [(a.key, a.outcome) for a in audit] == [("first", "delivered")]
            assert guest.log().count("applied first") == 1

    # The guest starts in main(), once the bridge has made its pty.
    with closing(Hostile(os.path.join(short_dir, "vm"), "restarted")) as guest:
        asyncio.run(main())
