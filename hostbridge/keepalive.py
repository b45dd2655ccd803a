"""Pings a synced guest that has gone silent, so that a vanished agent is noticed.

On a unix channel only silence tells: QEMU keeps our socket connected when the agent in the
guest stops, and says nothing. After ``interval`` seconds without a frame from the guest, one
ping goes out; when it is not answered, the session's request timeout resynchronizes the link,
which shows the agent as not connected until a hello is answered again.
"""

from __future__ import annotations

import asyncio
import time

from ovmproto.messages import Ping

from . import errors
from .session import Session, State
from .tasks import TaskSet


class Keepalive:
    def __init__(self, session: Session, interval: float, tasks: TaskSet) -> None:
        self.session = session
        self.interval = interval  # 0: never ping
        self._tasks = tasks
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Watch the link from now on (it has just synced)."""
        self.stop()
        if self.interval > 0:
            self._timer = asyncio.get_running_loop().call_later(self.interval / 2, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self.session.state is not State.SYNCED:
            return
        if time.monotonic() - self.session.last_frame >= self.interval:
            self._tasks.spawn(self._ping(), "keepalive")
        self.start()

    async def _ping(self) -> None:
        try:
            await self.session.request(lambda i: Ping(id=i), min(5.0, self.interval), internal=True)
        except errors.BridgeError as e:
            self.session.log.debug("keepalive: %s", e.message)
