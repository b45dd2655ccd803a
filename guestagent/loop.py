"""A small blocking event loop: epoll, one-shot timers, signals; and Outbox, the output buffer of
a non-blocking descriptor.

Why not asyncio: a round trip through an asyncio streams echo costs ~100 µs on a pty here, a
plain epoll loop ~42 µs (docs/peers.md), and the agent must beat qemu-ga. The per-message path
is: epoll returns, the fd's callback reads, decodes, answers with one write.

Idle means asleep: epoll waits with the timeout of the next timer, or forever when there is none.
Signals arrive through signal.set_wakeup_fd, so a handler runs in the loop, never in the middle
of a callback.
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import signal
import time
from collections import deque

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType
    from typing import Any, Optional, Union

    # What signal.signal() installs and returns (the handler a signal had before ours).
    _SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]
    # A non-blocking write: how many bytes the descriptor took, 0 when it would block.
    Write = Callable[[Union[bytes, bytearray]], int]

log = logging.getLogger(__name__)

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ET = select.EPOLLET
HUP = select.EPOLLHUP
ERR = select.EPOLLERR


class Timer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


def _noop_handler(signum: int, frame: FrameType | None) -> None:
    """Python needs a handler for the signal to be caught; the work happens in the loop."""


class Loop:
    """Callbacks for descriptors (``callback(events)``), timers and signals, in one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], object]] = {}
        self._timers: list[Timer] = []
        self._cancelled = 0
        self._running = False
        self._signals: dict[int, Callable[[int], object]] = {}
        self._old_handlers: dict[int, _SignalHandler] = {}
        self._wakeup: tuple[int, int] | None = None  # (read fd, write fd) of the wakeup pipe

    # -- descriptors ------------------------------------------------------------------------

    def add(self, fd: int, events: int, callback: Callable[[int], object]) -> None:
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    # -- timers -----------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        """Run ``callback(*args)`` once after ``delay`` seconds; return a Timer to cancel()."""
        timer = Timer(self.clock() + max(0.0, delay), callback, args)
        heapq.heappush(self._timers, timer)
        # Cancelled timers stay in the heap until due; compact when they dominate it.
        if len(self._timers) > 64 and self._cancelled * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0
        return timer

    def cancel(self, timer: Timer | None) -> None:
        if timer is not None and not timer.cancelled:
            timer.cancel()
            self._cancelled += 1

    # -- signals ----------------------------------------------------------------------------

    def add_signal(self, signum: int, callback: Callable[[int], object]) -> None:
        """Run ``callback(signum)`` from the loop when the signal arrives (main thread only)."""
        if self._wakeup is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wakeup = (r, w)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add(r, IN, self._on_wakeup)
        self._signals[signum] = callback
        if signum not in self._old_handlers:
            self._old_handlers[signum] = signal.signal(signum, _noop_handler)

    def _on_wakeup(self, events: int) -> None:
        if self._wakeup is None:
            return  # closed (close() removes this callback first: not expected)
        try:
            data = os.read(self._wakeup[0], 512)
        except BlockingIOError:
            return
        for signum in data:
            callback = self._signals.get(signum)
            if callback is not None:
                callback(signum)

    # -- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """Dispatch until stop(). A failing callback is logged, not fatal: one bad input must
        not take the daemon down (the callbacks handle every expected error themselves)."""
        self._running = True
        poll = self._epoll.poll
        callbacks = self._callbacks
        while self._running:
            timers = self._timers
            timeout: float = -1
            while timers and timers[0].cancelled:
                heapq.heappop(timers)
                self._cancelled -= 1
            if timers:
                timeout = max(0.0, timers[0].when - self.clock())
            for fd, events in poll(timeout):
                callback = callbacks.get(fd)
                if callback is None:
                    continue
                try:
                    callback(events)
                except Exception:
                    log.exception("internal error handling descriptor %d", fd)
            if self._timers:
                self._run_timers()

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration: wait up to ``timeout`` seconds (or until the next timer), dispatch.
        Unlike run(), a failing callback raises: for tests and embedding."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
            self._cancelled -= 1
        wait = -1 if timeout is None else timeout
        if self._timers:
            until_timer = max(0.0, self._timers[0].when - self.clock())
            wait = until_timer if wait < 0 else min(wait, until_timer)
        for fd, events in self._epoll.poll(wait):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(events)
        if self._timers:
            self._run_timers()

    def _run_timers(self) -> None:
        timers = self._timers
        now = self.clock()
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if timer.cancelled:
                self._cancelled -= 1
                continue
            timer.cancelled = True  # fired: a later cancel() is a no-op
            try:
                timer.callback(*timer.args)
            except Exception:
                log.exception("internal error in a timer")

    def close(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self.remove(self._wakeup[0])
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        self._epoll.close()


class Outbox:
    """What a non-blocking descriptor could not take yet: bytes, then lazily produced parts.

    A part is bytes or an iterator of bytes (a long listing is encoded only as the peer reads,
    so a full cache never sits in memory as frames). ``limit`` bounds the buffered bytes; an
    iterator counts as STREAM_WEIGHT bytes. add() returns False instead of exceeding it: the
    owner then drops the peer (or the stream) rather than grow without bound.
    """

    __slots__ = ("limit", "_buf", "_parts", "_queued")

    STREAM_WEIGHT = 16 * 1024
    LOW_WATER = 64 * 1024  # refill the buffer from parts below this
    CHUNK = 64 * 1024  # most bytes handed to one write()

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._parts: deque[bytes | Iterator[bytes]] = deque()
        self._queued = 0  # bytes (and stream weights) in _parts

    def __bool__(self) -> bool:
        return bool(self._buf) or bool(self._parts)

    @property
    def size(self) -> int:
        return len(self._buf) + self._queued

    def clear(self) -> None:
        self._buf.clear()
        self._parts.clear()
        self._queued = 0

    def add(self, data: bytes) -> bool:
        """Queue bytes; False (and nothing queued) if that would exceed the limit."""
        if len(self._buf) + self._queued + len(data) > self.limit:
            return False
        if self._parts:
            self._parts.append(data)
            self._queued += len(data)
        else:
            self._buf += data
        return True

    def add_stream(self, iterator: Iterator[bytes]) -> bool:
        """Queue an iterator of bytes, consumed as the descriptor drains."""
        if len(self._buf) + self._queued + self.STREAM_WEIGHT > self.limit:
            return False
        self._parts.append(iterator)
        self._queued += self.STREAM_WEIGHT
        return True

    def send(self, data: bytes, write: Write) -> bool:
        """Write ``data`` now if nothing is queued, queue the rest; False on overflow.

        ``write(bytes) -> int`` returns 0 when the descriptor would block and raises OSError
        for real errors. This is the per-message path: one write, no copy, when all goes well.
        """
        if not self._buf and not self._parts:
            n = write(data)
            if n == len(data):
                return True
            data = data[n:]
        return self.add(data)

    def flush(self, write: Write) -> bool:
        """Write what the descriptor takes; True when everything is out."""
        buf = self._buf
        parts = self._parts
        while True:
            while parts and len(buf) < self.LOW_WATER:
                part = parts[0]
                if isinstance(part, bytes):
                    buf += part
                    parts.popleft()
                    self._queued -= len(part)
                else:
                    chunk = next(part, None)
                    if chunk is None:
                        parts.popleft()
                        self._queued -= self.STREAM_WEIGHT
                    else:
                        buf += chunk
            if not buf:
                return True
            n = write(buf[: self.CHUNK])
            if n <= 0:
                return False
            del buf[:n]
