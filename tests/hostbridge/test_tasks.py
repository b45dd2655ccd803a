"""hostbridge.tasks: a guest's background tasks, logged when they fail, cancelled together."""

import asyncio
import logging

from hostbridge.tasks import TaskSet


def test_a_failing_task_should_be_logged_and_not_raise(caplog):
    async def boom():
        raise ValueError("broken")

    async def main():
        tasks = TaskSet("vm:x", logging.getLogger("t"))
        t = tasks.spawn(boom(), "refresh")
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert "vm:x:refresh failed: ValueError('broken')" in caplog.text


def test_cancel_all_should_cancel_every_running_task():
    async def main():
        tasks = TaskSet("vm:x", logging.getLogger("t"))
        running = [tasks.spawn(asyncio.sleep(60), "s%d" % i) for i in range(3)]
        await asyncio.sleep(0)
        await tasks.cancel_all()
        return running

    assert all(t.cancelled() for t in asyncio.run(main()))
