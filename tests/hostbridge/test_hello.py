"""hostbridge.hello: hellos until one is answered, each with a fresh id and nonce."""

import asyncio
import itertools
import logging

from hostbridge.config import Limits
from hostbridge.hello import Greeter
from ovmproto.codec import Reader
from ovmproto.framing import Resync
from ovmproto.handshake import answer_hello
from ovmproto.messages import Err, Hello
from ovmsys.ratelimit import RateLimitedLog

log = logging.getLogger("test")


def greeter(sent, limits=None):
    g = Greeter(
        sent.append,
        itertools.count(1).__next__,
        limits or Limits(hello_interval=0.05, hello_interval_max=0.2),
        log,
        RateLimitedLog(log),
    )
    g.epoch = "e1"
    return g


def hellos(sent):
    return [m for data in sent for m in Reader().feed(data) if type(m) is Hello]


def answer(hello, gseq=0):
    frames = Reader().feed(answer_hello(hello, "a", "g", gseq, "e1", 0))
    return next(m for m in frames if not isinstance(m, Resync))


def test_an_unanswered_hello_should_be_repeated_at_doubling_intervals_up_to_the_maximum():
    async def main():
        sent = []
        g = greeter(sent)
        loop = asyncio.get_running_loop()
        delays = []
        g.begin("connected")
        for _ in range(4):
            delays.append(round(g._timer.when() - loop.time(), 3))
            g._timer.cancel()
            g._retry()  # what the timer does when it fires
        g.stop()
        return sent, delays

    sent, delays = asyncio.run(main())
    assert delays == [0.05, 0.1, 0.2, 0.2]
    hs = hellos(sent)
    assert len(hs) == 5
    assert len({h.nonce for h in hs}) == 5 and len({h.id for h in hs}) == 5
    assert all(h.epoch == "e1" for h in hs)


def test_only_the_answer_to_the_current_hello_should_be_accepted():
    async def main():
        sent = []
        g = greeter(sent)
        g.begin("connected")
        g._retry()  # as if the first hello's timer had fired: a second hello
        first, second = hellos(sent)
        assert g.accept(answer(first)) is None  # stale: an answer to an older hello
        result = g.accept(answer(second, gseq=9))
        assert result is not None and result.gseq == 9
        assert not g.waiting
        assert g._timer is None  # answered: no more hellos

    asyncio.run(main())


def test_a_refused_hello_should_be_warned_about_and_not_accepted(caplog):
    async def main():
        sent = []
        g = greeter(sent)
        g.begin("connected")
        hello = hellos(sent)[0]
        with caplog.at_level(logging.WARNING):
            refusal = Err(id=hello.id, code="unsupported_version", msg="too new")
            assert g.accept(refusal) is None
        assert g.waiting
        g.stop()

    asyncio.run(main())
    assert "refused our hello" in caplog.text


def test_stop_should_end_the_repeats():
    async def main():
        sent = []
        g = greeter(sent)
        g.begin("connected")
        g.stop()
        return g

    g = asyncio.run(main())
    assert g._timer is None and not g.waiting
