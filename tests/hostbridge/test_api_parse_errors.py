"""Requests aiohttp cannot parse get the API's JSON error, echoing nothing, on both sockets.

aiohttp answers them itself, before any middleware, with a text/plain page that quoted the
request line; a marker in each request must not come back."""

import json
import socket
import ssl

import pytest

from tests.hostbridge.fakes import FakeBridge, ServedApp, tls_api_config

pytestmark = pytest.mark.timeout(60)

MARKER = "SECRETMARKER"
TOKEN = "parse-errors-token-0123456789"

MALFORMED = {
    "request line over 8 KiB": "GET /v1/vms/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (MARKER * 800),
    "header over 8 KiB": "GET /v1/vms HTTP/1.1\r\nHost: x\r\nX-Long: %s\r\n\r\n" % (MARKER * 800),
    "bad method": "G\x01T%s /v1/vms HTTP/1.1\r\nHost: x\r\n\r\n" % MARKER,
    "bad version": "GET /v1/vms HTTP/9.%s\r\nHost: x\r\n\r\n" % MARKER,
    "bad chunk": "POST /v1/vms/vm1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    "\r\nZZ%s\r\n" % MARKER,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    config, cert = tls_api_config(tmp_path_factory.mktemp("api"), TOKEN)
    with ServedApp(FakeBridge(["vm1"]), config) as app:
        yield app, cert


def exchange(sock, request):
    sock.sendall(request.encode("latin-1"))
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def over_unix(served, request):
    app, _ = served
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(app.unix_path)
        return exchange(s, request)


def over_tls(served, request):
    app, cert = served
    ctx = ssl.create_default_context(cafile=cert)
    with socket.create_connection(("127.0.0.1", app.tcp_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return exchange(s, request)


@pytest.mark.parametrize("send", [over_unix, over_tls], ids=["unix", "tls"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_request_aiohttp_cannot_parse_should_get_a_json_error_echoing_nothing(served, send, case):
    response = send(served, MALFORMED[case])
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    assert status_line.split()[1] == "400", status_line
    assert "content-type: application/json" in [h.lower() for h in headers]
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and "\n" not in error["message"]
    assert MARKER.encode() not in response and MARKER.lower().encode() not in response.lower()
