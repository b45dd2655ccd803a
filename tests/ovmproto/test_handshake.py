"""The resynchronizing handshake: one side at a time, then both sides through Readers (as h11's
tests push bytes through two protocol objects), with stale bytes and garbage on the wire."""

import random

import pytest

from ovmproto import MIN_VERSION, PROTOCOL_VERSION
from ovmproto.codec import Reader, decode, encode
from ovmproto.errors import RemoteError
from ovmproto.framing import RESYNC, Resync
from ovmproto.handshake import Handshake, HelloResult, answer_hello
from ovmproto.messages import Changed, Err, Hello, Item, Ok, Ping, Set

GUEST = {"agent": "ovmd 0.1.0", "gid": "g-1", "gseq": 41, "epoch": "E1", "hseq": 7}


def reply(**overrides):
    fields = {
        "id": 5,
        "v": 1,
        "nonce": "n0nce",
        "agent": "ovmd 0.1.0",
        "gid": "g-1",
        "gseq": 41,
        "epoch": "E1",
        "hseq": 7,
    }
    fields.update(overrides)
    return Ok(**fields)


# ---- host side -------------------------------------------------------------------------------


def test_opening_should_be_a_resync_byte_then_exactly_one_hello_frame():
    data = Handshake(request_id=5, nonce="n0nce", epoch="E1").opening()
    assert data[:1] == RESYNC == b"\xff"
    assert RESYNC not in data[1:]
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert decode(data[1:-1]) == Hello(id=5, v=PROTOCOL_VERSION, nonce="n0nce", epoch="E1")


def test_opening_without_an_epoch_should_leave_it_out():
    data = Handshake(request_id=1, nonce="n").opening()
    assert b"epoch" not in data
    assert decode(data[1:-1]) == Hello(id=1, v=PROTOCOL_VERSION, nonce="n")


def test_accept_should_return_the_guest_state_for_the_reply_with_our_id_and_nonce():
    result = Handshake(request_id=5, nonce="n0nce", epoch="E1").accept(reply())
    assert isinstance(result, HelloResult)
    assert (result.version, result.agent, result.gid, result.gseq, result.epoch, result.hseq) == (
        1,
        "ovmd 0.1.0",
        "g-1",
        41,
        "E1",
        7,
    )


@pytest.mark.parametrize(
    "stale",
    [
        reply(nonce="old-nonce"),  # a reply to an earlier hello with the same id
        reply(id=4),  # a reply to an earlier hello with our nonce (!)
        reply(id=4, nonce="old-nonce"),
        Ok(id=5),  # a reply to some other request with our id
        Err(id=4, code="bad_request", msg="x"),  # an error for another request
        Err(code="bad_frame", msg="x"),  # an error with no id
        Item(id=5, key="k", value="v", ts=1.0, origin="host"),
        Changed(gseq=3, op="clear", ts=1.0, origin="guest"),
        Ping(id=5),
        Hello(id=5, v=1, nonce="n0nce"),  # our own hello echoed back by a loop
        Resync(3),
        None,
    ],
)
def test_accept_should_ignore_everything_but_the_reply_to_this_hello(stale):
    assert Handshake(request_id=5, nonce="n0nce").accept(stale) is None


def test_accept_should_raise_remote_error_when_the_guest_refuses_our_hello():
    hs = Handshake(request_id=5, nonce="n0nce")
    with pytest.raises(RemoteError) as info:
        hs.accept(Err(id=5, code="unsupported_version", msg="host speaks protocol 0"))
    assert info.value.code == "unsupported_version"
    assert "host speaks protocol 0" in info.value.message


def test_accept_should_refuse_a_version_we_do_not_speak():
    hs = Handshake(request_id=5, nonce="n0nce", version=1)
    with pytest.raises(RemoteError) as info:
        hs.accept(reply(v=2))
    assert info.value.code == "unsupported_version"
    with pytest.raises(RemoteError):
        hs.accept(reply(v=MIN_VERSION - 1))


def test_accept_should_take_a_reply_without_v_as_the_lowest_version():
    assert (
        Handshake(request_id=5, nonce="n0nce").accept(Ok(id=5, nonce="n0nce")).version
        == MIN_VERSION
    )


def test_accept_should_default_missing_guest_fields():
    result = Handshake(request_id=5, nonce="n0nce").accept(Ok(id=5, nonce="n0nce", v=1))
    assert (result.agent, result.gid, result.gseq, result.epoch, result.hseq) == (
        "",
        "",
        0,
        None,
        0,
    )
    assert "HelloResult(v=1" in repr(result)


# ---- guest side ------------------------------------------------------------------------------


def test_answer_hello_should_be_a_resync_byte_then_the_ok_echoing_id_and_nonce():
    data = answer_hello(Hello(id=9, v=1, nonce="abc", epoch="E1"), **GUEST)
    assert data[:1] == RESYNC
    assert RESYNC not in data[1:]
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert decode(data[1:-1]) == Ok(id=9, v=1, nonce="abc", **GUEST)


def test_answer_hello_should_negotiate_down_to_the_version_this_agent_speaks():
    newer_host = Hello(id=1, v=2, nonce="n")
    assert decode(answer_hello(newer_host, **GUEST)[1:-1]).v == 1
    assert decode(answer_hello(newer_host, max_version=2, **GUEST)[1:-1]).v == 2
    assert decode(answer_hello(Hello(id=1, v=1, nonce="n"), max_version=2, **GUEST)[1:-1]).v == 1


def test_answer_hello_should_refuse_a_version_below_the_lowest_it_speaks():
    data = answer_hello(Hello(id=3, v=MIN_VERSION - 1, nonce="n"), **GUEST)
    assert data[:1] == RESYNC
    err = decode(data[1:-1])
    assert type(err) is Err
    assert (err.id, err.code) == (3, "unsupported_version")


# ---- both sides --------------------------------------------------------------------------------


class Guest:
    """The guest's half, as the agent will run it: a Reader, and an answer for every hello."""

    def __init__(self, max_version=PROTOCOL_VERSION):
        self.reader = Reader()
        self.max_version = max_version
        self.seen = []

    def receive(self, data):
        out = b""
        for event in self.reader.feed(data):
            self.seen.append(event)
            if type(event) is Hello:
                out += answer_hello(event, max_version=self.max_version, **GUEST)
        return out


def chunked(data, rng):
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 17, 4096])
        yield data[i : i + n]
        i += n


def host_receive(hs, reader, data, rng):
    """Feed ``data`` to the host in random chunks; return the first HelloResult, or None."""
    for chunk in chunked(data, rng):
        for event in reader.feed(chunk):
            result = hs.accept(event)
            if result is not None:
                return result
    return None


CUT_TO_GUEST = b'{"t":"set","id":3,"key":"com.example.pw","value":"half of a sec'
STALE_TO_GUEST = b"\x00\x00junk\n" + CUT_TO_GUEST  # garbage, then a cut frame
CUT_TO_HOST = b'{"t":"item","id":2,"key":"k","val'
STALE_TO_HOST = (
    encode(reply(nonce="from-the-last-connection", gid="stale", hseq=1))  # stale reply
    + b"\r\n}{ not json\n"
    + b"\xc3\x28\n"  # garbage
    + CUT_TO_HOST
)  # a cut frame


@pytest.mark.parametrize("seed", range(20))
def test_host_and_guest_should_sync_through_stale_bytes_and_garbage(seed):
    rng = random.Random(seed)
    hs = Handshake(request_id=5, nonce="n0nce-%d" % seed, epoch="E1")
    guest, host_reader = Guest(), Reader()

    # Host -> guest: stale bytes QEMU kept from the last connection, then the opening.
    to_host = b"".join(
        guest.receive(chunk) for chunk in chunked(STALE_TO_GUEST + hs.opening(), rng)
    )
    hellos = [e for e in guest.seen if type(e) is Hello]
    assert hellos == [Hello(id=5, v=1, nonce="n0nce-%d" % seed, epoch="E1")]
    assert [type(e).__name__ for e in guest.seen] == ["BadFrame", "Resync", "Hello"]
    assert guest.seen[1] == Resync(dropped=len(CUT_TO_GUEST))

    # Guest -> host: stale bytes first, then garbage, then the real answer.
    assert to_host[:1] == RESYNC
    result = host_receive(hs, host_reader, STALE_TO_HOST + to_host, rng)
    assert result is not None
    assert host_reader.buffered == 0
    assert (result.version, result.gid, result.gseq, result.epoch, result.hseq) == (
        1,
        "g-1",
        41,
        "E1",
        7,
    )


def test_the_guest_should_drop_a_stale_partial_frame_in_front_of_the_hello():
    hs = Handshake(request_id=8, nonce="n")
    guest = Guest()
    guest.receive(b'{"t":"set","id":3,"key":"a","value":"b"}\n{"t":"del","id":4,"ke')
    guest.receive(hs.opening())
    assert guest.seen == [
        Set(id=3, key="a", value="b"),
        Resync(dropped=len(b'{"t":"del","id":4,"ke')),
        Hello(id=8, v=1, nonce="n"),
    ]


def test_the_host_should_drop_a_stale_partial_reply_in_front_of_the_answer():
    hs = Handshake(request_id=8, nonce="n")
    answer = Guest().receive(hs.opening())
    host_reader = Reader()
    # Without the guest's RESYNC these bytes would join the answer and spoil it.
    assert host_reader.feed(b'{"t":"ok","id":8,"nonce":"') == []
    events = host_reader.feed(answer)
    assert type(events[0]) is Resync and events[0].dropped == len(b'{"t":"ok","id":8,"nonce":"')
    assert hs.accept(events[1]).version == 1


def test_a_newer_host_should_sync_with_an_older_guest_at_the_older_version():
    hs = Handshake(request_id=2, nonce="n", version=2)
    guest = Guest(max_version=1)
    answer = guest.receive(hs.opening())
    assert next(e for e in guest.seen if type(e) is Hello).v == 2
    result = None
    for event in Reader().feed(answer):
        result = result or hs.accept(event)
    assert result.version == 1


def test_a_host_below_the_guests_lowest_version_should_get_remote_error():
    hs = Handshake(request_id=2, nonce="n", version=0)
    answer = Guest().receive(hs.opening())
    with pytest.raises(RemoteError) as info:
        for event in Reader().feed(answer):
            hs.accept(event)
    assert info.value.code == "unsupported_version"


def test_a_second_handshake_should_ignore_the_answer_to_the_first():
    # The host timed out and sent a new hello; the guest's late answer to the first one arrives.
    first = Handshake(request_id=1, nonce="first")
    second = Handshake(request_id=2, nonce="second")
    guest = Guest()
    late = guest.receive(first.opening())
    fresh = guest.receive(second.opening())
    reader = Reader()
    results = [second.accept(e) for e in reader.feed(late + fresh)]
    assert results[:2] == [None, None]  # Resync, then the late Ok of the first
    assert next(r for r in results if r is not None).version == 1
