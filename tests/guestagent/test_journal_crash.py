"""kill -9 of the real daemon at random points while it appends to its journal and while it
compacts (guestagent/store.py): after a restart every acknowledged change is there, and the only
other difference allowed is the one change that was in flight, unacknowledged, when it died.

Values of 8 KB on 100 keys keep the snapshot near 800 KB, so the journal reaches the 1 MiB floor
and is compacted every ~130 changes; every 7th change is a delete, which compacts at once.
"""

from __future__ import annotations

import os
import random
import threading
import time

from ovmproto.messages import Delete, Get, Ok, Set
from tests.guestagent.harness import Daemon, Host
from tests.support.waiting import TIMEOUT, HarnessTimeout

KEYS = 100
FILLER = "x" * 8000


class Writer(threading.Thread):
    """Sets and deletes through the daemon's socket, one at a time, until the daemon dies.

    ``acked``: key -> value (None: deleted) as acknowledged; ``inflight``: the change sent and
    not (yet) answered.
    """

    def __init__(self, daemon: Daemon, acked: dict, start_at: int):
        super().__init__(daemon=True)
        self.client = daemon.client()
        self.acked = acked
        self.i = start_at
        self.inflight: tuple[str, str | None] | None = None
        self.changes = 0

    def run(self) -> None:
        c = self.client
        try:
            while True:
                key = "k%d" % (self.i % KEYS)
                if self.i % 7 == 6:
                    self.inflight = (key, None)
                    reply = c.request(Delete, key=key)
                else:
                    value = "%08d.%s" % (self.i, FILLER)
                    self.inflight = (key, value)
                    reply = c.request(Set, key=key, value=value)
                if type(reply) is Ok:
                    self.acked[key] = self.inflight[1]
                    self.changes += 1
                self.inflight = None
                self.i += 1
        except (HarnessTimeout, OSError):  # the daemon died: EOF or reset
            pass
        finally:
            c.close()


def check(daemon: Daemon, acked: dict, inflight, note: str) -> None:
    with daemon.client() as c:
        for n in range(KEYS):
            key = "k%d" % n
            reply = c.request(Get, key=key)
            got = reply.value if type(reply) is Ok else None
            if got != acked.get(key):
                assert inflight is not None and (key, got) == inflight, (
                    "%s: %s: got %s, acked %s"
                    % (
                        note,
                        key,
                        got and got[:8],
                        acked.get(key) and acked[key][:8],
                    )
                )
                acked[key] = got  # it made it to disk before the kill: it is the state now


def test_every_acknowledged_change_should_survive_kill_9_at_random_points():
    seed = int(time.time())
    rng = random.Random(seed)
    acked: dict = {}
    done = 0
    with Host() as host, Daemon(channel=host.link) as daemon:
        for rnd in range(5):
            if rnd:  # the first was started by the with statement
                daemon.start()
            daemon.wait_ready()
            writer = Writer(daemon, acked, done)
            writer.start()
            time.sleep(rng.uniform(0.1, 0.8))
            daemon.kill()
            writer.join(TIMEOUT)
            assert not writer.is_alive()
            done = writer.i + 1
            daemon.start().wait_ready()
            check(daemon, acked, writer.inflight, "seed %d round %d" % (seed, rnd))
            daemon.kill()
        assert done > 2 * 130, "too few changes to have compacted: test too weak"


def test_every_acknowledged_change_should_survive_kill_9_during_a_compaction():
    acked: dict = {}
    done = 0
    caught = 0
    with Host() as host, Daemon(channel=host.link) as daemon:
        for rnd in range(4):
            if rnd:
                daemon.start()
            daemon.wait_ready()
            writer = Writer(daemon, acked, done)
            writer.start()
            # A compaction writes its snapshot or its new journal through a temp file
            # (cache.json.tmp-..., cache.journal.tmp-...): kill the daemon while one exists.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and writer.is_alive():
                if any(".tmp-" in name for name in os.listdir(daemon.state_dir)):
                    daemon.kill()
                    caught += 1
                    break
            daemon.kill()
            writer.join(TIMEOUT)
            done = writer.i + 1
            daemon.start().wait_ready()
            check(daemon, acked, writer.inflight, "round %d" % rnd)
            assert not any(".tmp-" in n for n in os.listdir(daemon.state_dir))  # cleaned up
            daemon.kill()
    assert caught >= 3, "the daemon was killed during only %d compactions" % caught
