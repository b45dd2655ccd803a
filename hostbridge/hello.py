"""The host's side of the opening handshake on one link: send hellos until one is answered.

On a unix channel QEMU accepts the connection whether or not an agent runs in the guest, and
bytes written before an agent opens the port wait in QEMU for it, so a hello may go unanswered
for a long time. The greeter repeats it (1 s doubling to 5 s by default), each time with a fresh
request id and nonce, so that an answer to an old hello is never taken for the answer to the
current one. The protocol itself is ovmproto's sans-I/O ``Handshake``; this class adds only the
timer and the bytes' way out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from ovmproto.errors import RemoteError
from ovmproto.handshake import Handshake, HelloResult
from ovmsys.ratelimit import RateLimitedLog

from .config import Limits


class Greeter:
    """Hellos on one link. ``send`` writes bytes or drops them when the link cannot take them."""

    def __init__(
        self,
        send: Callable[[bytes], None],
        new_id: Callable[[], int],
        limits: Limits,
        log: logging.Logger,
        warn: RateLimitedLog,
    ) -> None:
        self._send = send
        self._new_id = new_id
        self._first = limits.hello_interval
        self._max = limits.hello_interval_max
        self._interval = self._first
        self._log = log
        self._warn = warn
        self._handshake: Handshake | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.epoch: str | None = None  # the host stream the hello announces

    @property
    def waiting(self) -> bool:
        """Whether a hello is out and unanswered."""
        return self._handshake is not None

    def begin(self, why: str) -> None:
        """Say hello now, and again while nobody answers."""
        self.stop()
        self._log.debug("hello (%s)", why)
        self._hello()

    def _hello(self) -> None:
        self._handshake = Handshake(
            request_id=self._new_id(), nonce=os.urandom(8).hex(), epoch=self.epoch
        )
        self._send(self._handshake.opening())
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._retry)
        self._interval = min(self._interval * 2, self._max)

    def _retry(self) -> None:
        self._timer = None
        if self._handshake is not None:
            self._log.debug("hello (no answer)")
            self._hello()

    def accept(self, msg: Any) -> HelloResult | None:
        """The guest's answer to the current hello, or None for any other frame."""
        if self._handshake is None:
            return None
        try:
            result = self._handshake.accept(msg)
        except RemoteError as e:
            self._warn.warn("hello", "the guest refused our hello: %s", e.message)
            return None
        if result is not None:
            self.stop()
        return result

    def stop(self) -> None:
        """Stop saying hello (answered, or the link is gone); the next begin() starts afresh."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handshake = None
        self._interval = self._first
