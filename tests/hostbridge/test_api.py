"""The HTTP API (hostbridge.api) over a real unix socket, with the FakeBridge behind it.

Requests go through hostbridge.apiclient (what the CLIs use) or raw bytes on the socket (to send
what a well-behaved client would not).
"""

import json
import logging
import os
import socket
import stat

import pytest

from hostbridge import api
from hostbridge.apiclient import ApiError, Client, parse_response
from hostbridge.errors import (
    AgentTimeout,
    Busy,
    IdempotencyKeyReused,
    MessageCancelled,
    MessageExpired,
    NotDelivered,
)
from tests.hostbridge.fakes import FakeBridge, ServedApp, api_config

SECRET = "s3cr3t-Pa55word-that-must-not-leak"


@pytest.fixture
def served(short_dir):
    bridge = FakeBridge(["vm1", "vm2"])
    bridge.fake("vm2").set_connected(False)
    with ServedApp(bridge, api_config(short_dir)) as s:
        yield s


@pytest.fixture
def client(served):
    return Client(served.unix_path, timeout=20)


def raw(served, data: bytes):
    """Send raw request bytes on the unix socket; return (status, decoded JSON body)."""
    status, body = parse_response(served.exchange(data))
    return status, json.loads(body)


def request(method, path, body=b"", extra=""):
    head = "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n" % (
        method,
        path,
        len(body),
        extra,
    )
    return head.encode() + body


def err(exc_info):
    return exc_info.value.status, exc_info.value.code, exc_info.value.message


def test_it_should_list_vms_with_channel_agent_state_last_seen_and_queued(client):
    vms = {vm["name"]: vm for vm in client.vms()}
    assert set(vms) == {"vm1", "vm2"}
    assert vms["vm1"]["agent"] == "connected"
    assert vms["vm2"]["agent"] == "disconnected"
    for vm in vms.values():
        assert {"channel", "last_seen", "queued", "counters"} <= set(vm)


def test_it_should_answer_404_unknown_vm_for_every_vm_route(client):
    for call in (
        lambda: client.vm("nope"),
        lambda: client.send("nope", "k", "v"),
        lambda: client.query("nope", "k"),
        lambda: client.keys("nope"),
        lambda: client.delete("nope", "k"),
        lambda: client.audit("nope"),
    ):
        with pytest.raises(ApiError) as e:
            call()
        assert err(e) == (404, "unknown_vm", "no VM named 'nope'")


def test_it_should_deliver_with_200_and_queue_with_202(served, client):
    assert client.send("vm1", "foo", "bar") == {
        "vm": "vm1",
        "key": "foo",
        "outcome": "delivered",
        "seq": 1,
        "replayed": False,
        "run_state": "unknown",
    }
    status, doc = raw(served, request("POST", "/v1/vms/vm2/messages", b'{"key":"k","value":"v"}'))
    assert (status, doc["outcome"]) == (202, "queued")
    assert client.vm("vm2")["queued"] == 1


def test_it_should_refuse_with_409_when_queue_is_false_and_the_agent_is_not_connected(client):
    with pytest.raises(ApiError) as e:
        client.send("vm2", "k", "v", queue=False)
    assert err(e)[:2] == (409, "agent_not_connected")


def test_it_should_pass_log_queue_and_timeout_to_the_bridge(served, client):
    client.send("vm1", "k", "v", log=False, queue=False, timeout=7.5)
    assert served.bridge.calls[-1] == ("send", "vm1", "k", False, False, 7.5)
    client.send("vm1", "k", "v")
    assert served.bridge.calls[-1] == ("send", "vm1", "k", True, True, 5.0)


def test_it_should_pass_a_sends_expiry_to_the_bridge(served, client):
    client.send("vm2", "k", "v", expires=3600)
    assert served.bridge.expires == 3600.0
    client.send("vm2", "k", "v", expires=0)  # never, whatever the bridge's default
    assert served.bridge.expires == 0.0
    client.send("vm2", "k", "v")
    assert served.bridge.expires is None  # the bridge's default


def test_it_should_cancel_one_or_every_undelivered_message(served, client):
    for i in range(3):
        assert client.send("vm2", "k%d" % i, "v")["outcome"] == "queued"
    assert [m["seq"] for m in client.queue("vm2")["messages"]] == [1, 2, 3]
    assert client.cancel("vm2", 2) == {"vm": "vm2", "cancelled": [2], "in_flight": []}
    assert [m["seq"] for m in client.queue("vm2", limit=1)["messages"]] == [1]
    assert client.vm("vm2")["queued"] == 2
    status, doc = raw(served, request("DELETE", "/v1/vms/vm2/messages"))
    assert (status, doc) == (200, {"vm": "vm2", "cancelled": [1, 3], "in_flight": []})
    assert client.cancel("vm2") == {"vm": "vm2", "cancelled": [], "in_flight": []}
    with pytest.raises(ApiError) as e:
        client.cancel("vm2", 2)
    assert err(e)[:2] == (404, "not_found")
    with pytest.raises(ApiError) as e:
        client.cancel("nope")
    assert err(e) == (404, "unknown_vm", "no VM named 'nope'")


@pytest.mark.parametrize("seq", ["0", "-1", "x", "1.5", "%C2%B2", "9" * 19])
def test_it_should_answer_400_for_a_seq_that_is_not_a_messages_number(served, seq):
    status, doc = raw(served, request("DELETE", "/v1/vms/vm2/messages/" + seq))
    assert (status, doc["error"]["code"]) == (400, "bad_request")
    assert "seq must be a message's number" in doc["error"]["message"]


@pytest.mark.parametrize("exc,code", [(MessageCancelled, "cancelled"), (MessageExpired, "expired")])
def test_a_send_whose_message_is_withdrawn_while_it_waits_should_answer_410(
    served, client, exc, code
):
    served.call(
        lambda: served.bridge.fail_with.__setitem__(
            "send", exc("message 1 to VM 'vm1' was withdrawn before it was delivered")
        )
    )
    with pytest.raises(ApiError) as e:
        client.send("vm1", "k", "v")
    assert err(e)[:2] == (410, code)


@pytest.mark.parametrize(
    "key,limit,code", [("k" * 257, "256", "key_too_long"), ("é" * 129, "256", "key_too_long")]
)
def test_it_should_answer_413_naming_the_limit_when_the_key_is_too_long(client, key, limit, code):
    with pytest.raises(ApiError) as e:
        client.send("vm1", key, "v")
    status, got, message = err(e)
    assert (status, got) == (413, code)
    assert limit in message


def test_it_should_answer_413_naming_the_limit_when_the_value_is_too_long(client):
    with pytest.raises(ApiError) as e:
        client.send("vm1", "k", "x" * 8193)
    status, code, message = err(e)
    assert (status, code) == (413, "value_too_long")
    assert "8192" in message


def test_it_should_answer_413_for_an_oversized_key_in_the_url(client):
    with pytest.raises(ApiError) as e:
        client.query("vm1", "k" * 300)
    assert err(e)[:2] == (413, "key_too_long")


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"key":"k"}', "'key' and 'value'"),
        (b'{"key":"k","value":"v","extra":1}', "unknown field"),
        (b'{"key":"k","value":"v","log":"no"}', "log must be true or false"),
        (b'{"key":"k","value":"v","queue":1}', "queue must be true or false"),
        (b'{"key":"k","value":"v","timeout":"soon"}', "timeout must be a number"),
        (b'{"key":"k","value":"v","timeout":-1}', "timeout must be from 0.1 to 300 seconds"),
        (b'{"key":"k","value":"v","timeout":true}', "timeout must be a number"),
        (b'{"key":"k","value":"v","expires":"1h"}', "expires must be a number"),
        (b'{"key":"k","value":"v","expires":5e-324}', "0 (never) or from 1 to"),
        (b'{"key":"k","value":"v","expires":-1}', "0 (never) or from 1 to"),
        (b'{"key":"k","value":"v","expires":1e300}', "0 (never) or from 1 to"),
        (b'{"key":1,"value":"v"}', "key must be a string"),
        (b'{"key":"k","value":null}', "value must be a string"),
        (b'{"key":"a=b","value":"v"}', "'='"),
        (b'{"key":"a\\u001bb","value":"v"}', "control character"),
    ],
)
def test_it_should_answer_400_with_a_one_line_reason_for_bad_input(served, body, fragment):
    status, doc = raw(served, request("POST", "/v1/vms/vm1/messages", body))
    assert status == 400
    assert fragment in doc["error"]["message"]
    assert "\n" not in doc["error"]["message"]
    assert doc["error"]["code"] in ("bad_request", "invalid_key", "invalid_value")


@pytest.mark.parametrize("value", ["0", "5e-324", "1e-300", "0.001", "0.05", "300.5"])
@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v1/vms/vm1/messages", b'{"key":"k","value":"v","timeout":%s}'),
        ("GET", "/v1/vms/vm1/keys/k?timeout=%s", b""),
        ("GET", "/v1/vms/vm1/keys?timeout=%s", b""),
        ("DELETE", "/v1/vms/vm1/keys/k?timeout=%s", b""),
    ],
)
def test_a_timeout_the_bridge_cannot_honour_should_be_a_400_naming_the_minimum(
    served, method, path, body, value
):
    if body:
        body = body % value.encode()
    else:
        path = path % value
    status, doc = raw(served, request(method, path, body))
    assert (status, doc["error"]["code"]) == (400, "bad_request"), doc
    assert "from 0.1 to 300 seconds" in doc["error"]["message"]
    assert served.bridge.calls == []


def test_the_shortest_and_longest_timeouts_the_bridge_honours_should_be_accepted(served, client):
    client.send("vm1", "k", "v", timeout=0.1)
    client.query("vm1", "k", timeout=300)
    assert [c[-1] for c in served.bridge.calls] == [0.1, 300.0]


def test_it_should_hand_the_idempotency_key_header_to_the_bridge_and_mark_a_replay(served):
    body = b'{"key":"k","value":"v"}'
    answers = [
        raw(served, request("POST", "/v1/vms/vm1/messages", body, "Idempotency-Key: a-1\r\n"))
        for _ in range(2)
    ]
    assert [(status, doc["seq"], doc["replayed"]) for status, doc in answers] == [
        (200, 1, False),
        (200, 1, True),
    ]
    assert served.bridge.idempotency_keys == ["a-1", "a-1"]
    raw(served, request("POST", "/v1/vms/vm1/messages", body))
    assert served.bridge.idempotency_keys[-1] is None


@pytest.mark.parametrize(
    "headers,fragment",
    [
        ("Idempotency-Key: \r\n", "1 to 128 characters, not 0"),
        ("Idempotency-Key: %s\r\n" % ("x" * 129), "1 to 128 characters, not 129"),
        ("Idempotency-Key: a b\r\n", "only letters, digits and - _ . : ~ + / ="),
        ("Idempotency-Key: a;b\r\n", "only letters, digits"),
        ("Idempotency-Key: \xc3\xa9\r\n", "only letters, digits"),
        ("Idempotency-Key: a\r\nIdempotency-Key: b\r\n", "one Idempotency-Key header, not 2"),
    ],
)
def test_a_bad_idempotency_key_should_be_a_400_and_send_nothing(served, headers, fragment):
    body = b'{"key":"k","value":"v"}'
    status, doc = raw(
        served,
        request("POST", "/v1/vms/vm1/messages", body).replace(
            b"\r\n\r\n", b"\r\n" + headers.encode("latin-1") + b"\r\n", 1
        ),
    )
    assert (status, doc["error"]["code"]) == (400, "bad_request")
    assert fragment in doc["error"]["message"]
    assert served.bridge.calls == []


@pytest.mark.parametrize(
    "error,status",
    [
        (IdempotencyKeyReused("this idempotency key was used for another message"), 422),
        (NotDelivered("message 1 ... was not delivered: the agent refused it"), 409),
    ],
)
def test_a_retry_the_bridge_will_not_answer_with_a_message_should_be_422_or_409(
    served, client, error, status
):
    served.call(lambda: served.bridge.fail_with.__setitem__("send", error))
    with pytest.raises(ApiError) as e:
        client.send("vm1", "k", "v", idempotency_key="r-1")
    assert err(e) == (status, error.code, error.message)


def test_it_should_answer_413_request_too_large_for_a_huge_body(served):
    status, doc = raw(served, request("POST", "/v1/vms/vm1/messages", b"x" * (api.MAX_BODY + 10)))
    assert status == 413
    assert doc["error"]["code"] == "request_too_large"
    assert str(api.MAX_BODY) in doc["error"]["message"]


@pytest.mark.parametrize(
    "key",
    ["a/b/c", "with space", "ünïcødé ✓", "100%", "?q#frag&x", "com.oracle.linux.root-password"],
)
def test_it_should_round_trip_keys_that_need_percent_encoding(client, key):
    client.send("vm1", key, "value of " + key)
    got = client.query("vm1", key)
    assert (got["key"], got["value"], got["stale"]) == (key, "value of " + key, False)
    assert key in [e["key"] for e in client.keys("vm1")["entries"]]
    assert client.delete("vm1", key)["outcome"] == "delivered"
    with pytest.raises(ApiError) as e:
        client.query("vm1", key)
    assert err(e)[:2] == (404, "not_found")


def test_it_should_mark_a_query_from_the_mirror_stale_with_last_seen(served, client):
    served.call(lambda: served.bridge.fake("vm2").keys.__setitem__("g", ("gv", 1000.0, "guest")))
    got = client.query("vm2", "g")
    assert got["stale"] is True
    assert got["last_seen"] == served.bridge.fake("vm2").info.last_seen
    assert got["origin"] == "guest"
    assert client.keys("vm2")["stale"] is True


def test_it_should_answer_504_on_agent_timeout_and_503_when_busy(served, client):
    served.call(
        lambda: served.bridge.fail_with.__setitem__(
            "query", AgentTimeout("the agent in VM 'vm1' did not answer within 5 s")
        )
    )
    with pytest.raises(ApiError) as e:
        client.query("vm1", "k")
    assert err(e)[:2] == (504, "agent_timeout")
    served.call(
        lambda: served.bridge.fail_with.__setitem__(
            "send", Busy("too many outstanding requests for VM 'vm1'")
        )
    )
    with pytest.raises(ApiError) as e:
        client.send("vm1", "k", "v")
    assert err(e)[:2] == (503, "busy")


def test_it_should_answer_a_generic_500_without_echoing_the_value_on_an_unexpected_error(
    served, client, caplog
):
    served.call(lambda: served.bridge.fail_with.__setitem__("send", RuntimeError("boom " + SECRET)))
    with caplog.at_level(logging.ERROR, logger="hostbridge.api"):
        with pytest.raises(ApiError) as e:
            client.send("vm1", "k", SECRET)
    assert err(e)[:2] == (500, "internal")
    assert SECRET not in e.value.message
    assert "internal error serving POST /v1/vms/vm1/messages" in caplog.text


def test_it_should_answer_json_404_and_405_for_unknown_routes_and_methods(served):
    status, doc = raw(served, request("GET", "/v2/nothing"))
    assert (status, doc["error"]["code"]) == (404, "not_found")
    status, doc = raw(served, request("PUT", "/v1/vms"))
    assert (status, doc["error"]["code"]) == (405, "method_not_allowed")


def test_it_should_return_the_audit_newest_first_without_values_sent_with_log_off(client):
    client.send("vm1", "a", "visible")
    client.send("vm1", "b", SECRET, log=False)
    rows = client.audit("vm1")["entries"]
    assert [(r["key"], r["value"], r["size"]) for r in rows] == [
        ("b", None, len(SECRET)),
        ("a", "visible", 7),
    ]
    assert len(client.audit("vm1", limit=1)["entries"]) == 1
    with pytest.raises(ApiError) as e:
        client.audit("vm1", limit=0)
    assert err(e)[:2] == (400, "bad_request")


def test_it_should_never_log_a_value(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.send("vm1", "k", SECRET, log=False)
        client.send("vm1", "k", SECRET)
        client.query("vm1", "k")
        with pytest.raises(ApiError):
            client.send("vm1", "k", SECRET + "x" * 9000)
    assert SECRET not in caplog.text


def test_it_should_serve_health_and_the_openapi_document(served, client):
    health = client.health()
    assert health["status"] == "ok"
    assert health["vms"] == 2 and health["connected"] == 1
    status, doc = raw(served, request("GET", "/openapi.json"))
    assert status == 200
    with open(api.OPENAPI_PATH) as f:
        assert doc == json.load(f)


def test_it_should_create_the_socket_with_mode_0660(served):
    mode = stat.S_IMODE(os.stat(served.unix_path).st_mode)
    assert mode == 0o660


def test_it_should_refuse_to_start_when_another_process_serves_the_socket(served, short_dir):
    cfg = api_config(short_dir, api_socket=served.unix_path)
    with pytest.raises(api.ApiConfigError, match="already serves"):
        with ServedApp(FakeBridge(), cfg):
            pass


def test_it_should_replace_a_stale_socket_file_and_remove_it_on_close(short_dir):
    path = short_dir / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    with ServedApp(FakeBridge(["vm1"]), api_config(short_dir)) as s:
        assert Client(s.unix_path).vm("vm1")["name"] == "vm1"
    assert not path.exists()


def test_it_should_refuse_tcp_without_tls_or_without_credentials(short_dir):
    with pytest.raises(api.ApiConfigError, match="TLS"):
        with ServedApp(FakeBridge(), api_config(short_dir, api_tcp=("127.0.0.1", 0))):
            pass
    with pytest.raises(api.ApiConfigError, match="credentials"):
        with ServedApp(
            FakeBridge(), api_config(short_dir, api_tcp=("127.0.0.1", 0), tls_cert="c", tls_key="k")
        ):
            pass
