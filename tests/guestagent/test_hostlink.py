"""The host link in-process: a real Loop, a real raw pty, a real CacheStore; the test is the
host."""

import time

import pytest

from guestagent.hostlink import CONNECTED, DISCONNECTED, SYNCED, HostLink
from guestagent.loop import Loop
from guestagent.service import Service
from guestagent.store import CacheStore, StoreError
from ovmproto.limits import EVENT_KEY
from ovmproto.messages import Delete, Err, Get, List, Ok, Ping, Put, Set
from tests.guestagent.harness import Host
from tests.support.waiting import HarnessTimeout


class FlakyStore(CacheStore):
    """The real store, except that commit() fails while ``failing`` is set (a full disk)."""

    failing = False

    def commit(self, cache, ops):
        if self.failing:
            raise StoreError("cannot write %s: No space left on device" % self.journal_path)
        super().commit(cache, ops)


class Rig:
    def __init__(self, tmp_path, outbox_limit=1024 * 1024):
        self.loop = Loop()
        self.store = FlakyStore(str(tmp_path), 1024, 64)
        self.service = Service(self.store)
        self.host = Host()
        self.states = []
        self.link = HostLink(
            self.loop,
            self.service,
            self.host.link,
            on_state=lambda state, path: self.states.append(state),
            outbox_limit=outbox_limit,
        )
        self.link.start()

    def settle(self, done, timeout=5.0, what="condition"):
        """Run the daemon's loop and the host's reads until ``done()``."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise HarnessTimeout("timed out waiting for %s" % what)
            self.loop.run_once(0.005)
            self.host.poll(0.005)

    def ask(self, cls, **fields):
        request_id = self.host.next_id()
        self.host.send(cls(id=request_id, **fields))
        found = []

        def replied():
            for m in self.host.pending:
                if type(m) in (Ok, Err) and m.id == request_id:
                    found.append(m)
                    return True
            return False

        self.settle(replied, what="reply to %s" % cls.__name__)
        return self.host.reply(request_id, timeout=0)

    def hello(self, epoch="e1"):
        from ovmproto.handshake import Handshake

        hs = Handshake(self.host.next_id(), "n%d" % self.host.next_id(), epoch)
        self.host.send(hs.opening())
        result = []

        def accepted():
            for m in self.host.pending:
                r = hs.accept(m)
                if r is not None:
                    result.append(r)
                    return True
            return False

        self.settle(accepted, what="hello reply")
        self.host.pending = []
        return result[0]

    def close(self):
        self.link.close()
        self.loop.close()
        self.host.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def test_it_should_be_connected_but_not_synced_before_a_hello(rig):
    rig.settle(lambda: rig.link.state == CONNECTED, what="connected")
    assert rig.ask(Ping).id >= 1
    reply = rig.ask(Set, key="k", value="v", seq=1)
    assert type(reply) is Err and reply.code == "busy"
    assert rig.service.get("k") is None


def test_hello_should_report_identity_and_follow_a_new_epoch(rig, tmp_path):
    h = rig.hello("e1")
    assert (h.gid, h.gseq, h.epoch, h.hseq) == (rig.service.cache.gid, 0, "e1", 0)
    assert rig.link.state == SYNCED
    assert type(rig.ask(Set, key="k", value="v", seq=1)) is Ok
    assert rig.hello("e1").hseq == 1
    h = rig.hello("e2")
    assert (h.epoch, h.hseq, h.gseq) == ("e2", 0, 1)
    # The epoch is on disk: a restarted daemon reports it.
    assert CacheStore(str(tmp_path), 1024, 64).load().epoch == "e2"


def test_a_host_set_should_apply_once_and_answer_a_duplicate_with_dup(rig):
    rig.hello()
    ok = rig.ask(Set, key="k", value="v1", seq=1)
    assert (type(ok), ok.seq, ok.dup) == (Ok, 1, None)
    gseq = rig.service.cache.gseq
    again = rig.ask(Set, key="k", value="other", seq=1)
    assert (type(again), again.seq, again.dup) == (Ok, 1, True)
    assert rig.service.get("k").value == "v1"
    assert rig.service.cache.gseq == gseq
    dele = rig.ask(Delete, key="k", seq=2)
    assert (dele.found, dele.dup) == (True, None)
    assert rig.ask(Delete, key="k", seq=2).dup is True
    assert rig.ask(Delete, key="nothing", seq=3).found is False
    assert rig.service.cache.hseq == 3


def test_the_ok_should_come_before_the_changed_it_caused(rig):
    rig.hello()
    request_id = rig.host.next_id()
    rig.host.send(Set(id=request_id, key="k", value="v", seq=1))
    rig.settle(lambda: rig.host.changed, what="changed")
    kinds = [type(e).__name__ for e in rig.host.events if type(e).__name__ in ("Ok", "Changed")]
    assert kinds[-2:] == ["Ok", "Changed"]
    ch = rig.host.changed[-1]
    assert (ch.op, ch.key, ch.value, ch.origin, ch.gseq) == ("set", "k", "v", "host", 1)


def test_a_vmapievent_should_be_an_event_not_a_key(rig):
    rig.hello()
    assert type(rig.ask(Set, key=EVENT_KEY, value="reboot", seq=1)) is Ok
    assert rig.service.get(EVENT_KEY) is None
    assert [e.value for e in rig.service.events()] == ["reboot"]
    assert rig.service.cache.hseq == 1
    assert rig.host.changed == []


def test_get_and_list_should_answer_in_set_order(rig):
    rig.hello()
    for i, k in enumerate(["b", "a", "c"], 1):
        rig.ask(Set, key=k, value=k * 3, seq=i)
    got = rig.ask(Get, key="a")
    assert (got.key, got.value, got.origin) == ("a", "aaa", "host")
    assert rig.ask(Get, key="zz").code == "not_found"
    request_id = rig.host.next_id()
    rig.host.send(List(id=request_id))
    rig.settle(lambda: any(type(m) is Ok and m.id == request_id for m in rig.host.pending))
    items = [m for m in rig.host.pending if getattr(m, "key", None) and m.id == request_id]
    assert [m.key for m in items] == ["b", "a", "c"]
    assert rig.host.reply(request_id, 0).count == 3


def test_bad_frames_should_be_counted_and_answered_only_with_a_usable_id(rig):
    rig.hello()
    rig.host.send(b'not json\n{"t":"set","id":7,"key":"k"}\n{"t":"nope","id":8}\n[1]\n')
    rig.settle(lambda: len([m for m in rig.host.pending if type(m) is Err]) >= 2)
    errs = {m.id: m.code for m in rig.host.pending if type(m) is Err}
    assert errs == {7: "bad_request", 8: "unknown_type"}
    assert rig.link.bad_frames == 4
    assert type(rig.ask(Ping)) is Ok  # still answering


def test_local_only_requests_from_the_host_should_be_refused(rig):
    rig.hello()
    reply = rig.ask(Put, items=[["k", "v"]])
    assert (type(reply), reply.code) == (Err, "bad_request")


def test_a_failed_save_should_refuse_the_set_and_change_nothing(rig):
    rig.hello()
    rig.ask(Set, key="k", value="old", seq=1)
    rig.store.failing = True
    reply = rig.ask(Set, key="k", value="new", seq=2)
    assert (type(reply), reply.code) == (Err, "internal")
    assert "new" not in reply.msg
    assert rig.service.get("k").value == "old"
    assert rig.service.cache.hseq == 1
    rig.store.failing = False
    assert rig.ask(Set, key="k", value="new", seq=2).dup is None  # redelivered: applied now
    assert rig.service.get("k").value == "new"


def test_an_unexpected_failure_of_a_host_set_should_not_hold_back_later_changes(rig, monkeypatch):
    rig.hello()

    def broken(seq, key, value):
        raise RuntimeError("a bug, not a refusal")

    monkeypatch.setattr(rig.service, "host_set", broken)
    with pytest.raises(RuntimeError):
        rig.link._on_set(Set(id=rig.host.next_id(), key="k", value="v", seq=1))
    rig.service.set("after", "x", "guest")
    rig.settle(lambda: rig.host.changed, what="the change after the failure")
    assert [c.key for c in rig.host.changed] == ["after"]


def test_a_guest_change_should_be_announced_only_while_synced(rig):
    rig.settle(lambda: rig.link.state == CONNECTED)
    rig.service.set("early", "x", "guest")
    rig.hello()
    rig.service.set("late", "y", "guest")
    rig.settle(lambda: rig.host.changed, what="changed")
    assert [(c.key, c.origin, c.gseq) for c in rig.host.changed] == [("late", "guest", 2)]


def test_a_host_that_does_not_read_should_lose_its_output_and_need_a_new_hello(tmp_path):
    rig = Rig(tmp_path, outbox_limit=64 * 1024)
    try:
        rig.hello()
        for i in range(4):
            rig.ask(Set, key="k%d" % i, value="v" * 8192, seq=i + 1)
        # The host stops reading and keeps asking for 32 KiB listings.
        for _ in range(40):
            rig.host.send(List(id=rig.host.next_id()))
            rig.loop.run_once(0.005)
        deadline = time.monotonic() + 5
        while rig.link.state == SYNCED and time.monotonic() < deadline:
            rig.loop.run_once(0.01)
        assert rig.link.state == CONNECTED
        rig.host.drain()
        assert rig.hello().hseq == 4  # a new hello resyncs
        assert rig.link.state == SYNCED
    finally:
        rig.close()


def test_a_pty_hangup_should_close_and_reopen_the_path(rig):
    rig.hello()
    rig.host.disconnect()
    deadline = time.monotonic() + 5
    while rig.link.channel is not None and time.monotonic() < deadline:
        rig.loop.run_once(0.05)
    assert rig.link.state == DISCONNECTED and rig.link.channel is None
    rig.host.reconnect()
    assert rig.hello().epoch == "e1"
    assert rig.states.count(SYNCED) == 2


def test_a_ping_or_a_get_should_be_answered_alike_however_the_host_spells_it(rig, monkeypatch):
    import guestagent.hostlink as hostlink

    rig.hello()
    value = 'a "quoted"\nline, é\x01'
    rig.ask(Set, key="k", value=value, seq=1)
    decoded = []
    real_decode = hostlink.decode
    monkeypatch.setattr(
        hostlink, "decode", lambda frame: decoded.append(frame) or real_decode(frame)
    )
    spellings = {
        101: b'{"t":"get","id":101,"key":"k"}',  # as ovmproto writes it (the bridge)
        102: b'{ "t": "get", "id": 102, "key": "\\u006b" }',
        103: b'{"id":103,"key":"k","t":"get","x":[1]}',
        104: b'{"t":"ping","id":104}',
        105: b'{"t":"ping","id":105,"x":null}',
        106: b'{"t":"get","id":106,"key":"nothing"}',
        107: b'{"key":"nothing","t":"get","id":107}',
        108: b'{"t":"ping","id":9223372036854775807}',
    }
    rig.host.send(b"".join(frame + b"\n" for frame in spellings.values()))
    rig.settle(lambda: len([m for m in rig.host.pending if type(m) in (Ok, Err)]) == 8)
    replies = [m for m in rig.host.pending if type(m) in (Ok, Err)]
    # In the order asked, whichever path answered each.
    assert [m.id for m in replies] == list(spellings)[:-1] + [2**63 - 1]
    by_id = {m.id: m for m in replies}

    def fields(m):
        return [(n, getattr(m, n)) for n in m.__slots__ if n != "id"]

    assert fields(by_id[101]) == fields(by_id[102]) == fields(by_id[103])
    assert (by_id[101].key, by_id[101].value, by_id[101].origin) == ("k", value, "host")
    assert fields(by_id[104]) == fields(by_id[105]) == fields(Ok(id=0))
    assert fields(by_id[106]) == fields(by_id[107])
    assert (type(by_id[106]), by_id[106].code) == (Err, "not_found")
    # The frames as ovmproto writes them were answered without being decoded into messages.
    assert decoded == [spellings[i] for i in (102, 103, 105, 107)]


def test_a_polled_key_should_be_answered_with_its_latest_entry(rig):
    rig.hello()
    rig.ask(Set, key="k", value="one", seq=1)
    assert [rig.ask(Get, key="k").value for _ in range(3)] == ["one"] * 3
    rig.ask(Set, key="k", value="two", seq=2)
    second = rig.ask(Get, key="k")
    assert second.value == "two"
    rig.service.set("k", "three", "guest")
    third = rig.ask(Get, key="k")
    assert (third.value, third.origin) == ("three", "guest") and third.ts >= second.ts
    rig.ask(Delete, key="k", seq=3)
    assert rig.ask(Get, key="k").code == "not_found"
    assert rig.link._replies.size == 0  # the deleted value is not kept


def test_a_ping_that_ends_a_frame_begun_earlier_should_not_be_answered_as_a_ping(rig):
    rig.hello()
    rig.host.send(b'{"t":"set","id":7,"key":"k","value":"')
    rig.settle(lambda: rig.link._frames.buffered > 0, what="the partial frame read")
    rig.host.send(b'{"t":"ping","id":8}\n')  # ends the set: a frame that is not JSON
    rig.settle(lambda: rig.link.bad_frames == 1, what="the bad frame")
    rig.host.send(b'{"t":"set","id":9,"key":"k","value":"')
    rig.settle(lambda: rig.link._frames.buffered > 0, what="the partial frame read")
    rig.host.send(b'\xff{"t":"ping","id":10}\n')  # a RESYNC drops the partial frame
    assert type(rig.ask(Ping)) is Ok
    assert sorted(m.id for m in rig.host.pending if type(m) in (Ok, Err)) == [10]
    assert rig.link.bad_frames == 1
