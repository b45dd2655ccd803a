"""hostbridge.admission: what a network client may hold on the TCP API before it authenticates.

A real TLS listener on 127.0.0.1 (the API in-process, tests.hostbridge.fakes.ServedApp); clients
are plain sockets. Loopback only, a few dozen connections at most."""

import json
import resource
import socket
import ssl
import urllib.request

import pytest

from hostbridge.admission import open_files
from hostbridge.apiclient import Client
from hostbridge.config import ApiLimits
from tests.hostbridge.fakes import FakeBridge, ServedApp, tls_api_config

pytestmark = pytest.mark.timeout(60)

TOKEN = "admission-token-0123456789abcdef"
HALF_REQUEST = b"GET /v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthoriz"


@pytest.fixture
def serve(short_dir):
    started = []

    def start(**limits):
        config, cert = tls_api_config(short_dir, TOKEN, api_limits=ApiLimits(**limits))
        served = ServedApp(FakeBridge(["vm1"]), config).__enter__()
        started.append(served)
        return served, cert

    yield start
    for served in started:
        served.__exit__(None, None, None)


def tls_connect(port, cert, source="127.0.0.1"):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return ssl.create_default_context(cafile=cert).wrap_socket(raw, server_hostname="127.0.0.1")


def closed_by_peer(sock):
    """True when the bridge closes ``sock`` within its 10 s timeout (False: still open)."""
    try:
        return sock.recv(1024) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def get_with_token(port, cert):
    ctx = ssl.create_default_context(cafile=cert)
    req = urllib.request.Request(
        "https://127.0.0.1:%d/v1/vms/vm1" % port, headers={"Authorization": "Bearer " + TOKEN}
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_a_half_sent_request_should_be_closed_when_it_has_not_authenticated_in_time(serve):
    served, cert = serve(auth_timeout=0.5)
    with tls_connect(served.tcp_port, cert) as s:
        s.sendall(HALF_REQUEST)
        assert closed_by_peer(s)
    assert served.server.admission.refused.get("auth_timeout") == 1
    assert get_with_token(served.tcp_port, cert)[0] == 200


def test_a_client_that_never_finishes_the_tls_handshake_should_be_closed(serve):
    served, _ = serve(handshake_timeout=0.5)
    with socket.create_connection(("127.0.0.1", served.tcp_port), timeout=10) as s:
        assert closed_by_peer(s)


def test_one_address_should_hold_only_its_share_while_others_and_the_unix_socket_are_served(serve):
    served, cert = serve(max_per_address=4)
    held = [tls_connect(served.tcp_port, cert) for _ in range(4)]
    try:
        for s in held:
            s.sendall(HALF_REQUEST)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls_connect(served.tcp_port, cert).sendall(HALF_REQUEST)
        assert served.server.admission.refused.get("max_per_address") == 1
        # another address, a token, and the unix socket still get answers
        with tls_connect(served.tcp_port, cert, source="127.0.0.2") as other:
            other.sendall(
                b"GET /v1/vms/vm1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
            )
            assert other.recv(1024).startswith(b"HTTP/1.1 200")
        assert Client(served.unix_path).vm("vm1")["name"] == "vm1"
    finally:
        for s in held:
            s.close()


def test_an_authenticated_connection_should_no_longer_count_against_its_address(serve):
    served, cert = serve(max_per_address=1, auth_timeout=0.5)
    with tls_connect(served.tcp_port, cert) as s:
        s.sendall(
            b"GET /v1/vms/vm1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\n\r\n"
        )
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        # a keep-alive connection that authenticated is neither timed out nor in the way
        with tls_connect(served.tcp_port, cert) as second:
            second.sendall(HALF_REQUEST)
        assert served.server.admission.refused.get("auth_timeout") is None


def test_network_clients_should_never_take_the_descriptors_kept_for_guests(serve):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Leave room for about 6 more connections, whoever else has descriptors open meanwhile.
    served, cert = serve(fd_reserve=soft - open_files() - 6, max_per_address=100)
    held = []
    try:
        for i in range(20):
            try:
                s = tls_connect(served.tcp_port, cert, source="127.0.0.%d" % (2 + i))
                s.sendall(HALF_REQUEST)
                held.append(s)
            except (ssl.SSLError, ConnectionError, OSError):
                pass
        refused = served.server.admission.refused.get("fd_reserve", 0)
        assert refused >= 10
        assert len(served.server.admission.conns) <= 8
        assert Client(served.unix_path).vm("vm1")["name"] == "vm1"
    finally:
        for s in held:
            s.close()


def test_the_daemon_should_raise_its_soft_open_files_limit_to_the_hard_one():
    import subprocess
    import sys

    code = (
        "import resource; from hostbridge.daemon import raise_open_files_limit as r; "
        "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["4096", "4096"]


def test_when_the_waiting_slots_are_full_the_oldest_waiter_should_make_room_for_a_new_client(
    serve,
):
    served, cert = serve(max_unauthenticated=4, max_per_address=2)
    held = [
        tls_connect(served.tcp_port, cert, source="127.0.0.%d" % (2 + i // 2)) for i in range(4)
    ]
    try:
        for s in held:
            s.sendall(HALF_REQUEST)
        with tls_connect(served.tcp_port, cert, source="127.0.0.9") as newcomer:
            newcomer.sendall(
                b"GET /v1/vms/vm1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
            )
            assert newcomer.recv(1024).startswith(b"HTTP/1.1 200")
        assert closed_by_peer(held[0])  # the oldest
        assert served.server.admission.refused.get("max_unauthenticated") == 1
    finally:
        for s in held:
            s.close()
