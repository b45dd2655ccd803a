"""FrameDecoder: any chunking gives the same events, RESYNC drops partial frames, memory stays
bounded.

The decoder is checked against a byte-at-a-time model written from docs/protocol.md, so a test
fails when the two disagree on any stream, not only on streams someone thought of.
"""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ovmproto.codec import Reader, encode
from ovmproto.errors import FrameTooLong
from ovmproto.framing import DELIMITER, RESYNC, FrameDecoder, Resync
from ovmproto.limits import FRAME_MAX
from ovmproto.messages import Ping, Set

SMALL_MAX = 64  # a small limit makes over-long frames cheap to generate


def model(stream, max_frame):
    """What the decoder must report for ``stream``: the protocol's rules applied one byte at a
    time."""
    events = []
    cur = bytearray()
    for b in stream:
        if b == RESYNC[0]:
            if len(cur) > max_frame:
                events.append(("too_long", len(cur)))
            events.append(("resync", len(cur)))
            cur.clear()
        elif b == DELIMITER[0]:
            if len(cur) > max_frame:
                events.append(("too_long", len(cur)))
            elif bytes(cur).strip():
                events.append(("frame", bytes(cur)))
            cur.clear()
        else:
            cur.append(b)
    buffered = len(cur) if len(cur) <= max_frame else 0
    return events, buffered


def normalized(items):
    out = []
    for item in items:
        if type(item) is bytes:
            out.append(("frame", item))
        elif type(item) is Resync:
            out.append(("resync", item.dropped))
        elif type(item) is FrameTooLong:
            out.append(("too_long", item.size))
        else:
            raise AssertionError("unexpected event %r" % (item,))
    return out


def feed_chunks(decoder, chunks):
    """Feed every chunk; return the events and check the buffer bound after every feed."""
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
        assert decoder.buffered <= decoder.max_frame
    return out


def split_at(data, points):
    points = sorted({p for p in points if 0 < p < len(data)})
    edges = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def every_chunking(data, rng):
    """One byte at a time, 4096-byte reads, all in one read, and random split points."""
    yield [data[i : i + 1] for i in range(len(data))]
    yield [data[i : i + 4096] for i in range(0, len(data), 4096)]
    yield [data]
    for _ in range(3):
        yield split_at(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(8))])


# Streams rich in the bytes that matter: delimiters, RESYNC, whitespace, and runs long enough to
# go over SMALL_MAX.
_piece = st.one_of(
    st.sampled_from([b"\n", b"\xff", b" ", b"\r\n", b"{}", b"\t"]),
    st.binary(max_size=20),
    st.integers(min_value=SMALL_MAX - 2, max_value=SMALL_MAX + 40).map(lambda n: b"x" * n),
)
streams = st.lists(_piece, max_size=40).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(stream=streams, points=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_it_should_report_what_the_model_reports_for_any_stream_and_any_chunking(stream, points):
    expected, expected_buffered = model(stream, SMALL_MAX)
    for chunks in (
        [stream],
        [stream[i : i + 1] for i in range(len(stream))],
        split_at(stream, points),
    ):
        d = FrameDecoder(SMALL_MAX)
        assert normalized(feed_chunks(d, chunks)) == expected
        assert d.buffered == expected_buffered


def test_it_should_give_the_same_frames_for_every_chunking_of_many_frames():
    rng = random.Random(1234)
    msgs = [Set(id=i, key="k%d" % i, value="v" * rng.randrange(3000), seq=i) for i in range(300)]
    data = b"".join(encode(m) for m in msgs)
    expected = [encode(m)[:-1] for m in msgs]
    for chunks in every_chunking(data, rng):
        assert b"".join(chunks) == data
        assert feed_chunks(FrameDecoder(), chunks) == expected


def test_it_should_join_a_frame_split_across_4096_byte_reads():
    # The real port returns at most 4096 bytes per read: 10,000 bytes arrive as 4096+4096+1808.
    # A legal Set (a value of 1,660 control characters, 6 bytes each once escaped) of 10,000 bytes.
    frame = encode(Set(id=1, key="k", value="\x01" * 1660))
    assert len(frame) == 10000
    d = FrameDecoder()
    assert d.feed(frame[:4096]) == []
    assert d.buffered == 4096
    assert d.feed(frame[4096:8192]) == []
    assert d.feed(frame[8192:]) == [frame[:-1]]
    assert d.buffered == 0


def test_it_should_drop_the_partial_frame_at_a_resync_and_count_its_bytes():
    d = FrameDecoder()
    partial = b'{"t":"set","id":3,"key":"k","va'
    good = encode(Ping(id=4))
    assert d.feed(partial) == []
    assert d.feed(RESYNC + good) == [Resync(dropped=len(partial)), good[:-1]]
    assert d.buffered == 0


def test_it_should_report_a_resync_with_nothing_dropped_between_whole_frames():
    a, b = encode(Ping(id=1)), encode(Ping(id=2))
    assert FrameDecoder().feed(RESYNC + a + RESYNC + RESYNC + b) == [
        Resync(0),
        a[:-1],
        Resync(0),
        Resync(0),
        b[:-1],
    ]


def test_it_should_resync_anywhere_inside_a_frame_and_keep_the_next_frame_intact():
    stale = encode(Set(id=9, key="stale", value="old value"))
    good = encode(Ping(id=10))
    for cut in range(len(stale)):
        for chunks in (
            [stale[:cut] + RESYNC + good],
            [stale[:cut], RESYNC, good],
            [stale[:cut], RESYNC + good[:5], good[5:]],
        ):
            events = feed_chunks(FrameDecoder(), chunks)
            assert events == [Resync(dropped=cut), good[:-1]], (cut, chunks)


def test_it_should_skip_blank_frames():
    good = encode(Ping(id=1))
    assert FrameDecoder().feed(b"\n\r\n  \t\n" + good + b"\n") == [good[:-1]]


def test_it_should_forget_partial_input_on_reset():
    d = FrameDecoder()
    d.feed(b'{"t":"pi')
    d.reset()
    assert d.buffered == 0
    assert d.feed(b'ng","id":1}\n') == [b'ng","id":1}']


def test_it_should_accept_a_frame_of_exactly_frame_max_bytes():
    frame = padded_ping(FRAME_MAX)
    for chunks in ([frame + b"\n"], [frame, b"\n"], [frame[:4096], frame[4096:] + b"\n"]):
        events = feed_chunks(FrameDecoder(), chunks)
        assert events == [frame]
    assert list(Reader().feed(frame + b"\n")) == [Ping(id=1)]


def test_it_should_discard_a_frame_one_byte_over_frame_max_and_decode_the_next():
    frame = padded_ping(FRAME_MAX + 1)
    good = encode(Ping(id=2))
    rng = random.Random(7)
    for chunks in every_chunking(frame + b"\n" + good, rng):
        if len(chunks) > 20000:
            continue  # byte-at-a-time over 64 KiB is covered by the model test at a small limit
        events = feed_chunks(FrameDecoder(), chunks)
        assert normalized(events) == [("too_long", FRAME_MAX + 1), ("frame", good[:-1])]
    too_long = FrameDecoder().feed(frame + b"\n")[0]
    assert too_long.limit == FRAME_MAX
    assert too_long.code == "frame_too_long"


def test_it_should_never_buffer_more_than_frame_max_when_fed_10_mb_without_a_newline():
    size = 10 * 1024 * 1024
    good = encode(Ping(id=3))
    for read_size in (4096, size):
        d = FrameDecoder()
        events = []
        block = b"a" * read_size
        for _ in range(size // read_size):
            events.extend(d.feed(block))
            assert d.buffered <= FRAME_MAX
        assert events == []
        events.extend(d.feed(b"\n" + good))
        assert normalized(events) == [("too_long", size), ("frame", good[:-1])]
        assert d.buffered == 0


def test_it_should_report_an_over_long_partial_frame_once_when_a_resync_cuts_it():
    d = FrameDecoder(SMALL_MAX)
    good = encode(Ping(id=1))
    events = d.feed(b"y" * (SMALL_MAX + 10))
    events += d.feed(b"y" * 5 + RESYNC + good)
    assert normalized(events) == [
        ("too_long", SMALL_MAX + 15),
        ("resync", SMALL_MAX + 15),
        ("frame", good[:-1]),
    ]


def padded_ping(size):
    """A valid Ping frame (no delimiter) of exactly ``size`` bytes, padded with an unknown field."""
    head, tail = b'{"t":"ping","id":1,"pad":"', b'"}'
    frame = head + b"p" * (size - len(head) - len(tail)) + tail
    assert len(frame) == size
    return frame


def test_in_frame_should_say_whether_an_unfinished_frame_was_read_even_one_being_discarded():
    d = FrameDecoder(max_frame=SMALL_MAX)
    assert not d.in_frame
    d.feed(b'{"t":"pi')
    assert d.in_frame
    d.feed(b'ng","id":1}\n')
    assert not d.in_frame
    d.feed(b"x" * (SMALL_MAX + 10))  # over the limit: dropped as it comes, still unfinished
    assert d.in_frame and d.buffered == 0
    d.feed(b"\n")
    assert not d.in_frame
    r = Reader()
    r.feed(b'{"t":')
    assert r.in_frame
    r.feed(RESYNC)
    assert not r.in_frame
