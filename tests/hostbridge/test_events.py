"""The change stream's ring (hostbridge.events): order, filters, bounds, what a late consumer is
told, and waking the waiting ones. Pure logic: the HTTP side is in test_api_events.py."""

import asyncio
import json

import pytest

from hostbridge.events import EventHub


def publish_n(hub, n, vm="vm1", **fields):
    for i in range(n):
        hub.publish("key.set", vm=vm, key="k%d" % i, **fields)


def test_events_should_come_in_order_after_the_cursor_with_their_fields():
    hub = EventHub()
    start = hub.last_id
    hub.publish("key.set", vm="vm1", key="a", value="1", origin="guest")
    hub.publish("agent.state", vm="vm2", agent="connected")
    batch = hub.after(start)
    assert [e.type for e in batch.events] == ["key.set", "agent.state"]
    assert batch.missed == 0 and batch.last == hub.last_id
    first = json.loads(batch.events[0].json)
    assert first["id"] == start + 1 and first["vm"] == "vm1" and first["value"] == "1"
    assert first["type"] == "key.set" and isinstance(first["time"], float)
    assert hub.after(batch.last).events == []


def test_a_vm_filter_should_skip_other_vms_and_still_move_the_cursor():
    hub = EventHub()
    start = hub.last_id
    hub.publish("key.set", vm="vm2", key="x")
    hub.publish("key.set", vm="vm1", key="y")
    hub.publish("key.set", vm="vm2", key="z")
    batch = hub.after(start, vm="vm1")
    assert [e.fields["key"] for e in batch.events] == ["y"]
    assert batch.last == hub.last_id  # the vm2 events after it were looked at too


def test_the_ring_should_keep_at_most_its_count_and_tell_a_late_consumer_how_many_it_missed():
    hub = EventHub(max_events=10)
    start = hub.last_id
    publish_n(hub, 25)
    batch = hub.after(start)
    assert batch.missed == 15
    assert [e.fields["key"] for e in batch.events] == ["k%d" % i for i in range(15, 25)]
    overflow = json.loads(batch.overflow().json)
    assert overflow == {"type": "overflow", "missed": 15}
    assert hub.stats()["events"] == 10 and hub.stats()["events_dropped"] == 15


def test_the_ring_should_stay_within_its_bytes_whatever_the_values():
    hub = EventHub(max_events=100_000, max_bytes=200_000)
    publish_n(hub, 500, value="v" * 8192)
    stats = hub.stats()
    assert stats["event_bytes"] <= 200_000
    assert 5 <= stats["events"] < 20
    # The estimate covers the real JSON (escapes included).
    hub.publish("key.set", vm="vm1", key="k", value='"\\' * 4096)
    last = hub.after(hub.last_id - 1).events[0]
    assert len(last.json) <= last.size


def test_a_cursor_from_an_earlier_run_should_be_told_missed_unknown():
    hub = EventHub()
    earlier = hub.first_id - 5  # ids start at the start time: an earlier run's are all below
    publish_n(hub, 2)
    batch = hub.after(earlier)
    assert batch.missed is None
    assert len(batch.events) == 2
    assert json.loads(batch.overflow().json) == {"type": "overflow", "missed": None}
    # The same cursor on a fresh bridge that has published nothing yet.
    assert EventHub().after(earlier).missed is None


def test_a_cursor_from_the_future_should_resume_after_the_newest():
    hub = EventHub()
    publish_n(hub, 2)
    batch = hub.after(hub.last_id + 1000)
    assert batch.events == [] and batch.last == hub.last_id
    hub.publish("key.deleted", vm="vm1", key="k")
    assert [e.type for e in hub.after(batch.last).events] == ["key.deleted"]


def test_the_limit_should_cut_a_batch_and_the_cursor_with_it():
    hub = EventHub()
    start = hub.last_id
    publish_n(hub, 10)
    batch = hub.after(start, limit=4)
    assert len(batch.events) == 4 and batch.last == start + 4
    assert len(hub.after(batch.last).events) == 6


def test_json_should_be_made_only_when_a_consumer_reads_it():
    hub = EventHub()
    publish_n(hub, 3)
    assert all(e._json is None for e in hub._ring)
    data = hub.after(hub.last_id - 1).events[0].sse()
    assert data.startswith(b"id: %d\nevent: key.set\ndata: {" % hub.last_id)
    assert data.endswith(b"}\n\n") and data.count(b"\n") == 4


def test_listeners_should_see_every_event_as_it_is_published():
    hub = EventHub(max_events=2)
    seen = []
    hub.listeners.append(lambda ev: seen.append(ev.type))
    hub.publish("message.queued", vm="vm1", seq=1, key="k")
    hub.publish("message.delivered", vm="vm1", seq=1, key="k", waited=0.01)
    hub.publish("message.queued", vm="vm1", seq=2, key="k")
    assert seen == ["message.queued", "message.delivered", "message.queued"]


@pytest.mark.timeout(10)
def test_waiting_consumers_should_wake_on_publish_and_on_close_and_time_out_otherwise():
    async def main():
        hub = EventHub()
        since = hub.last_id
        waiters = [asyncio.ensure_future(hub.wait_after(since, 5.0)) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        hub.publish("vm.added", vm="vm9")
        assert await asyncio.gather(*waiters) == [True, True, True]
        # Nothing new: the timeout answers False; one waiter's timeout leaves the others waiting.
        short = asyncio.ensure_future(hub.wait_after(hub.last_id, 0.05))
        long = asyncio.ensure_future(hub.wait_after(hub.last_id, 5.0))
        assert await short is False
        assert not long.done()
        hub.close()
        assert await long is False
        assert await hub.wait_after(hub.last_id, 5.0) is False  # closed: at once

    asyncio.run(main())


def test_every_event_type_should_be_documented_for_api_users():
    import os

    from hostbridge.events import EVENT_TYPES

    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "api.md")
    with open(docs) as f:
        text = f.read()
    missing = [t for t in EVENT_TYPES + ("overflow",) if "`%s`" % t not in text]
    assert missing == []
