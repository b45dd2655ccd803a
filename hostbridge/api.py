"""The bridge's HTTP API (aiohttp): routes, JSON errors, authentication on TCP, and the listeners.

    GET    /v1/health                     liveness and counts
    GET    /v1/vms                        every VM: channel, agent state, last seen, queued (vmlist)
    GET    /v1/vms/{vm}                   one VM's details (vmstat)
    POST   /v1/vms/{vm}/messages          send {key, value, log?, queue?, timeout?, expires?};
                                          header Idempotency-Key
    GET    /v1/vms/{vm}/messages          the messages waiting for delivery (no values)
    DELETE /v1/vms/{vm}/messages          cancel every undelivered message
    DELETE /v1/vms/{vm}/messages/{seq}    cancel one undelivered message
    GET    /v1/vms/{vm}/keys              the VM's keys (live, else the mirror marked stale)
    GET    /v1/vms/{vm}/keys/{key}        one key (key percent-encoded; may hold '/')
    DELETE /v1/vms/{vm}/keys/{key}        delete a key in the guest (sequenced like a send)
    GET    /v1/vms/{vm}/audit             the audit trail, newest first
    GET    /openapi.json                  the OpenAPI document (hostbridge/openapi.json)
    GET    /metrics                       Prometheus metrics (hostbridge.metrics)

Every error is ``{"error": {"code": ..., "message": ...}}`` with a one-line message (never a value).
The unix socket (default /run/hostbridge/api.sock, mode 0660) is guarded by file permissions; TCP is
served only with TLS and every request on it must carry a bearer token or a user and password.
Each listener has its own application over the same routes and state: TCP's authenticates every
request in a middleware; the unix socket's has no middleware at all (a key query is the hot path,
and each middleware costs every request a coroutine), its handlers answering their own failures.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import http
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest

from hostbridge import (
    DEFAULT_API_SOCKET,
    IDEMPOTENCY_HEADER,
    TIMEOUT_MAX,
    TIMEOUT_MIN,
    check_idempotency_key,
)
from hostbridge.admission import Admission
from hostbridge.auth import Authenticator, CredentialFileError
from hostbridge.config import MAX_EXPIRY, MIN_EXPIRY, ApiLimits
from hostbridge.errors import BridgeError, Busy, InvalidInput, NotFound
from hostbridge.events import EventHub
from ovmproto import errorcodes, jsonlib, limits
from ovmproto.errors import OvmError
from ovmsys import unixsocket

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

    from hostbridge.model import (
        AuditRow,
        CancelResult,
        KeyList,
        KeyValue,
        QueueList,
        SendResult,
        VmInfo,
    )

log = logging.getLogger(__name__)

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
# A request body holds one key and one value; even a worst-case JSON-escaped value is under this.
MAX_BODY = 128 * 1024
MAX_AUDIT_LIMIT = 1000
DEFAULT_AUDIT_LIMIT = 100


class BridgeApi(Protocol):
    """What the API serves: hostbridge.bridge.Bridge, or a stand-in with the same methods."""

    events: EventHub  # the change stream (hostbridge.events)

    def stats(self) -> dict[str, float]: ...
    def vms(self) -> list[VmInfo]: ...
    def vm(self, name: str) -> VmInfo: ...
    def check_vm(self, name: str) -> None: ...
    async def send(
        self,
        name: str,
        key: str,
        value: str,
        *,
        log: bool,
        queue: bool,
        timeout: float,
        expires: float | None = None,
        idempotency_key: str | None = None,
    ) -> SendResult: ...
    def cancel(self, name: str, seq: int | None = None) -> CancelResult: ...
    def queue(self, name: str, *, limit: int) -> QueueList: ...
    async def query(
        self, name: str, key: str, *, timeout: float, fresh: bool = False
    ) -> KeyValue: ...
    async def keys(self, name: str, *, timeout: float) -> KeyList: ...
    async def delete(self, name: str, key: str, *, timeout: float) -> SendResult: ...
    def audit(self, name: str, *, limit: int) -> list[AuditRow]: ...


class MetricsSource(Protocol):
    """What /metrics serves: hostbridge.metrics.BridgeMetrics."""

    async def exposition(self, accept: str | None = None) -> tuple[bytes, str]: ...


def _app_key(name: str) -> Any:
    # web.AppKey (aiohttp >= 3.9) keeps newer aiohttp quiet; Debian 12's 3.8.4 takes plain strings.
    # Any: the variables below say what each key holds, as the newer aiohttp's AppKey.
    make = getattr(web, "AppKey", None)
    return make(name) if make is not None else name


BRIDGE: web.AppKey[BridgeApi] = _app_key("hostbridge.bridge")
AUTH: web.AppKey[Authenticator] = _app_key("hostbridge.auth")
SETTINGS: web.AppKey[_Settings] = _app_key("hostbridge.settings")
METRICS: web.AppKey[MetricsSource | None] = _app_key("hostbridge.metrics")


class ApiConfigError(BridgeError):
    """The API cannot be served as configured (e.g. TCP without TLS or credentials)."""

    code = "config"


@dataclass
class _Settings:
    default_timeout: float = 5.0
    openapi: bytes = b""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=jsonlib.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return _json({"error": {"code": code, "message": _one_line(message)}}, status, headers)


# The codes of the refusals aiohttp makes on its own (no route, a method or a body it refuses).
_HTTP_CODES = {
    errorcodes.HTTP_STATUS[code]: code
    for code in (
        "bad_request",
        "unauthorized",
        "not_found",
        "method_not_allowed",
        "request_too_large",
        "unsupported_media_type",
    )
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="hostbridge", Basic realm="hostbridge"'}


def _is_unix(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _failure(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON error answer to a request whose handling raised ``exc``: never a traceback or an
    HTML page. Called from an ``except`` clause (the log's traceback is that of ``exc``)."""
    if isinstance(exc, OvmError):
        status = getattr(exc, "http_status", None)
        if status is None:
            status = errorcodes.http_status(exc.code)
        headers = _CHALLENGE if status == 401 else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        return error_response(status, exc.code, exc.message, headers)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        if exc.status == 413:
            message = "request body over %d bytes" % MAX_BODY
        elif exc.status == 404:
            message = "no such resource: %s" % request.path
        elif exc.status == 405:
            message = "method %s not allowed on %s" % (request.method, request.path)
        else:
            message = exc.reason
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")
        }
        return error_response(
            exc.status, _HTTP_CODES.get(exc.status, "http_%d" % exc.status), message, headers
        )
    if isinstance(exc, CredentialFileError):
        log.error("%s", exc)
        return error_response(500, "internal", "the bridge cannot read its credentials file")
    # The traceback goes to the log only; the message must not echo request data (a value).
    log.error("internal error serving %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error in the bridge (see its log)")


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What the handlers do not answer themselves (a failed authentication) as JSON too."""
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - each one is answered, as JSON (_failure)
        return _failure(request, exc)


def _json_errors(handler: Handler) -> Handler:
    """``handler``, answering its failures in the JSON error shape itself. On the unix socket the
    routes run without any middleware (each costs a coroutine per request, and there is nothing
    to authenticate): this is what keeps every error JSON there."""

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:  # noqa: BLE001 - each one is answered, as JSON (_failure)
            return _failure(request, exc)

    return functools.update_wrapper(serve, handler)


async def _no_route(request: web.Request) -> web.StreamResponse:
    """The last route, matching every path: 405 (with Allow) when another route has the path,
    else 404, raised for _json_errors to answer as aiohttp's own refusals would be."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, except that the errors it makes on its own are JSON.

    A request aiohttp cannot parse (a request line or header over 8 KiB, a bad method, a broken
    chunked body) never reaches a middleware: aiohttp answers it from handle_error() with a
    text/plain page that may quote the request line. Every error of this API is the JSON shape
    of docs/api.md, and echoes nothing the client sent (it may be a secret sent to the wrong
    place)."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # A response is half sent: aiohttp closes the connection, as it would.
            raise ConnectionError("response already started; cannot send an error")
        code = _HTTP_CODES.get(status, "internal" if status >= 500 else "http_%d" % status)
        # The exception's text may quote the request: log its type only, and only when asked.
        log.debug("refused a request aiohttp could not serve: %d %s", status, type(exc).__name__)
        if status == 500:
            text = "internal error in the bridge (see its log)"
        else:
            text = "the HTTP request was malformed or too large (%d %s)" % (
                status,
                _STATUS_PHRASES.get(status, "error"),
            )
        resp = error_response(status, code, text)
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        # Set on TCP connections by hostbridge.admission: (the admission, this connection).
        admitted = getattr(self, "admission", None)
        if admitted is not None:
            admitted[0].lost(admitted[1])


class _JsonErrorServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:  # what each new connection is served by
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


_STATUS_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unix socket: file permissions decide. Anything else: a valid token or user/password."""
    if not _is_unix(request):
        auth = request.app[AUTH]
        header = request.headers.get("Authorization")
        # A valid bearer token (every request a pool forwards) is checked without a coroutine;
        # anything else goes the whole way, where failures count against the client's address.
        principal = auth.check_bearer(header)
        if principal is None:
            principal = await auth.authenticate(header, request.remote)
        admitted = getattr(request.protocol, "admission", None)
        if admitted is not None:
            admitted[0].authenticated(admitted[1])
        if log.isEnabledFor(logging.DEBUG):  # request.path is computed on demand
            log.debug(
                "%s %s by %s %s", request.method, request.path, principal.kind, principal.name
            )
    return await handler(request)


# ---- input checks (types here; limits via ovmproto.limits so the codes match the guest's) ----


def _check_key(key: Any) -> str:
    problem = limits.check_key(key)
    if problem is not None:
        raise InvalidInput(problem[1], problem[0])
    return cast(str, key)  # check_key refuses anything else


def _timeout(value: Any) -> float:
    """A timeout the client gave, checked to be a number in [TIMEOUT_MIN, TIMEOUT_MAX] (null is
    refused). A tiny one (5e-324) is refused too: the bridge could not honour it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput("timeout must be a number of seconds")
    if not TIMEOUT_MIN <= value <= TIMEOUT_MAX:
        raise InvalidInput(
            "timeout must be from %g to %g seconds (the bridge cannot honour less than %g s)"
            % (TIMEOUT_MIN, TIMEOUT_MAX, TIMEOUT_MIN)
        )
    return float(value)


def _expires(value: Any) -> float:
    """A send's expires: 0 (never) or seconds in [MIN_EXPIRY, MAX_EXPIRY]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput("expires must be a number of seconds")
    if value != 0 and not MIN_EXPIRY <= value <= MAX_EXPIRY:
        raise InvalidInput(
            "expires must be 0 (never) or from %g to %d seconds" % (MIN_EXPIRY, MAX_EXPIRY)
        )
    return float(value)


def _query_number(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput("%s must be a number" % name) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidInput("%s must be a finite number" % name)
    return value


def _query_timeout(request: web.Request) -> float:
    value = _query_number(request, "timeout")
    return request.app[SETTINGS].default_timeout if value is None else _timeout(value)


_FLAGS = {"true": True, "1": True, "false": False, "0": False}


def _read_options(request: web.Request) -> tuple[float, bool]:
    """A read's query parameters, checked: (timeout, fresh). Without a query string, as nearly
    every query comes, the defaults and no parsing: this runs on every query."""
    if "?" not in request.raw_path:
        return request.app[SETTINGS].default_timeout, False
    raw = request.query.get("fresh")
    fresh = _FLAGS.get(raw.lower()) if raw is not None else False
    if fresh is None:
        raise InvalidInput("fresh must be true or false")
    return _query_timeout(request), fresh


def _key_value(kv: KeyValue) -> dict[str, Any]:
    # KeyValue.to_json(), spelled out: its walk over dataclasses.fields() is a cost per query.
    return {
        "vm": kv.vm,
        "key": kv.key,
        "value": kv.value,
        "ts": kv.ts,
        "origin": kv.origin,
        "stale": kv.stale,
        "last_seen": kv.last_seen,
    }


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        doc = jsonlib.loads(raw)
    except jsonlib.JSONDecodeError:
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc


def _idempotency_key(request: web.Request) -> str | None:
    """The send's Idempotency-Key header, checked; None without one."""
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput("give one %s header, not %d" % (IDEMPOTENCY_HEADER, len(values)))
    problem = check_idempotency_key(values[0])
    if problem is not None:
        raise InvalidInput(problem)
    return values[0]


def _bool_field(doc: dict[str, Any], name: str, default: bool) -> bool:
    value = doc.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput("%s must be true or false" % name)
    return value


# ---- handlers ----


async def health(request: web.Request) -> web.Response:
    stats = request.app[BRIDGE].stats()
    return _json({"status": "ok", **stats})


async def list_vms(request: web.Request) -> web.Response:
    return _json({"vms": [vm.to_json() for vm in request.app[BRIDGE].vms()]})


async def get_vm(request: web.Request) -> web.Response:
    return _json(request.app[BRIDGE].vm(request.match_info["vm"]).to_json())


async def send_message(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    bridge = request.app[BRIDGE]
    bridge.check_vm(vm)  # an unknown VM is a 404 whatever the body holds
    doc = await _body(request)
    unknown = set(doc) - {"key", "value", "log", "queue", "timeout", "expires"}
    if unknown:
        raise InvalidInput("unknown field(s): %s" % ", ".join(sorted(repr(u) for u in unknown)))
    if "key" not in doc or "value" not in doc:
        raise InvalidInput("the body needs both 'key' and 'value'")
    key = _check_key(doc["key"])
    value = doc["value"]
    problem = limits.check_value(value)
    if problem is not None:
        raise InvalidInput(problem[1], problem[0])
    result = await bridge.send(
        vm,
        key,
        value,
        log=_bool_field(doc, "log", True),
        queue=_bool_field(doc, "queue", True),
        timeout=_timeout(doc["timeout"])
        if "timeout" in doc
        else request.app[SETTINGS].default_timeout,
        expires=_expires(doc["expires"]) if "expires" in doc else None,
        idempotency_key=_idempotency_key(request),
    )
    data = result.to_json()
    return _json(data, 202 if data.get("outcome") == "queued" else 200)


def _limit(request: web.Request) -> int:
    limit = _query_number(request, "limit")
    if limit is None:
        limit = DEFAULT_AUDIT_LIMIT
    if limit != int(limit) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise InvalidInput("limit must be a whole number from 1 to %d" % MAX_AUDIT_LIMIT)
    return int(limit)


async def list_messages(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    return _json(request.app[BRIDGE].queue(vm, limit=_limit(request)).to_json())


async def cancel_messages(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    raw = request.match_info.get("seq")
    seq = None
    if raw is not None:
        if not (raw.isascii() and raw.isdigit() and 0 < len(raw) <= 18 and int(raw) > 0):
            raise InvalidInput("seq must be a message's number, a whole number from 1")
        seq = int(raw)
    result = request.app[BRIDGE].cancel(vm, seq).to_json()
    return _json(result, 202 if result.get("in_flight") else 200)


async def get_key(request: web.Request) -> web.StreamResponse:
    # The hot path of the API, registered as it is: it answers its own failures (what
    # _json_errors would do, one coroutine less per query). The bridge checks the key
    # (InvalidInput, as _check_key would), and only when its mirror does not hold it: a mirrored
    # key passed that check already.
    try:
        info = request.match_info
        timeout, fresh = _read_options(request)
        answer = await request.app[BRIDGE].query(
            info["vm"], info["key"], timeout=timeout, fresh=fresh
        )
        return _json(_key_value(answer))
    except Exception as exc:  # noqa: BLE001 - each one is answered, as JSON (_failure)
        return _failure(request, exc)


# ---- the change stream (hostbridge.events; docs/api.md, "The change stream") ----

MAX_EVENT_CONSUMERS = 64  # streams and long polls at once: each holds a connection, no memory
STREAM_KEEPALIVE = 15.0  # seconds between comments on an idle stream (proxies close silent ones)
POLL_TIMEOUT_MAX = 300.0
STREAM_CHUNK = 256  # events per write: what a stuck reader's socket buffer can be asked to hold


def _event_filter(request: web.Request) -> str | None:
    """The ``vm`` a consumer asked for, which must exist (UnknownVm, else)."""
    vm = request.query.get("vm")
    if vm is not None:
        request.app[BRIDGE].vm(vm)
    return vm


def _since(request: web.Request, hub: EventHub, header: bool = False) -> int:
    raw = request.query.get("since")
    if raw is None and header:
        raw = request.headers.get("Last-Event-ID")
    if raw is None or raw == "":
        return hub.last_id
    try:
        since = int(raw)
    except ValueError:
        raise InvalidInput("since must be an event id (an integer)") from None
    if since < 0:
        raise InvalidInput("since must be an event id (an integer)")
    return since


def _consumer(hub: EventHub) -> None:
    if hub.consumers >= MAX_EVENT_CONSUMERS:
        raise Busy(
            "%d event consumers are connected, the limit; try again later" % hub.consumers, 5.0
        )


async def poll_events(request: web.Request) -> web.Response:
    """GET /v1/events: the events after ``since`` as soon as there is one, or none at timeout."""
    hub: EventHub = request.app[BRIDGE].events
    vm = _event_filter(request)
    since = _since(request, hub)
    value = _query_number(request, "timeout")
    timeout = 30.0 if value is None else value
    if not 0 <= timeout <= POLL_TIMEOUT_MAX:
        raise InvalidInput("timeout must be from 0 to %g seconds" % POLL_TIMEOUT_MAX)
    _consumer(hub)
    hub.consumers += 1
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            batch = hub.after(since, vm, limit=STREAM_CHUNK)
            events = [ev.json for ev in batch.to_send()]
            since = batch.last
            left = deadline - loop.time()
            if events or left <= 0 or not await hub.wait_after(since, left):
                break
    finally:
        hub.consumers -= 1
    body = b'{"events":[%s],"last":%d}' % (b",".join(events), since)
    return web.Response(body=body, content_type="application/json")


async def event_stream(request: web.Request) -> web.StreamResponse:
    """GET /v1/events/stream: Server-Sent Events until the client or the bridge goes.

    A slow reader blocks only its own handler, in write(), once its socket's buffer is full:
    nothing is queued for it but its cursor in the hub's ring (hostbridge.events).
    """
    hub: EventHub = request.app[BRIDGE].events
    vm = _event_filter(request)
    since = _since(request, hub, header=True)
    _consumer(hub)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a reverse proxy must pass each event on at once
        }
    )
    hub.consumers += 1
    try:
        await resp.prepare(request)
        await resp.write(b": hostbridge events\n\n")
        while not hub.closed:
            batch = hub.after(since, vm, limit=STREAM_CHUNK)
            since = batch.last
            data = b"".join(ev.sse() for ev in batch.to_send())
            if data:
                await resp.write(data)
            elif not await hub.wait_after(since, STREAM_KEEPALIVE) and not hub.closed:
                await resp.write(b": keepalive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the reader went away (or the server stops): nothing to clean but the count
    finally:
        hub.consumers -= 1
    return resp


async def list_keys(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    timeout = _query_timeout(request)
    return _json((await request.app[BRIDGE].keys(vm, timeout=timeout)).to_json())


async def delete_key(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    key = _check_key(request.match_info["key"])
    timeout = _query_timeout(request)
    result = (await request.app[BRIDGE].delete(vm, key, timeout=timeout)).to_json()
    return _json(result, 202 if result.get("outcome") == "queued" else 200)


async def get_audit(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    rows = request.app[BRIDGE].audit(vm, limit=_limit(request))
    return _json({"vm": vm, "entries": [row.to_json() for row in rows]})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SETTINGS].openapi, content_type="application/json")


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text format (OpenMetrics when the Accept header asks)."""
    source = request.app[METRICS]
    if source is None:
        raise NotFound("this bridge serves no metrics (is python3-prometheus-client installed?)")
    body, content_type = await source.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


_HANDLERS = (
    # First: aiohttp tries the routes under one prefix (here /v1/vms) in the order they were
    # added, and a key's query, by far the most frequent request, then matches at the first try.
    # No other route takes a path these do.
    ("GET", "/v1/vms/{vm}/keys/{key:.+}", get_key),
    ("DELETE", "/v1/vms/{vm}/keys/{key:.+}", delete_key),
    ("GET", "/v1/health", health),
    ("GET", "/v1/events", poll_events),
    ("GET", "/v1/events/stream", event_stream),
    ("GET", "/v1/vms", list_vms),
    ("GET", "/v1/vms/{vm}", get_vm),
    ("POST", "/v1/vms/{vm}/messages", send_message),
    ("GET", "/v1/vms/{vm}/messages", list_messages),
    ("DELETE", "/v1/vms/{vm}/messages", cancel_messages),
    ("DELETE", "/v1/vms/{vm}/messages/{seq}", cancel_messages),
    ("GET", "/v1/vms/{vm}/keys", list_keys),
    ("GET", "/v1/vms/{vm}/audit", get_audit),
    ("GET", "/openapi.json", openapi),
    ("GET", "/metrics", get_metrics),
    # Last: whatever no route above takes (404, or 405 naming the methods that would do).
    ("*", "/{path:.*}", _no_route),
)


def _add_routes(app: web.Application) -> None:
    pooled = getattr(app[BRIDGE], "pool", None) is not None
    for method, path, handler in _HANDLERS:
        serve = handler if handler is get_key else _json_errors(handler)
        if pooled and path.startswith("/v1/vms/{vm}"):
            serve = _forwarding(serve)
        app.router.add_route(method, path, serve)


def _forwarding(handler: Handler) -> Handler:
    """``handler`` in a pool: a request for a VM another live host owns is answered by that host
    (hostbridge.forward); one the owner cannot take is answered here, from the shared database."""
    # Imported once here, not in serve(): every request of a pool bridge, forwarded or not,
    # would pay the import statement.
    from hostbridge.forward import FORWARDED_HEADER, OwnerUnreachable

    @functools.wraps(handler)
    async def serve(request: web.Request) -> web.StreamResponse:
        pool = cast(Any, request.app[BRIDGE]).pool
        url = pool.route(request.match_info["vm"], FORWARDED_HEADER in request.headers)
        if url is not None and pool.forwarder is not None:
            try:
                return await pool.forwarder.proxy(request, url)
            except OwnerUnreachable:
                pool.owner_down(url)
            except Exception as exc:  # noqa: BLE001 - answered as JSON, as any handler's
                return _failure(request, exc)
        return await handler(request)

    return serve


def make_app(
    bridge: BridgeApi, config: object, metrics: MetricsSource | None = None
) -> web.Application:
    """The aiohttp application serving ``bridge``: each request from anything but a unix socket
    must authenticate. ``config``: a hostbridge.config.Config, or any object with some of its
    attributes (the others take their defaults). ``metrics``: what /metrics serves (404 without).
    start() serves its unix socket with a copy without middleware (_trusted)."""
    app = web.Application(middlewares=[_errors, _authenticate], client_max_size=MAX_BODY)
    app[BRIDGE] = bridge
    app[METRICS] = metrics
    pool = getattr(bridge, "pool", None)
    app[AUTH] = Authenticator(
        getattr(config, "tokens_file", None),
        getattr(config, "users_file", None),
        pool_token=None if pool is None else pool.key.api_token(),
    )
    with open(OPENAPI_PATH, "rb") as f:
        spec = f.read()
    app[SETTINGS] = _Settings(
        default_timeout=float(getattr(config, "query_timeout", 5.0) or 5.0), openapi=spec
    )
    _add_routes(app)
    return app


def _trusted(app: web.Application) -> web.Application:
    """``app`` for the unix socket, whose clients the socket file's permissions have admitted:
    the same routes, state and limits, and no middleware, as nothing is left to authenticate
    (and every middleware costs each request a coroutine or two)."""
    trusted = web.Application(client_max_size=MAX_BODY)
    trusted[BRIDGE] = app[BRIDGE]
    trusted[AUTH] = app[AUTH]
    trusted[SETTINGS] = app[SETTINGS]
    trusted[METRICS] = app[METRICS]
    _add_routes(trusted)
    return trusted


# ---- listeners ----


@dataclass
class ApiServer:
    """The running listeners; ``close()`` stops them and removes the socket file."""

    runners: list[web.AppRunner] = field(default_factory=list)
    unix: unixsocket.UnixListener | None = None
    tcp_addresses: list[tuple[str, int]] = field(default_factory=list)
    admission: Admission | None = None

    @property
    def unix_path(self) -> str | None:
        return self.unix.path if self.unix is not None else None

    async def close(self) -> None:
        if self.admission is not None:
            await self.admission.close()
        for runner in self.runners:
            await runner.cleanup()
        if self.unix is not None:
            self.unix.close()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ApiConfigError(
            "cannot load the TLS certificate %s / key %s: %s"
            % (cert, key, getattr(exc, "strerror", None) or exc)
        ) from None
    return ctx


async def _start_unix(
    runner: web.AppRunner, path: str, group: str | None, mode: int
) -> unixsocket.UnixListener:
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ApiConfigError("no group named %r for the API socket" % group) from None
    try:
        listener = unixsocket.listen(path, mode, gid, backlog=128)  # aiohttp's own backlog
    except unixsocket.SocketInUse:
        raise ApiConfigError("another process already serves the API socket %s" % path) from None
    except OSError as exc:
        raise ApiConfigError(
            "cannot listen for the API on %s: %s" % (path, exc.strerror or exc)
        ) from None
    try:
        await web.SockSite(runner, listener.sock).start()
    except BaseException:
        listener.close()
        raise
    return listener


async def start(
    app: web.Application, config: object, guests: Callable[[], int] = lambda: 0
) -> ApiServer:
    """Bind the unix socket (and TCP with TLS when configured); return an object with close().

    ``guests()``: how many guest channels the bridge may hold, for the descriptors the TCP
    listener must leave free (hostbridge.admission)."""
    unix_path = getattr(config, "api_socket", DEFAULT_API_SOCKET)
    tcp = getattr(config, "api_tcp", None)
    cert, key = getattr(config, "tls_cert", None), getattr(config, "tls_key", None)
    ctx = None
    if tcp:
        if not (cert and key):
            raise ApiConfigError(
                "the TCP API is served only with TLS: give --tls-cert and --tls-key"
            )
        if not app[AUTH].configured:
            raise ApiConfigError(
                "the TCP API needs credentials: give --tokens-file or --users-file"
            )
        ctx = tls_context(cert, key)
    # aiohttp's access log writes a line per request: thousands a second into the journal under
    # load (~10% of the bridge's time in the benchmark's profile). Only at -d 2 and above.
    quiet: dict[str, Any] = {} if getattr(config, "debug", 1) >= 2 else {"access_log": None}
    server = ApiServer()

    async def serving(served: web.Application) -> web.AppRunner:
        runner = web.AppRunner(served, handle_signals=False, **quiet)
        await runner.setup()
        server.runners.append(runner)
        # The runner's server makes one handler per connection: make them ours (JSON errors).
        assert runner.server is not None
        runner.server.__class__ = _JsonErrorServer
        return runner

    try:
        if unix_path:
            server.unix = await _start_unix(
                await serving(_trusted(app)),
                unix_path,
                getattr(config, "api_group", None),
                getattr(config, "api_socket_mode", 0o660),
            )
            log.info("API listening on unix socket %s", unix_path)
        if tcp:
            host, port = tcp
            assert ctx is not None
            # Our own accept loop, not aiohttp's TCPSite: it admits or refuses each connection
            # so that network clients can never take the bridge's last descriptors. It serves
            # ``app`` itself, whose middleware authenticates every request.
            runner = await serving(app)
            assert runner.server is not None
            server.admission = Admission(
                runner.server,
                ctx,
                getattr(config, "api_limits", None) or ApiLimits(),
                guests,
            )
            server.tcp_addresses.append(await server.admission.start(host, int(port)))
            log.info("API listening on https://%s:%s", host, port)
    except OSError as exc:
        await server.close()
        raise ApiConfigError("cannot listen for the API: %s" % (exc.strerror or exc)) from None
    except BaseException:
        await server.close()
        raise
    return server
