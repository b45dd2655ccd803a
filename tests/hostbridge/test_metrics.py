"""The bridge's Prometheus metrics (hostbridge.metrics), scraped from the daemon as a process with
real ovmd agents while the test sends, queues, cancels and has sends refused: on the API's unix
socket, on the metrics listener of its own (which answers /metrics and nothing else), and on the
TCP API, where authentication applies."""

import asyncio
import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostbridge import api
from hostbridge.apiclient import ApiError, Client
from hostbridge.bridge import Bridge
from hostbridge.config import Config, ConfigError, load_file
from hostbridge.metrics import OUTCOMES, BridgeMetrics
from ovmproto import __version__
from tests.hostbridge.bridge_harness import BridgeProc, pty_config
from tests.hostbridge.fakes import make_tls_cert
from tests.support.agent import Agent
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

# A key and a value that must never show in a scrape (the first one's value also sent log=no).
SECRET_KEY = "com.example.metrics-key-4f1c"
SECRET_VALUE = "metrics-value-9b2e"
HIDDEN_VALUE = "metrics-password-77d0"


def unix_get(socket_path, target, headers=None):
    """GET ``target`` on the API's unix socket: (status, content type, body text)."""
    conn = http.client.HTTPConnection("localhost", timeout=30)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(socket_path)
    conn.sock = sock
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read().decode()
    finally:
        conn.close()


def http_request(url, method="GET", context=None, headers=None):
    """(status, content type, body text) of a plain or TLS request to ``url``."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


class Scrape:
    """One parsed scrape: its text and every sample, by name and labels."""

    def __init__(self, text):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name, **labels):
        return self.samples[(name, frozenset(labels.items()))]

    def vm(self, name, domain, **labels):
        return self.value(name, domain=domain, **labels)

    def outcomes(self, domain):
        return {
            dict(labels)["outcome"]: value
            for (name, labels), value in self.samples.items()
            if name == "hostbridge_messages_total" and dict(labels)["domain"] == domain
        }


def scrape(bridge):
    status, content_type, text = unix_get(bridge.api_socket, "/metrics")
    assert status == 200, text
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    return Scrape(text)


def metrics_port(bridge):
    """The port the bridge's metrics listener took (it was asked for port 0)."""
    found = []

    def listening():
        found[:] = re.findall(
            r"metrics listening on http://127\.0\.0\.1:(\d+)/metrics", bridge.log()
        )
        return found

    wait_for(listening, what="the metrics listener")
    return int(found[0])


@pytest.fixture
def world(short_dir):
    """A bridge process over VMs "up" and "down" (pty channels) with its metrics listener on an
    ephemeral port of 127.0.0.1, and an agent (not started) for each VM."""
    channels = {name: os.path.join(short_dir, name) for name in ("up", "down")}
    bridge = BridgeProc(
        {name: "pty:" + path for name, path in channels.items()},
        os.path.join(short_dir, "db"),
        args=["--metrics-listen", "127.0.0.1:0"],
    )
    agents = {name: Agent(path) for name, path in channels.items()}
    try:
        bridge.start().wait_ready()
        yield bridge, agents
    finally:
        for agent in agents.values():
            agent.close()
        bridge.close()


def test_a_scrape_should_count_what_the_bridge_did_per_vm(world):
    bridge, agents = world
    client = Client(bridge.api_socket)
    agents["up"].start().wait_ready()
    wait_for(lambda: client.vm("up")["agent"] == "connected", what="the agent of up")

    first = scrape(bridge)
    assert first.value("hostbridge_build_info", version=__version__) == 1
    assert first.vm("hostbridge_agent_connected", "up") == 1
    assert first.vm("hostbridge_agent_connected", "down") == 0
    assert first.outcomes("up") == dict.fromkeys(OUTCOMES, 0)

    # Delivered to up: three sends, one of them log=no.
    for value in ("one", SECRET_VALUE):
        assert client.send("up", SECRET_KEY, value)["outcome"] == "delivered"
    assert client.send("up", "password", HIDDEN_VALUE, log=False)["outcome"] == "delivered"
    # Queued for down, whose agent is not running; one of them cancelled, one refused.
    before_first = time.time()
    seqs = [client.send("down", "k0", SECRET_VALUE)["seq"]]
    after_first = time.time()
    # Make the first queued message the oldest by a margin the scrape can tell apart.
    wait_for(lambda: time.time() > after_first + 1.0, what="a second to pass")
    seqs += [client.send("down", "k%d" % i, "v%d" % i)["seq"] for i in (1, 2)]
    client.cancel("down", seqs[1])
    with pytest.raises(ApiError) as refused:
        client.send("down", "k9", "not kept", queue=False)
    assert refused.value.code == "agent_not_connected"

    start = time.time()
    s = scrape(bridge)
    end = time.time()
    assert s.vm("hostbridge_queue_messages", "down") == 2
    assert s.vm("hostbridge_queue_messages", "up") == 0
    assert (
        end - before_first
        >= s.vm("hostbridge_queue_oldest_age_seconds", "down")
        >= (start - after_first)
        > 1.0
    )
    assert s.vm("hostbridge_queue_oldest_age_seconds", "up") == 0
    assert s.outcomes("up") == {
        "queued": 3,
        "delivered": 3,
        "failed": 0,
        "refused": 0,
        "cancelled": 0,
        "expired": 0,
    }
    assert s.outcomes("down") == {
        "queued": 3,
        "delivered": 0,
        "failed": 0,
        "refused": 1,
        "cancelled": 1,
        "expired": 0,
    }
    assert s.value("hostbridge_message_delivery_seconds_count") == 3
    assert s.value("hostbridge_message_delivery_seconds_bucket", le="+Inf") == 3
    # What the API says of the same counters and states.
    assert client.vm("down")["queued"] == 2
    for vm in ("up", "down"):
        assert s.vm("hostbridge_reconnects_total", vm) == client.vm(vm)["counters"]["reconnects"]
    # Not a key, not a value: not in a label, not anywhere.
    for secret in (SECRET_KEY, SECRET_VALUE, HIDDEN_VALUE, "password", "k0", "not kept"):
        assert secret not in s.text

    # down's agent starts: its two messages are delivered, after waiting since their sends.
    launched = time.time()
    agents["down"].start().wait_ready()
    wait_for(lambda: client.vm("down")["queued"] == 0, what="down's outbox to drain")
    s = scrape(bridge)
    assert s.vm("hostbridge_agent_connected", "down") == 1
    assert s.vm("hostbridge_queue_messages", "down") == 0
    assert s.vm("hostbridge_queue_oldest_age_seconds", "down") == 0
    assert s.outcomes("down")["delivered"] == 2
    assert s.value("hostbridge_message_delivery_seconds_count") == 5
    # Each of the two waited at least from its send to the agent's start.
    waited = (launched - after_first) + (launched - start)
    assert s.value("hostbridge_message_delivery_seconds_sum") >= waited
    # The first of them waited over a second: it is in no bucket up to 1 s.
    assert s.value("hostbridge_message_delivery_seconds_bucket", le="1.0") <= 4
    assert s.value("hostbridge_message_delivery_seconds_bucket", le="+Inf") == 5

    # up's agent restarts: the gauge follows, and the reconnect is counted.
    agents["up"].stop()
    wait_for(lambda: scrape(bridge).vm("hostbridge_agent_connected", "up") == 0, what="up gone")
    agents["up"].start().wait_ready()
    wait_for(lambda: scrape(bridge).vm("hostbridge_agent_connected", "up") == 1, what="up back")
    s = scrape(bridge)
    reconnects = client.vm("up")["counters"]["reconnects"]
    assert s.vm("hostbridge_reconnects_total", "up") == reconnects >= 1


def test_the_metrics_listener_should_serve_metrics_and_nothing_else(world):
    bridge, _ = world
    client = Client(bridge.api_socket)
    client.send("down", SECRET_KEY, SECRET_VALUE)
    base = "http://127.0.0.1:%d" % metrics_port(bridge)
    status, content_type, text = http_request(base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    s = Scrape(text)
    assert s.vm("hostbridge_queue_messages", "down") == 1
    assert SECRET_KEY not in text and SECRET_VALUE not in text
    # OpenMetrics to a scraper that asks for it.
    status, content_type, text = http_request(
        base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    # No API there: neither its routes nor anything else.
    for target in (
        "/v1/vms",
        "/v1/vms/down/keys/" + SECRET_KEY,
        "/v1/health",
        "/",
        "/openapi.json",
    ):
        assert http_request(base + target)[0] == 404, target
    assert http_request(base + "/metrics", method="POST")[0] == 405
    assert http_request(base + "/v1/vms/down/messages", method="POST")[0] in (404, 405)


def test_metrics_on_the_tcp_api_should_need_credentials(short_dir):
    """The API's TCP listener serves /metrics like every route: to an authenticated client."""
    token = "metrics-token-0123456789abcdef"
    cert, key = make_tls_cert(short_dir)
    tokens = short_dir / "tokens"
    tokens.write_text("scraper:%s\n" % token)
    tokens.chmod(0o600)
    config = pty_config(str(short_dir), "vm1")
    config.api_socket = str(short_dir / "api.sock")
    config.api_tcp = ("127.0.0.1", 0)
    config.tls_cert, config.tls_key, config.tokens_file = cert, key, str(tokens)
    ctx = ssl.create_default_context(cafile=cert)

    async def main():
        bridge = Bridge(config)
        metrics = BridgeMetrics(bridge)
        await bridge.start()
        server = await api.start(api.make_app(bridge, config, metrics), config)
        try:
            url = "https://127.0.0.1:%d/metrics" % server.tcp_addresses[0][1]
            anonymous = await asyncio.to_thread(http_request, url, context=ctx)
            allowed = await asyncio.to_thread(
                http_request, url, context=ctx, headers={"Authorization": "Bearer " + token}
            )
        finally:
            await server.close()
            await bridge.stop()
        return anonymous, allowed

    anonymous, allowed = asyncio.run(main())
    assert anonymous[0] == 401 and "hostbridge_" not in anonymous[2]
    assert allowed[0] == 200
    assert Scrape(allowed[2]).vm("hostbridge_agent_connected", "vm1") == 0


def test_a_taken_metrics_port_should_stop_the_bridge_with_one_line(short_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bridge = BridgeProc(
            {"vm1": "pty:" + os.path.join(short_dir, "vm1")},
            os.path.join(short_dir, "db"),
            args=["--metrics-listen", "127.0.0.1:%d" % port],
        )
        try:
            assert bridge.start().proc.wait(timeout=60) == 1
            errors = [line for line in bridge.log().splitlines() if " ERROR: " in line]
            assert (
                len(errors) == 1 and "cannot listen for metrics on 127.0.0.1:%d" % port in errors[0]
            )
        finally:
            bridge.close()


def test_metrics_listen_should_be_read_from_the_config_file(short_dir):
    path = short_dir / "hostbridge.toml"
    path.write_text('[bridge]\nmetrics_listen = "127.0.0.1:9477"\n')
    assert load_file(str(path)).metrics_listen == ("127.0.0.1", 9477)
    assert Config().metrics_listen is None
    path.write_text('[bridge]\nmetrics_listen = "9477"\n')
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        load_file(str(path))
