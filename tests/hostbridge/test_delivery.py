"""hostbridge.delivery: one guest's outbox, against a scripted guest and a real SQLite store."""

import asyncio
import contextlib
import logging
import os
import tempfile
import time

import pytest

from hostbridge.config import Limits
from hostbridge.delivery import Delivery
from hostbridge.errors import GuestError, LinkReset, MessageCancelled
from hostbridge.groupcommit import GroupCommit
from hostbridge.mirror import Mirror
from hostbridge.session import Session, State
from hostbridge.store import Store
from hostbridge.tasks import TaskSet
from ovmproto.messages import Set
from tests.hostbridge.scripted_guest import linked
from tests.support.waiting import async_wait_for

pytestmark = pytest.mark.timeout(60)

FAST = Limits(hello_interval=0.1, hello_interval_max=0.2, keepalive=0)


@contextlib.asynccontextmanager
async def outbox(queued=(), guest_epoch_hseq=None):
    """A store with ``queued`` (key, value) rows for VM "vm", then a Delivery on a live link."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(os.path.join(d, "bridge.sqlite3"))
        epoch = store.vm("vm").epoch
        for key, value in queued:
            store.enqueue("vm", key, value, True)
        async with linked(FAST, epoch) as (guest, session):
            if guest_epoch_hseq is not None:
                guest.epoch, guest.hseq = (
                    epoch if guest_epoch_hseq[0] else "other",
                    guest_epoch_hseq[1],
                )
            tasks = TaskSet("vm", logging.getLogger("test"))
            delivery = Delivery(session, store, Mirror(100, 100000), epoch, 5.0, tasks)
            session.on_synced = delivery.on_synced
            session.on_link_down = delivery.on_link_down
            delivery.start()
            try:
                yield guest, session, store, delivery
            finally:
                await tasks.cancel_all()
        store.close()


def run(coro):
    return asyncio.run(coro)


def outcomes(store):
    return [(r[2], r[5]) for r in reversed(store.audit("vm"))]


def test_it_should_deliver_the_outbox_in_order_once_the_link_is_synced():
    async def main():
        rows = [("a", "1"), ("b", "2"), ("a", "3")]
        async with outbox(rows) as (guest, _, store, _):
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox delivered")
            assert guest.applied == [("set", "a", 1), ("set", "b", 2), ("set", "a", 3)]
            assert guest.cache == {"a": "3", "b": "2"}
            assert outcomes(store) == [("a", "delivered"), ("b", "delivered"), ("a", "delivered")]

    run(main())


def test_what_the_guest_already_applied_should_count_as_delivered_without_a_resend():
    async def main():
        rows = [("a", "1"), ("b", "2"), ("c", "3")]
        async with outbox(rows, guest_epoch_hseq=(True, 2)) as (guest, _, store, _):
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox delivered")
            assert guest.applied == [("set", "c", 3)]  # 1 and 2: acknowledged by the hello
            assert [o for _, o in outcomes(store)] == ["delivered"] * 3

    run(main())


def test_another_epochs_position_should_not_count():
    async def main():
        async with outbox([("a", "1")], guest_epoch_hseq=(False, 5)) as (guest, _, store, _):
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox delivered")
            assert guest.applied == [("set", "a", 1)]

    run(main())


def test_a_busy_guest_should_be_resynced_and_sent_the_message_again():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            guest.refuse_once["set"] = "busy"
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            row = store.enqueue("vm", "k", "v", True)
            delivery.wake()
            await async_wait_for(lambda: store.queued("vm") == 0, what="the second try")
            assert guest.applied == [("set", "k", row.seq)] and len(guest.of_type(Set)) == 2
            assert len(guest.hellos()) == 2 and session.counters["resyncs"] == 1

    run(main())


def test_a_refused_message_should_fail_its_sender_and_not_hold_up_the_next():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.refuse["set"] = "quota"
            first = store.enqueue("vm", "big", "v", True)
            waiter = delivery.wait(first.seq)
            delivery.wake()
            with pytest.raises(GuestError) as caught:
                await asyncio.wait_for(waiter, 5)
            assert caught.value.code == "quota"
            del guest.refuse["set"]
            second = store.enqueue("vm", "small", "v", True)
            waiter = delivery.wait(second.seq)
            delivery.wake()
            assert await asyncio.wait_for(waiter, 5) == second.seq
            assert outcomes(store) == [("big", "failed"), ("small", "delivered")]

    run(main())


def test_a_sender_should_learn_when_the_link_goes_down_before_the_acknowledgement():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            guest.silent = {"set"}
            row = store.enqueue("vm", "k", "v", True)
            waiter = delivery.wait(row.seq)
            assert not delivery.was_written(row.seq)
            delivery.wake()
            await async_wait_for(lambda: guest.of_type(Set), what="the set written")
            assert delivery.was_written(row.seq) and delivery.waiting == 1
            await guest.drop()
            with pytest.raises(LinkReset):
                await asyncio.wait_for(waiter, 5)
            assert store.queued("vm") == 1  # it may have arrived: it stays queued
            guest.silent = set()
            await async_wait_for(lambda: store.queued("vm") == 0, what="redelivery")
            assert guest.applied == [("set", "k", row.seq)]

    run(main())


async def one_in_flight(guest, session, store, delivery, key="first"):
    """Sync, then write row ``key`` to a guest that neither applies nor answers it."""
    await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
    guest.silent = {"set"}
    row = store.enqueue("vm", key, "v-" + key, True)
    delivery.wake()
    await async_wait_for(lambda: guest.of_type(Set), what="the set written")
    return row


def written_keys(guest):
    return [m.key for m in guest.of_type(Set)]


def test_a_message_cancelled_before_it_was_written_should_never_reach_the_guest():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            first = await one_in_flight(guest, session, store, delivery)
            second = store.enqueue("vm", "second", "v", True)
            waiter = delivery.wait(second.seq)
            assert delivery.withdraw([second.seq], "cancelled") == ([second.seq], [])
            with pytest.raises(MessageCancelled):  # its sender is told, not left waiting
                await asyncio.wait_for(waiter, 5)
            guest.silent = set()
            await guest.drop()  # the link comes back: the first is sent again, the second never
            await async_wait_for(lambda: guest.applied, what="redelivery")
            await async_wait_for(lambda: store.outbox("vm", withdrawn=True) == [], what="drain")
            assert guest.applied == [("set", "first", first.seq)]
            assert "second" not in written_keys(guest)
            assert outcomes(store) == [("first", "delivered"), ("second", "cancelled")]

    run(main())


def test_a_message_cancelled_in_flight_that_never_arrived_should_end_cancelled_unsent():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            row = await one_in_flight(guest, session, store, delivery)
            assert delivery.withdraw(None, "cancelled") == ([], [row.seq])
            assert store.queued("vm") == 0 and outcomes(store) == [("first", "cancelled_in_flight")]
            guest.silent = set()
            await guest.drop()  # the guest never applied it: its hello says hseq 0
            await async_wait_for(lambda: len(guest.hellos()) == 2, what="the resync")
            await async_wait_for(lambda: store.outbox("vm", withdrawn=True) == [], what="settled")
            assert outcomes(store) == [("first", "cancelled")]
            later = store.enqueue("vm", "later", "v", True)
            delivery.wake()
            await async_wait_for(lambda: store.queued("vm") == 0, what="the next one delivered")
            assert guest.applied == [("set", "later", later.seq)]  # "first" was not sent again
            assert written_keys(guest) == ["first", "later"]

    run(main())


def test_a_message_cancelled_in_flight_that_arrived_should_end_delivered():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            row = await one_in_flight(guest, session, store, delivery)
            assert delivery.withdraw([row.seq], "cancelled") == ([], [row.seq])
            guest.hseq, guest.cache["first"] = row.seq, "v-first"  # applied; the answer was lost
            guest.silent = set()
            await guest.drop()
            await async_wait_for(lambda: store.outbox("vm", withdrawn=True) == [], what="settled")
            assert outcomes(store) == [("first", "delivered")]  # never both
            assert written_keys(guest) == ["first"]

    run(main())


def test_an_expired_message_should_be_dropped_and_never_written():
    async def main():
        async with outbox() as (guest, session, store, delivery):
            await one_in_flight(guest, session, store, delivery)
            stale = store.enqueue("vm", "stale", "v", True, expires=time.time() - 1)
            fresh = store.enqueue("vm", "fresh", "v", True, expires=time.time() + 3600)
            guest.silent = set()
            await guest.drop()
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox drained")
            assert [a[1] for a in guest.applied] == ["first", "fresh"]
            assert "stale" not in written_keys(guest) and stale.seq < fresh.seq
            assert [o for _, o in outcomes(store)] == ["delivered", "expired", "delivered"]

    run(main())


def test_after_a_restart_the_first_queued_message_should_count_as_possibly_written(tmp_path):
    # The bridge may have written it just before it was killed: only the guest's hello can say
    # whether it arrived, so a cancel erases its value but leaves the outcome to that hello.
    store = Store(str(tmp_path / "bridge.sqlite3"))
    epoch = store.vm("vm").epoch
    store.enqueue("vm", "first", "v", True)
    store.enqueue("vm", "second", "v", True)
    session = Session("vm", FAST, epoch)
    delivery = Delivery(
        session, store, Mirror(100, 100000), epoch, 5.0, TaskSet("vm", logging.getLogger("t"))
    )
    assert delivery.withdraw(None, "cancelled") == ([2], [1])
    assert [o for _, o in outcomes(store)] == ["cancelled_in_flight", "cancelled"]
    store.close()


def test_the_next_row_should_come_with_the_last_ones_removal_not_from_a_read_of_its_own():
    # In a pool each read is a round trip to the database: the removal's statement reads the
    # next row (Store.finish_next), so draining a queue reads the outbox once, not once a row.
    async def main():
        async with outbox() as (guest, session, store, delivery):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            calls = []
            deliverable, finish_next = store.deliverable, store.finish_next

            def read(vm):
                calls.append("read")
                return deliverable(vm)

            def finish_and_read(vm, seqs, outcome):
                calls.append("finish_next %s" % seqs)
                store.deliverable = deliverable  # Store's own read inside it is not the loop's
                try:
                    return finish_next(vm, seqs, outcome)
                finally:
                    store.deliverable = read

            store.deliverable, store.finish_next = read, finish_and_read
            rows = [store.enqueue("vm", key, "v", True) for key in ("a", "b", "c")]
            delivery.wake()
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox delivered")
            assert [a[1] for a in guest.applied] == ["a", "b", "c"]
            # One read for the first row; the removal of the last one found nothing left.
            assert calls == ["read"] + ["finish_next [%d]" % r.seq for r in rows]

    run(main())


def test_a_row_read_ahead_then_cancelled_before_its_turn_should_never_be_written():
    # The next row is read inside the group commit that removes the acknowledged one; a cancel
    # may run after that commit and before the delivery's next turn of the loop.
    async def main():
        async with outbox() as (guest, session, store, delivery):
            await async_wait_for(lambda: session.state is State.SYNCED, what="sync")
            delivery.committer = GroupCommit(store)  # a flush of its own, as in the bridge
            cancelled = []
            finish_next = store.finish_next

            def finish_then_cancel(vm, seqs, outcome):
                rows = finish_next(vm, seqs, outcome)
                if rows and not cancelled:
                    # Runs after the flush's COMMIT, before the delivery task resumes.
                    seq = rows[0].seq
                    asyncio.get_running_loop().call_soon(
                        lambda: cancelled.append(delivery.withdraw([seq], "cancelled"))
                    )
                return rows

            store.finish_next = finish_then_cancel
            first = store.enqueue("vm", "first", "v", True)
            second = store.enqueue("vm", "second", "v", True)
            third = store.enqueue("vm", "third", "v", True)
            delivery.wake()
            await async_wait_for(lambda: store.queued("vm") == 0, what="the outbox drained")
            assert cancelled == [([second.seq], [])]
            assert written_keys(guest) == ["first", "third"]
            assert [a[2] for a in guest.applied] == [first.seq, third.seq]
            assert outcomes(store) == [
                ("first", "delivered"),
                ("second", "cancelled"),
                ("third", "delivered"),
            ]

    run(main())
