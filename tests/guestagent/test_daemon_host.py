"""The real daemon, seen from the host side of a real raw pty."""

import os

import pytest

from ovmproto.handshake import Handshake
from ovmproto.limits import EVENT_KEY, KEY_MAX, VALUE_MAX
from ovmproto.messages import Delete, Err, Events, Get, List, Ok, Ping, Set
from tests.guestagent.harness import Daemon, Host


@pytest.fixture(scope="module")
def guest():
    with Host() as host, Daemon(channel=host.link) as daemon:
        daemon.wait_ready()
        yield daemon, host


@pytest.fixture
def host(guest):
    """The host, synced on a fresh epoch (so seq starts at 1 in every test)."""
    _daemon, host = guest
    host.drain(0.05)
    host.changed[:] = []
    h = host.hello(epoch="epoch-" + os.urandom(4).hex())
    assert h.hseq == 0
    host.last_hello = h
    return host


def test_hello_should_ignore_stale_garbage_before_the_resync(guest):
    _daemon, host = guest
    # A partial frame and a whole stale request, as an earlier host connection may leave them.
    h = host.hello(epoch="e-garbage", garbage=b'{"t":"set","id":99,"key":"stale","val')
    assert h.agent.startswith("ovmd ")
    assert len(h.gid) >= 8
    assert host.request(Get, key="stale").code == "not_found"


def test_replies_before_the_hello_reply_should_never_be_taken(guest):
    _daemon, host = guest
    host.drain(0.05)
    # A ping with the same id as the hello, sent just before it: its reply must not count.
    host.send(Ping(id=4242))
    hs = Handshake(4242, "nonce-x", "e-x")
    host.send(hs.opening())
    first = host.take(lambda m: type(m) is Ok and m.id == 4242)
    assert hs.accept(first) is None  # the ping's ok: no nonce
    second = host.take(lambda m: type(m) is Ok and m.id == 4242)
    assert hs.accept(second).epoch == "e-x"  # the real reply, after the guest's RESYNC


def test_host_set_get_list_del_with_seq_and_dup(host):
    assert host.request(Set, key="a", value="1", seq=1).seq == 1
    assert host.request(Set, key="b", value="2", seq=2).dup is None
    dup = host.request(Set, key="a", value="changed", seq=1)
    assert (type(dup), dup.dup, dup.seq) == (Ok, True, 1)
    got = host.request(Get, key="a")
    assert (got.value, got.origin) == ("1", "host")
    items, done = host.listing(List)
    assert {(i.key, i.value) for i in items} >= {("a", "1"), ("b", "2")}
    assert done.count == len(items)
    d = host.request(Delete, key="a", seq=3)
    assert (d.found, d.dup) == (True, None)
    assert host.request(Delete, key="a", seq=3).dup is True
    assert host.request(Get, key="a").code == "not_found"
    assert host.hello(epoch=host.last_hello.epoch).hseq == 3


def test_host_changes_should_be_announced_with_consecutive_gseq(host):
    g0 = host.last_hello.gseq
    host.request(Set, key="c1", value="x", seq=1)
    host.request(Delete, key="c1", seq=2)
    changed = host.wait_changed(2)
    assert [(c.op, c.key, c.origin, c.gseq) for c in changed] == [
        ("set", "c1", "host", g0 + 1),
        ("del", "c1", "host", g0 + 2),
    ]
    assert changed[0].value == "x"


def test_a_vmapievent_should_reach_local_clients_as_an_event(guest, host):
    daemon, _ = guest
    assert type(host.request(Set, key=EVENT_KEY, value="shutdown-soon", seq=1)) is Ok
    assert host.request(Get, key=EVENT_KEY).code == "not_found"
    with daemon.client() as c:
        items, done = c.listing(Events)
    assert items[-1].value == "shutdown-soon" and items[-1].key == EVENT_KEY
    assert done.count == len(items)


@pytest.mark.parametrize(
    "key_size, value_size, code",
    [
        (KEY_MAX, VALUE_MAX, None),
        (KEY_MAX + 1, 1, "key_too_long"),
        (1, VALUE_MAX + 1, "value_too_long"),
    ],
)
def test_limits_should_hold_at_exactly_the_limit_and_refuse_one_byte_over(
    host, key_size, value_size, code
):
    key = "k" * key_size
    value = "v" * value_size
    reply = host.request(Set, key=key, value=value, seq=1)
    if code is None:
        assert type(reply) is Ok
        assert host.request(Get, key=key).value == value
        host.request(Delete, key=key, seq=2)
    else:
        assert (type(reply), reply.code) == (Err, code)
        assert str(key_size if code == "key_too_long" else value_size) in reply.msg
        assert host.request(Get, key=key).code == "not_found"
        # A refused set does not consume its seq: the host may send it again fixed.
        assert type(host.request(Set, key="fixed", value="ok", seq=1)) is Ok


def test_unicode_keys_and_values_should_round_trip(host):
    key = "clé.ключ.鍵.🔑"
    value = 'välue ✓ 値 \u2028 "quoted" \\ \t tab \U0001f600'
    assert type(host.request(Set, key=key, value=value, seq=1)) is Ok
    got = host.request(Get, key=key)
    assert (got.key, got.value) == (key, value)
    # 64 four-byte characters are exactly 256 bytes; one more is over.
    assert type(host.request(Set, key="😀" * 64, value="x", seq=2)) is Ok
    assert host.request(Set, key="😀" * 65, value="x", seq=3).code == "key_too_long"


def test_bad_frames_should_get_err_only_with_a_usable_id(host):
    host.send(b'\x80\x81garbage\n{"t":"get","id":17}\n{"no":"type","id":18}\n')
    r17 = host.reply(17)
    r18 = host.reply(18)
    assert (r17.code, r18.code) == ("bad_request", "bad_request")
    assert type(host.request(Ping)) is Ok
    assert not any(type(m) is Err and m.id is None for m in host.pending)


def test_it_should_serve_the_host_with_the_standard_library_when_orjson_is_not_installed(tmp_path):
    # Debian and RHEL package no orjson: a guest installed from a distribution package runs the
    # fallback in ovmproto.jsonlib. A module named orjson that fails to import stands for that.
    (tmp_path / "orjson.py").write_text("raise ImportError('not installed in this guest')\n")
    with Host() as host, Daemon(channel=host.link, pythonpath=[str(tmp_path)]) as daemon:
        daemon.wait_ready()
        host.hello(epoch="no-orjson")
        value = 'pässwörd \x00\x1b[31m\n"\\ ' + "€" * 2000
        assert host.request(Set, key="ключ", value=value, seq=1).seq == 1
        got = host.request(Get, key="ключ")
        assert (got.value, got.origin) == (value, "host")
        assert (
            host.request(Set, key="k", value="v" * (VALUE_MAX + 1), seq=2).code == "value_too_long"
        )
        daemon.stop()
        assert "JSON by json" in daemon.log()
