"""hostbridge.apiclient's send: an idempotency key on every attempt, and another attempt (the same
key) after a connection that failed, was reset or brought back a bad answer. Against a real unix
socket served by the test, which cuts the connections it is told to."""

import os
import socket
import subprocess
import sys
import threading

import pytest

from hostbridge import apiclient
from hostbridge.apiclient import ApiError, Client

VMMESSAGE = os.path.join(os.path.dirname(sys.executable), "vmmessage")
ANSWER = b'{"vm":"vm1","key":"k","outcome":"delivered","seq":7,"replayed":true}'

pytestmark = pytest.mark.timeout(60)


class CuttingBridge:
    """Serves ``path``: reads each request whole, closes the first ``cut`` connections without a
    word (as a bridge killed after it committed the message), answers the others with ANSWER.
    ``requests``: each request's headers (lower-case names), in order. At most 20 connections."""

    def __init__(self, path, cut):
        self.path = path
        self.cut = cut
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for _ in range(20):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self.requests.append(self._read(conn))
                if len(self.requests) > self.cut:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(ANSWER), ANSWER)
                    )

    @staticmethod
    def _read(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        while len(body) < int(headers.get("content-length", 0)):
            body += conn.recv(65536)
        return headers

    def keys(self):
        return [r.get("idempotency-key") for r in self.requests]

    def close(self):
        """Stop listening (the socket file stays: connecting is then refused)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def cutting(short_dir):
    servers = []

    def make(cut):
        servers.append(CuttingBridge(os.path.join(short_dir, "api.sock"), cut))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(apiclient, "SEND_RETRY_DELAYS", (0.01, 0.01, 0.01, 0.01))


def test_a_send_cut_off_should_be_sent_again_with_the_same_random_key(cutting, quick_retries):
    bridge = cutting(cut=2)
    doc = Client(bridge.path, timeout=20).send("vm1", "k", "v")
    assert doc["outcome"] == "delivered" and doc["seq"] == 7
    first, *others = bridge.keys()
    assert len(others) == 2 and others == [first, first]
    assert len(first) == 32 and int(first, 16) >= 0  # 128 random bits, in hex
    assert Client(bridge.path).send("vm1", "k", "v") and bridge.keys()[-1] != first


def test_a_send_should_give_up_after_five_attempts_and_name_its_key_to_retry_with(
    cutting, quick_retries
):
    bridge = cutting(cut=99)
    with pytest.raises(ApiError) as e:
        Client(bridge.path, timeout=20).send("vm1", "k", "v", idempotency_key="mine-1")
    assert bridge.keys() == ["mine-1"] * 5
    assert e.value.code == "unreachable" and apiclient.exit_code(e.value.code) == 3
    assert "(5 attempts; the message may have been queued: send it again with --id mine-1" in (
        e.value.message
    )


def test_a_send_should_not_retry_when_no_bridge_is_there(short_dir, quick_retries):
    with pytest.raises(ApiError) as e:
        Client(os.path.join(short_dir, "none.sock")).send("vm1", "k", "v")
    assert e.value.message.endswith("No such file or directory")  # one attempt, nothing sent


def test_a_send_refused_then_cut_should_still_say_it_may_have_been_queued(short_dir, quick_retries):
    # The first attempt reached a bridge that died; the next ones find its socket file unserved.
    bridge = CuttingBridge(os.path.join(short_dir, "api.sock"), cut=99)
    client = Client(bridge.path, timeout=20)
    real = client.request
    calls = []

    def request(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            bridge.close()
        return real(*args, **kwargs)

    client.request = request
    with pytest.raises(ApiError) as e:
        client.send("vm1", "k", "v", idempotency_key="k2")
    assert len(calls) == 5 and bridge.keys() == ["k2"]
    assert "Connection refused (5 attempts; the message may have been queued" in e.value.message


def test_vmmessage_send_should_retry_by_itself_and_report_the_final_outcome(cutting):
    bridge = cutting(cut=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMMESSAGE_")}
    env["VMMESSAGE_BRIDGE"] = bridge.path
    for argv in (["send", "vm1", "k", "v"], ["send", "vm1", "k", "v", "--id", "given:1"]):
        bridge.cut = len(bridge.requests) + 1  # cut the next one
        r = subprocess.run([VMMESSAGE, *argv], capture_output=True, text=True, timeout=60, env=env)
        assert (r.returncode, r.stdout, r.stderr) == (0, "Message sent successfully.\n", "")
    keys = bridge.keys()
    assert keys[0] == keys[1] and len(keys[0]) == 32 and keys[2:] == ["given:1", "given:1"]
