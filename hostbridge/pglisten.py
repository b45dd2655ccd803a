"""The pool's wake-ups: one connection that LISTENs to the shared database (docs/pool.md,
"Wake-ups: LISTEN/NOTIFY").

    listener = Listener(url, [PLACEMENT_CHANNEL, channel_for_host(me)], on_notify, on_reconnect)
    await listener.start()      # connected, or trying again in the background
    ...
    await listener.stop()

A notification is a hint sent at another bridge's COMMIT; PostgreSQL keeps none for a session
that is not listening. So when the connection is lost, the notifications sent until it is made
again are lost too: after each new connection but the first, on_reconnect() tells the owner to
read again what it may have missed (the placements, the outboxes it delivers). Connection attempts
back off from 0.5 s to 5 s; an outage is logged once when it starts and once when it ends.

The callbacks run on the event loop, one notification at a time; an exception in one is logged
and the listening goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

from .pgstore import one_line, redact, session_conninfo

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0


class Listener:
    def __init__(
        self,
        url: str,
        channels: list[str],
        on_notify: Callable[[str, str], None],
        on_reconnect: Callable[[], None],
        connect_timeout: float = 3.0,
    ) -> None:
        self.channels = list(channels)
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.where = redact(url)
        self._conninfo = session_conninfo(url, connect_timeout)
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None

    async def start(self) -> None:
        """Start listening; returns once the first attempt to connect succeeded or failed (it is
        then tried again in the background)."""
        if self._task is not None:
            return
        self._first_attempt = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pool-listen")
        waiter = asyncio.ensure_future(self._first_attempt.wait())
        # Wait for the attempt, or for the task's end (an unexpected error ends it at once).
        await asyncio.wait([waiter, self._task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connected = False

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        attempts = 0  # connections tried so far
        outage = False  # an outage is in progress and was logged
        while True:
            attempts += 1
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.Error as e:
                self._attempted()
                if not outage:
                    outage = True
                    log.warning(
                        "cannot listen to the pool database at %s: %s; trying again",
                        self.where,
                        one_line(e),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            try:
                for channel in self.channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self.connected = True
                delay = BACKOFF_FIRST
                self._attempted()
                if outage:
                    outage = False
                    log.info("listening to the pool database at %s again", self.where)
                if attempts > 1:
                    self._call(self.on_reconnect)
                async for notify in conn.notifies():
                    self._call(self.on_notify, notify.channel, notify.payload)
            except psycopg.Error as e:
                if not outage:
                    outage = True
                    log.warning(
                        "lost the pool database's notifications (%s): %s; reconnecting",
                        self.where,
                        one_line(e),
                    )
            finally:
                self.connected = False
                await _close(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def _attempted(self) -> None:
        if self._first_attempt is not None:
            self._first_attempt.set()

    @staticmethod
    def _call(callback: Callable[..., None], *args: str) -> None:
        try:
            callback(*args)
        except Exception:  # the owner's bug must not end the listening: logged with its trace
            log.exception("a pool notification handler failed")


async def _close(conn: psycopg.AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection; it is gone either way
        pass
