"""A change the guest makes right after answering a `list` must reach the mirror, even when its
`changed` frame is read before the refresh that asked for the list resumes."""

import asyncio
import os
from contextlib import closing

import pytest

from tests.hostbridge.bridge_harness import Hostile, pty_config, running_bridge
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_change_right_after_the_listing_should_not_be_wiped_by_it(short_dir):
    config = pty_config(short_dir, "vm")

    async def main():
        async with running_bridge(config) as bridge:
            guest.start().wait_ready()
            await async_wait_for(lambda: bridge.vm("vm").agent == "connected", what="sync")
            s = bridge.guest("vm")
            await async_wait_for(
                lambda: not s.mirror_sync.refreshing and s.mirror.gseq == 1,
                what="the refresh and the change after it",
            )
            assert s.mirror.entries["late.key"].value == "late value"

    # The guest starts in main(), once the bridge has made its pty.
    with closing(Hostile(os.path.join(short_dir, "vm"), "racylist")) as guest:
        asyncio.run(main())
