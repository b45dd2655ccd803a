"""A send's idempotency key (hostbridge.bridge.Bridge.send, the API's Idempotency-Key): a retry with
the same key is answered with the first send's message and outcome, and never applied again. The
bridge runs in-process over a real unix channel to a scripted guest, which records every set it
applies."""

import asyncio
import contextlib
import time

import pytest

from hostbridge import errors
from hostbridge.bridge import Bridge
from hostbridge.config import Config, Limits, VmSpec
from ovmproto.messages import Set
from tests.hostbridge.scripted_guest import ScriptedGuest
from tests.support.tempdirs import short_dir
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def bridge_and_guest(start_guest=True, **limits):
    """A started Bridge with VMs vm1 and vm2, each on a unix channel to a ScriptedGuest (vm1's
    started and synced unless start_guest is false); yields (bridge, vm1's guest)."""
    with short_dir() as d:
        guests = {n: ScriptedGuest(str(d / n)) for n in ("vm1", "vm2")}
        config = Config(
            vms=[VmSpec(n, "unix:" + g.path, "flag") for n, g in guests.items()],
            db=str(d / "bridge.sqlite3"),
            discover=False,
            limits=Limits(reconnect_max=0.2, **limits),
        )
        bridge = Bridge(config)
        await bridge.start()
        try:
            if start_guest:
                await guests["vm1"].start()
                await connected(bridge)
            yield bridge, guests["vm1"]
        finally:
            await bridge.stop()
            for g in guests.values():
                await g.stop()


async def connected(bridge, vm="vm1"):
    await async_wait_for(lambda: bridge.vm(vm).agent == "connected", what="%s synced" % vm)


def sets(guest):
    return [a for a in guest.applied if a[0] == "set"]


def test_a_retry_with_the_same_key_should_answer_the_first_outcome_and_apply_nothing_again():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            first = await bridge.send("vm1", "k", "v", idempotency_key="abc-1")
            again = await bridge.send("vm1", "k", "v", idempotency_key="abc-1", timeout=1.0)
            other = await bridge.send("vm1", "k", "v", idempotency_key="abc-2")
            assert (first.outcome, first.seq, first.replayed) == ("delivered", 1, False)
            assert (again.outcome, again.seq, again.replayed) == ("delivered", 1, True)
            assert (other.seq, other.replayed) == (2, False)
            assert sets(guest) == [("set", "k", 1), ("set", "k", 2)]
            # The key is the VM's: the same key to another VM is another message.
            elsewhere = await bridge.send("vm2", "k", "v", idempotency_key="abc-1")
            assert (elsewhere.outcome, elsewhere.seq, elsewhere.replayed) == ("queued", 1, False)
            assert [a.outcome for a in bridge.audit("vm1")] == ["delivered", "delivered"]

    asyncio.run(main())


def test_a_retry_while_the_message_is_queued_should_answer_queued_then_delivered_once():
    async def main():
        async with bridge_and_guest(start_guest=False) as (bridge, guest):
            first = await bridge.send("vm1", "VMAPIEvent", "boot", idempotency_key="e1")
            again = await bridge.send("vm1", "VMAPIEvent", "boot", idempotency_key="e1")
            assert (first.outcome, first.seq, again.outcome, again.seq) == ("queued", 1) * 2
            assert again.replayed and bridge.vm("vm1").queued == 1
            with pytest.raises(errors.AgentNotConnected) as e:
                await bridge.send("vm1", "VMAPIEvent", "boot", idempotency_key="e1", queue=False)
            assert "stays queued" in e.value.message
            await guest.start()
            await async_wait_for(lambda: bridge.vm("vm1").queued == 0, what="delivery")
            last = await bridge.send("vm1", "VMAPIEvent", "boot", idempotency_key="e1")
            assert (last.outcome, last.seq, last.replayed) == ("delivered", 1, True)
            assert sets(guest) == [("set", "VMAPIEvent", 1)]

    asyncio.run(main())


def test_a_retry_while_the_first_send_still_waits_should_wait_for_the_same_message():
    async def main():
        async with bridge_and_guest(delivery_timeout=1.0) as (bridge, guest):
            guest.silent = {"set"}  # no ack: both senders wait for the same message

            def send():
                return asyncio.ensure_future(
                    bridge.send("vm1", "k", "v", idempotency_key="same", timeout=20.0)
                )

            first = send()
            await async_wait_for(lambda: guest.of_type(Set), what="the set")
            second = send()
            await asyncio.sleep(0)  # let the retry reach its wait
            guest.silent = set()  # the redelivery after the resync is acknowledged
            a, b = await asyncio.gather(first, second)
            assert (a.outcome, a.seq, a.replayed) == ("delivered", 1, False)
            assert (b.outcome, b.seq, b.replayed) == ("delivered", 1, True)
            assert sets(guest) == [("set", "k", 1)]
            assert bridge.guest("vm1").outstanding == 0

    asyncio.run(main())


def test_a_key_reused_for_another_message_should_be_refused_and_nothing_sent():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            await bridge.send("vm1", "k", "v", idempotency_key="K")
            for key, value, log in (("k", "w", True), ("other", "v", True), ("k", "v", False)):
                with pytest.raises(errors.IdempotencyKeyReused) as e:
                    await bridge.send("vm1", key, value, log=log, idempotency_key="K")
                assert e.value.http_status == 422 and "message 1" in e.value.message
            assert sets(guest) == [("set", "k", 1)]

    asyncio.run(main())


def test_a_log_off_value_should_be_compared_by_its_size_only():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            await bridge.send("vm1", "pw", "secret-1", log=False, idempotency_key="P")
            # Another secret of the same size cannot be told apart: nothing on disk may be
            # derived from it. Another size can.
            same_size = await bridge.send("vm1", "pw", "secret-2", log=False, idempotency_key="P")
            assert (same_size.seq, same_size.replayed) == (1, True)
            with pytest.raises(errors.IdempotencyKeyReused):
                await bridge.send("vm1", "pw", "secret-10", log=False, idempotency_key="P")
            assert sets(guest) == [("set", "pw", 1)]

    asyncio.run(main())


def test_a_retry_of_a_message_the_agent_refused_should_say_so_and_send_nothing():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            guest.refuse["set"] = "quota"
            with pytest.raises(errors.GuestError):
                await bridge.send("vm1", "k", "v", idempotency_key="Q")
            with pytest.raises(errors.NotDelivered) as e:
                await bridge.send("vm1", "k", "v", idempotency_key="Q")
            assert e.value.http_status == 409 and "the agent refused it" in e.value.message
            assert len(guest.of_type(Set)) == 1

    asyncio.run(main())


def test_a_retry_of_a_message_removed_from_the_outbox_otherwise_should_not_wait_for_it():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            guest.silent = {"set"}
            first = await bridge.send("vm1", "k", "v", idempotency_key="W", timeout=0.2)
            assert first.outcome == "queued"
            # Gone by another path than delivery (one that records no outcome for the key).
            bridge.store._db.execute("DELETE FROM outbox WHERE vm='vm1' AND seq=?", (first.seq,))
            with pytest.raises(errors.NotDelivered) as e:
                await bridge.send("vm1", "k", "v", idempotency_key="W", timeout=5.0)
            assert "was not delivered: withdrawn" in e.value.message

    asyncio.run(main())


def test_a_sender_given_up_by_its_caller_should_stop_counting_as_outstanding():
    async def main():
        async with bridge_and_guest() as (bridge, guest):
            guest.silent = {"set"}
            task = asyncio.ensure_future(bridge.send("vm1", "k", "v", timeout=20.0))
            await async_wait_for(lambda: guest.of_type(Set), what="the set")
            assert bridge.guest("vm1").delivery.waiting == 1
            task.cancel()  # as aiohttp does with the handler of a client that went away
            with pytest.raises(asyncio.CancelledError):
                await task
            assert bridge.guest("vm1").delivery.waiting == 0

    asyncio.run(main())


@pytest.mark.parametrize("outcome", ["cancelled", "expired"])
def test_a_retry_of_a_withdrawn_message_should_say_so_and_never_send_it(outcome):
    async def main():
        async with bridge_and_guest(start_guest=False) as (bridge, guest):
            first = await bridge.send(
                "vm1", "pw", "secret", log=False, expires=60, idempotency_key="w1"
            )
            if outcome == "cancelled":
                bridge.cancel("vm1", first.seq)
            else:
                assert bridge.expire(now=time.time() + 120) == 1
            error = errors.MessageCancelled if outcome == "cancelled" else errors.MessageExpired
            with pytest.raises(error):
                await bridge.send("vm1", "pw", "secret", log=False, idempotency_key="w1")
            await guest.start()
            await connected(bridge)
            with pytest.raises(error):
                await bridge.send("vm1", "pw", "secret", log=False, idempotency_key="w1")
            assert sets(guest) == [] and bridge.vm("vm1").queued == 0

    asyncio.run(main())
