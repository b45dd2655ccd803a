"""guestagent.client: framing, reply matching and error mapping, against a scripted test peer on a
real unix socket (the daemon's own behaviour is tested with the real daemon in test_cli_daemon.py).
"""

import json
import os
import socket
import threading

import pytest

from guestagent.client import (
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Client,
    DaemonError,
    Unreachable,
)

WAIT = 10.0  # generous: the machine is shared


class ScriptedPeer:
    """A unix socket server that reads one request frame per turn and answers with raw bytes.

    ``script(request_dict) -> bytes`` decides what to send back (b"" sends nothing); None as the
    script means: close the connection at once after accepting. Requests are recorded as bytes.
    """

    def __init__(self, path, script, greeting=b""):
        self.path = path
        self.script = script
        self.greeting = greeting
        self.frames = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(WAIT)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            if self.greeting:
                conn.sendall(self.greeting)
            if self.script is None:
                return
            buf = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    frame, buf = buf.split(b"\n", 1)
                    self.frames.append(frame)
                    answer = self.script(json.loads(frame))
                    if answer:
                        try:
                            conn.sendall(answer)
                        except OSError:
                            return

    def close(self):
        self.listener.close()
        self.thread.join(WAIT)


def frame(obj):
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ovmd.sock")


@pytest.fixture
def peer(sock_path):
    peers = []

    def start(script, greeting=b""):
        p = ScriptedPeer(sock_path, script, greeting)
        peers.append(p)
        return p

    yield start
    for p in peers:
        p.close()


def test_it_should_send_one_compact_frame_and_return_the_matching_ok(peer, sock_path):
    p = peer(
        lambda req: frame(
            {"t": "ok", "id": req["id"], "key": "k", "value": "v", "ts": 1.5, "origin": "guest"}
        )
    )
    with Client(sock_path) as c:
        reply = c.call("get", key="k")
    assert reply["value"] == "v"
    assert p.frames == [b'{"t":"get","id":1,"key":"k"}']


def test_it_should_send_non_ascii_as_utf8_not_escapes(peer, sock_path):
    p = peer(lambda req: frame({"t": "ok", "id": req["id"]}))
    with Client(sock_path) as c:
        c.call("put", items=[["clé", "värde ✓"]])
    assert p.frames == ['{"t":"put","id":1,"items":[["clé","värde ✓"]]}'.encode()]


def test_it_should_number_requests_and_skip_replies_to_other_ids(peer, sock_path):
    def script(req):
        # a stale reply and a notification first, then ours in two pieces
        ours = frame({"t": "ok", "id": req["id"], "found": True})
        return frame({"t": "ok", "id": 999}) + frame({"t": "changed", "gseq": 3}) + ours

    peer(script)
    with Client(sock_path) as c:
        assert c.call("del", key="a")["id"] == 1
        assert c.call("del", key="b")["id"] == 2


def test_it_should_reassemble_a_reply_that_arrives_byte_by_byte(tmp_path, sock_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    value = "x" * 5000 + "é"

    def serve():
        conn, _ = listener.accept()
        with conn:
            req = json.loads(conn.makefile("rb").readline())
            for b in frame({"t": "ok", "id": req["id"], "value": value}):
                conn.sendall(bytes([b]))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with Client(sock_path) as c:
            assert c.call("get", key="k")["value"] == value
    finally:
        t.join(WAIT)
        listener.close()


def test_it_should_collect_items_in_order_until_ok(peer, sock_path):
    def script(req):
        rid = req["id"]
        return b"".join(
            frame(
                {
                    "t": "item",
                    "id": rid,
                    "key": "k%d" % i,
                    "value": str(i),
                    "ts": 1.0,
                    "origin": "host",
                }
            )
            for i in range(50)
        ) + frame({"t": "ok", "id": rid, "count": 50})

    peer(script)
    with Client(sock_path) as c:
        items = c.collect("list")
    assert [i["key"] for i in items] == ["k%d" % i for i in range(50)]


def test_it_should_drop_a_partial_frame_before_a_resync_byte(peer, sock_path):
    peer(
        lambda req: (
            b'{"t":"ok","id":77,"stale'
            + b"\xff"
            + frame({"t": "ok", "id": req["id"], "value": "fresh"})
        )
    )
    with Client(sock_path) as c:
        assert c.call("get", key="k")["value"] == "fresh"


@pytest.mark.parametrize(
    "code, exit_code",
    [
        ("not_found", EXIT_NOT_FOUND),
        ("timeout", EXIT_NOT_FOUND),
        ("key_too_long", EXIT_USAGE),
        ("invalid_key", EXIT_USAGE),
        ("quota", EXIT_REFUSED),
        ("denied", EXIT_REFUSED),
        ("internal", EXIT_REFUSED),
        ("something_new", EXIT_REFUSED),
    ],
)
def test_it_should_map_err_codes_to_exit_codes(peer, sock_path, code, exit_code):
    peer(lambda req: frame({"t": "err", "id": req["id"], "code": code, "msg": "because\nreasons"}))
    with Client(sock_path) as c:
        with pytest.raises(DaemonError) as ei:
            c.call("get", key="k")
    assert ei.value.code == code
    assert ei.value.exit_code == exit_code
    assert str(ei.value) == "because reasons"  # one line


def test_it_should_take_an_err_without_id_as_the_answer(peer, sock_path):
    peer(lambda req: frame({"t": "err", "code": "bad_request", "msg": "field 'key' is missing"}))
    with Client(sock_path) as c:
        with pytest.raises(DaemonError) as ei:
            c.call("get")
    assert ei.value.exit_code == EXIT_USAGE


def test_it_should_read_the_denial_the_daemon_sent_before_hanging_up(peer, sock_path):
    p = peer(None, greeting=frame({"t": "err", "code": "denied", "msg": "uid 1000 is not allowed"}))
    with Client(sock_path) as c:
        p.thread.join(WAIT)  # the peer has written its err and closed before we send anything
        assert not p.thread.is_alive()
        with pytest.raises(DaemonError) as ei:
            c.call("get", key="k")
    assert ei.value.code == "denied"
    assert ei.value.exit_code == EXIT_REFUSED


def test_it_should_report_a_missing_socket_as_unreachable(tmp_path):
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(Unreachable) as ei:
        Client(path).connect()
    assert ei.value.exit_code == EXIT_UNREACHABLE
    assert str(ei.value) == ("cannot reach the ovmd daemon at %s: No such file or directory" % path)


def test_it_should_report_a_refused_connection_as_unreachable(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)  # bound, never listening: connect() is refused
    try:
        with pytest.raises(Unreachable) as ei:
            Client(sock_path).connect()
    finally:
        s.close()
    assert str(ei.value).endswith(": Connection refused")


def test_it_should_report_a_hangup_without_answer_as_unreachable(peer, sock_path):
    peer(lambda req: None)  # reads the request, answers nothing, then the test closes it
    c = Client(sock_path)
    c.connect()
    try:
        c._sock.shutdown(socket.SHUT_WR)  # peer sees EOF and hangs up
        with pytest.raises(Unreachable) as ei:
            c._read_frame()
    finally:
        c.close()
    assert "closed the connection without answering" in str(ei.value)


def test_it_should_give_up_on_a_silent_daemon_after_its_timeout(peer, sock_path):
    peer(lambda req: b"")
    with Client(sock_path, timeout=0.2) as c:
        with pytest.raises(Unreachable) as ei:
            c.call("ping")
    assert str(ei.value) == "the ovmd daemon at %s did not answer within 0.2 s" % sock_path


@pytest.mark.parametrize(
    "garbage, what",
    [
        (b"HTTP/1.1 400 Bad Request\n", "not JSON"),
        (b"[1,2]\n", "not a JSON object"),
        (b"x" * 70000, "over 65536 bytes"),
    ],
)
def test_it_should_refuse_a_peer_that_does_not_speak_the_protocol(peer, sock_path, garbage, what):
    peer(lambda req: garbage)
    with Client(sock_path) as c:
        with pytest.raises(Unreachable) as ei:
            c.call("ping")
    assert what in str(ei.value)
    assert ei.value.exit_code == EXIT_UNREACHABLE


def test_it_should_not_leak_the_socket_when_connect_fails(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(Unreachable):
            Client(str(tmp_path / "none.sock")).connect()
    assert len(os.listdir("/proc/self/fd")) == before
