"""The API's key query (GET /v1/vms/{vm}/keys/{key}) and its error answers on both listeners, over
real sockets, with the FakeBridge behind it: the `fresh` parameter, the answer's shape, and JSON
errors on the unix socket (served without middleware) as on TCP (with authentication)."""

import json
import ssl
import urllib.error
import urllib.request

import pytest

from hostbridge import api
from hostbridge.apiclient import ApiError, Client, parse_response, path
from hostbridge.model import KeyValue
from tests.hostbridge.fakes import FakeBridge, ServedApp, api_config, tls_api_config

TOKEN = "query-test-token-0123456789"


@pytest.fixture
def served(short_dir):
    bridge = FakeBridge(["vm1"])
    bridge.fake("vm1").keys["k"] = ("v", 1000.0, "guest")
    with ServedApp(bridge, api_config(short_dir)) as s:
        yield s


def get(served, target):
    return Client(served.unix_path, timeout=20).request("GET", target)


def test_fresh_true_should_reach_the_bridge_and_its_absence_or_false_should_not(served):
    for query, fresh in ((None, False), ({"fresh": "true"}, True), ({"fresh": "false"}, False)):
        doc = get(served, path("vms", "vm1", "keys", "k", query=query))
        assert (doc["value"], served.bridge.fresh) == ("v", fresh)
    get(served, path("vms", "vm1", "keys", "k", query={"fresh": "1", "timeout": 7}))
    assert served.bridge.fresh is True
    assert served.bridge.calls[-1] == ("query", "vm1", "k", 7.0)


@pytest.mark.parametrize("value", ["maybe", "", "yes"])
def test_a_fresh_that_is_not_a_boolean_should_be_a_400(served, value):
    with pytest.raises(ApiError) as e:
        get(served, path("vms", "vm1", "keys", "k", query={"fresh": value}))
    assert (e.value.status, e.value.code) == (400, "bad_request")
    assert "fresh must be true or false" in e.value.message


def test_a_bad_key_in_the_url_should_still_be_refused_by_its_rule(served):
    with pytest.raises(ApiError) as e:
        get(served, path("vms", "vm1", "keys", "a=b"))
    assert (e.value.status, e.value.code) == (400, "invalid_key")


def test_the_answer_should_have_every_field_of_a_key_value():
    kv = KeyValue(vm="vm1", key="k", value="v", ts=1.5, origin="host", stale=True, last_seen=2.5)
    assert api._key_value(kv) == kv.to_json()


def test_the_unix_socket_should_answer_unknown_routes_and_methods_in_json_naming_the_methods(
    served,
):
    reply = served.exchange(
        b"DELETE /v1/vms/vm1/audit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    status, body = parse_response(reply)
    head = reply.split(b"\r\n\r\n")[0].decode().lower()
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    assert "allow: " in head and "get" in head.split("allow: ")[1].split("\r\n")[0]
    assert "application/json" in head
    status, body = parse_response(
        served.exchange(b"GET /v1/vms/vm1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


@pytest.fixture
def tls_served(short_dir):
    config, cert = tls_api_config(short_dir, TOKEN)
    with ServedApp(FakeBridge(["vm1"]), config) as s:
        yield s, cert


def https(served, method, target, token=None):
    s, cert = served
    req = urllib.request.Request("https://127.0.0.1:%d%s" % (s.tcp_port, target), method=method)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(
            req, context=ssl.create_default_context(cafile=cert), timeout=20
        ) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_tcp_should_authenticate_before_answering_unknown_routes_then_answer_them_in_json(
    tls_served,
):
    status, doc, _ = https(tls_served, "GET", "/v1/vms/vm1/nothing")
    assert (status, doc["error"]["code"]) == (401, "unauthorized")
    status, doc, _ = https(tls_served, "GET", "/v1/vms/vm1/nothing", TOKEN)
    assert (status, doc["error"]["code"]) == (404, "not_found")
    status, doc, headers = https(tls_served, "PUT", "/v1/vms", TOKEN)
    assert (status, doc["error"]["code"]) == (405, "method_not_allowed")
    assert "GET" in headers["Allow"]
    status, doc, _ = https(tls_served, "GET", "/v1/vms/vm1/keys/k?fresh=true", TOKEN)
    assert (status, doc["error"]["code"]) == (404, "not_found")  # the key is not set
