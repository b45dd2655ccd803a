"""A change the guest makes right after answering a `list` must reach the mirror, even when its
`changed` frame is read before the refresh that asked for the list resumes."""

import asyncio
import os

import pytest
from bridge_harness import Hostile, async_wait_for, short_tempdir

from hostbridge.bridge import Bridge
from hostbridge.config import Config, VmSpec

pytestmark = pytest.mark.timeout(60)


def test_a_change_right_after_the_listing_should_not_be_wiped_by_it():
    d = short_tempdir()
    channel = os.path.join(d, "vm")
    guest = Hostile(channel, "racylist")
    config = Config(
        vms=[VmSpec("vm", "pty:" + channel)], db=os.path.join(d, "bridge.sqlite3"), discover=False
    )

    async def main():
        bridge = Bridge(config)
        await bridge.start()
        try:
            guest.start().wait_ready()
            await async_wait_for(lambda: bridge.vm("vm").agent == "connected", what="sync")
            s = bridge.guest("vm")
            await async_wait_for(
                lambda: not s.mirror_sync.refreshing and s.mirror.gseq == 1,
                what="the refresh and the change after it",
            )
            assert s.mirror.entries["late.key"].value == "late value"
        finally:
            await bridge.stop()

    try:
        asyncio.run(main())
    finally:
        guest.stop()
