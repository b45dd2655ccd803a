"""A lean client of the bridge's HTTP API, for the CLIs.

Over the unix socket (the default) it speaks HTTP/1.1 by hand on a ``_socket`` socket: the
``socket``, ``http.client`` and ``urllib`` modules would cost more import time than the whole
request, and ``vmmessage query`` must start about as fast as the interpreter itself. Over TCP it
uses http.client + ssl (imported only then), always with TLS and with a bearer token or a user and
password (Basic).

Errors become ApiError(code, message, status); ``exit_code()`` maps a code to the CLI's exit status
(ovmproto.errorcodes).
JSON goes through ovmproto.compactjson: the json package would import re and enum (~7 ms).

A send carries an idempotency key (random unless the caller gives one) and is tried again, with
the same key, when the connection fails, is reset or brings back a bad answer: the bridge answers
a retry with the first attempt's message, never a second one (docs/reliability.md).
"""

import os
import time

from hostbridge import DEFAULT_API_SOCKET, IDEMPOTENCY_HEADER
from ovmproto import compactjson, errorcodes

TYPE_CHECKING = False  # mypy takes a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    # One JSON object of the API (docs/api.md), as decoded.
    JsonObject = dict[str, Any]

DEFAULT_TCP_PORT = 8443
ENV_BRIDGE = "VMMESSAGE_BRIDGE"
_MAX_RESPONSE = 16 * 1024 * 1024
# The pauses between a send's attempts (each +-25%): 5 attempts at most, over about 5.5 s, which
# covers a bridge restarted by systemd (RestartSec=2); never beyond the send's own time budget.
SEND_RETRY_DELAYS = (0.5, 1.0, 2.0, 2.0)

# Error answers a send tries again (docs/pool.md): the pool's database or the VM's host was
# away a moment; the same idempotency key makes the retry safe.
RETRYABLE_CODES = ("store_unavailable", "owner_unavailable")

# The CLI's exit statuses (documented in `vmmessage --help` and docs/cli-host.md), by name.
EXIT_OK = 0
EXIT_NOT_FOUND = errorcodes.vmmessage_exit("not_found")
EXIT_USAGE = errorcodes.vmmessage_exit("usage")
EXIT_UNREACHABLE = errorcodes.vmmessage_exit("unreachable")
EXIT_TIMEOUT = errorcodes.vmmessage_exit("agent_timeout")
EXIT_NOT_CONNECTED = errorcodes.vmmessage_exit("agent_not_connected")
EXIT_UNAUTHORIZED = errorcodes.vmmessage_exit("unauthorized")
EXIT_OTHER = errorcodes.vmmessage_exit("internal")


class ApiError(Exception):
    """An error answer of the bridge, or a failure to reach it (code "unreachable").

    ``retry``: the connection failed in a way another attempt may not (refused, reset, a bad
    answer). ``sent``: the request may have reached the bridge before it failed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        retry: bool = False,
        sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry = retry
        self.sent = sent


def new_idempotency_key() -> str:
    """A random idempotency key (128 bits, hex)."""
    return os.urandom(16).hex()


def exit_code(code: str) -> int:
    """The CLI exit status for an error code (EXIT_OTHER for one the table does not know)."""
    return errorcodes.vmmessage_exit(code)


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(segment: str) -> str:
    """Percent-encode one path segment (every byte but RFC 3986's unreserved ones, '/' included)."""
    return "".join(
        chr(b) if b in _UNRESERVED else "%%%02X" % b
        for b in segment.encode("utf-8", "surrogatepass")
    )


def path(*segments: str, query: "Mapping[str, object] | None" = None) -> str:
    """``/v1/...`` from raw segments: path("vms", "x", "keys", "a/b") -> /v1/vms/x/keys/a%2Fb."""
    p = "/v1/" + "/".join(quote(s) for s in segments)
    if query:
        p += "?" + "&".join("%s=%s" % (quote(k), quote(str(v))) for k, v in query.items())
    return p


def _final(exc: ApiError, attempts: int, sent: bool, ident: str) -> ApiError:
    """A send's last error, saying how many attempts it took and, when one of them may have
    reached the bridge, how to learn the outcome without sending the message twice."""
    if exc.code not in ("unreachable", *RETRYABLE_CODES) or (attempts == 1 and not sent):
        return exc
    notes = ["%d attempt%s" % (attempts, "s" if attempts > 1 else "")]
    if sent:
        notes.append(
            "the message may have been queued: send it again with --id %s to learn its outcome "
            "without sending it twice" % ident
        )
    return ApiError(exc.code, "%s (%s)" % (exc.message, "; ".join(notes)), exc.status)


def _decode_body(status: int, body: bytes) -> "JsonObject":
    try:
        doc = compactjson.loads(body) if body else {}
    except ValueError:
        doc = None
    if status >= 400:
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            code = err["code"]
            # In a pool: the VM's host or the shared database did not answer; nothing was kept,
            # or the send's idempotency key makes another attempt safe. A send tries again.
            retry = code in RETRYABLE_CODES
            sent = code == "owner_unavailable"  # store_unavailable: nothing was kept
            raise ApiError(code, str(err.get("message", "")), status, retry=retry, sent=sent)
        raise ApiError("internal", "the bridge answered HTTP %d" % status, status)
    if not isinstance(doc, dict):
        raise ApiError(
            "internal", "the bridge answered with something that is not a JSON object", status
        )
    return doc


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise ValueError("truncated chunk header")
        size = int(data[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        start = eol + 2
        out.append(data[start : start + size])
        pos = start + size + 2


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """Split a whole HTTP/1.1 response into (status, body bytes). Pure; tested on its own."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("incomplete HTTP response")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP response")
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ValueError("truncated HTTP body")
        body = body[:length]
    return status, body


def split_hostport(hostport: str, default_port: int = DEFAULT_TCP_PORT) -> tuple[str, int]:
    """ "host", "host:port", "[v6]:port" -> (host, port); ApiError("usage") when malformed."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ApiError("usage", "bad port %r in the bridge address" % port)
    return host or "localhost", int(port) if port else default_port


class Client:
    """Talks to one bridge. ``url``: a unix socket path (or ``unix:PATH``) or ``https://host[:port]``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        cacert: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not url:
            url = DEFAULT_API_SOCKET
        self.url = url
        self.token = token
        self.user = user
        self.password = password
        self.cacert = cacert
        self.timeout = timeout
        # Where the bridge listens: a unix socket's path, or (host, port) for https.
        self._address: str | tuple[str, int]
        if url.startswith("https://"):
            hostport = url[len("https://") :].rstrip("/")
            if "/" in hostport:
                raise ApiError("usage", "a bridge URL is https://HOST[:PORT] with no path")
            self._address = split_hostport(hostport)
        elif url.startswith("http://"):
            raise ApiError(
                "usage", "plain http is not served; use https://HOST:PORT or the unix socket path"
            )
        else:
            self._address = url[len("unix:") :] if url.startswith("unix:") else url

    def request(
        self,
        method: str,
        target: str,
        body: "JsonObject | None" = None,
        timeout: float | None = None,
        headers: "Mapping[str, str] | None" = None,
    ) -> "JsonObject":
        """Send one request; return the decoded JSON object or raise ApiError."""
        payload = None if body is None else compactjson.dumps(body).encode("utf-8")
        timeout = self.timeout if timeout is None else timeout
        extra = dict(headers or {})
        address = self._address
        if isinstance(address, str):
            status, data = self._unix_request(address, method, target, payload, timeout, extra)
        else:
            status, data = self._https_request(address, method, target, payload, timeout, extra)
        return _decode_body(status, data)

    def _unix_request(
        self,
        where: str,
        method: str,
        target: str,
        payload: bytes | None,
        timeout: float,
        extra: "dict[str, str]",
    ) -> tuple[int, bytes]:
        import _socket

        head = (
            "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
            % (method, target)
        )
        for name, value in extra.items():
            head += "%s: %s\r\n" % (name, value)
        if payload is not None:
            head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(payload)
        data = (head + "\r\n").encode("ascii") + (payload or b"")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(where)
            except PermissionError:
                raise ApiError(
                    "unauthorized",
                    "permission denied on the bridge socket %s "
                    "(is your user in its group?)" % where,
                ) from None
            except OSError as exc:
                # Refused: a socket file nobody serves, as while a killed bridge restarts. No
                # file at all: no bridge is running, which waiting does not change.
                raise ApiError(
                    "unreachable",
                    "cannot connect to the bridge at %s: %s" % (where, exc.strerror or exc),
                    retry=isinstance(exc, ConnectionRefusedError),
                ) from None
            chunks = []
            total = 0
            try:
                sock.sendall(data)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > _MAX_RESPONSE:
                        raise ApiError(
                            "internal", "the bridge's answer is over %d bytes" % _MAX_RESPONSE
                        )
            except TimeoutError:
                raise ApiError(
                    "unreachable",
                    "the bridge at %s did not answer within %g s" % (where, timeout),
                    sent=True,
                ) from None
            except OSError as exc:
                raise ApiError(
                    "unreachable",
                    "lost the connection to the bridge at %s: %s" % (where, exc.strerror or exc),
                    retry=True,
                    sent=True,
                ) from None
        finally:
            sock.close()
        try:
            return parse_response(b"".join(chunks))
        except ValueError as exc:
            # Typically the bridge went away mid-answer (killed, restarted).
            raise ApiError(
                "unreachable",
                "bad answer from the bridge at %s: %s" % (where, exc),
                retry=True,
                sent=True,
            ) from None

    def _https_request(
        self,
        hostport: tuple[str, int],
        method: str,
        target: str,
        payload: bytes | None,
        timeout: float,
        extra: "dict[str, str]",
    ) -> tuple[int, bytes]:
        import base64
        import http.client
        import ssl

        host, port = hostport
        where = "%s:%d" % (host, port)
        headers = {"Accept": "application/json", "Connection": "close", **extra}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        elif self.user is not None:
            cred = ("%s:%s" % (self.user, self.password or "")).encode("utf-8")
            headers["Authorization"] = "Basic " + base64.b64encode(cred).decode("ascii")
        try:
            context = ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise ApiError("usage", "cannot load the CA file %s: %s" % (self.cacert, exc)) from None
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        sent = False  # from the handshake on, the request may reach the bridge
        try:
            conn.connect()
            sent = True
            conn.request(method, target, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read(_MAX_RESPONSE + 1)
            status = resp.status
        except ssl.SSLError as exc:
            raise ApiError(
                "unreachable",
                "TLS with the bridge at %s failed: %s"
                % (where, getattr(exc, "verify_message", None) or exc.reason or exc),
                # A certificate that fails now fails again; a TLS stream cut short may not.
                retry=sent,
                sent=sent,
            ) from None
        except TimeoutError:
            raise ApiError(
                "unreachable",
                "the bridge at %s did not answer within %g s" % (where, timeout),
                sent=sent,
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(
                "unreachable",
                "cannot reach the bridge at %s: %s"
                % (where, getattr(exc, "strerror", None) or exc),
                retry=sent or isinstance(exc, ConnectionRefusedError),
                sent=sent,
            ) from None
        finally:
            conn.close()
        return status, data

    # The API, one method per operation (paths and bodies as docs/api.md and openapi.json).

    def health(self) -> "JsonObject":
        return self.request("GET", "/v1/health")

    def vms(self) -> "list[JsonObject]":
        vms: list[JsonObject] = self.request("GET", "/v1/vms")["vms"]
        return vms

    def vm(self, name: str) -> "JsonObject":
        return self.request("GET", path("vms", name))

    def send(
        self,
        vm: str,
        key: str,
        value: str,
        *,
        log: bool = True,
        queue: bool = True,
        timeout: float | None = None,
        expires: float | None = None,
        idempotency_key: str | None = None,
    ) -> "JsonObject":
        """Send, and try again after a failed connection, a reset or a bad answer (at most
        len(SEND_RETRY_DELAYS) times, within the time one attempt would have had): every attempt
        carries the same idempotency key (a random one unless given), so the bridge applies the
        message once and answers a retry with its outcome."""
        body: JsonObject = {"key": key, "value": value, "log": log, "queue": queue}
        if timeout is not None:
            body["timeout"] = timeout
        if expires is not None:
            body["expires"] = expires
        ident = idempotency_key or new_idempotency_key()
        target = path("vms", vm, "messages")
        deadline = time.monotonic() + self._wait(timeout)
        sent = False  # whether a failed attempt may have reached the bridge
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.request(
                    "POST",
                    target,
                    body,
                    timeout=max(deadline - time.monotonic(), 0.1),
                    headers={IDEMPOTENCY_HEADER: ident},
                )
            except ApiError as exc:
                sent = sent or exc.sent
                pause = 0.0
                if exc.retry and attempt <= len(SEND_RETRY_DELAYS):
                    # +-25%, so that the senders a restart cut off do not come back in step.
                    pause = SEND_RETRY_DELAYS[attempt - 1] * (0.75 + os.urandom(1)[0] / 510)
                if not pause or time.monotonic() + pause >= deadline:
                    raise _final(exc, attempt, sent, ident) from None
            time.sleep(pause)

    def query(self, vm: str, key: str, *, timeout: float | None = None) -> "JsonObject":
        q = {"timeout": timeout} if timeout is not None else None
        return self.request(
            "GET", path("vms", vm, "keys", key, query=q), timeout=self._wait(timeout)
        )

    def keys(self, vm: str) -> "JsonObject":
        return self.request("GET", path("vms", vm, "keys"))

    def delete(self, vm: str, key: str) -> "JsonObject":
        return self.request("DELETE", path("vms", vm, "keys", key))

    def queue(self, vm: str, limit: int | None = None) -> "JsonObject":
        q = {"limit": limit} if limit is not None else None
        return self.request("GET", path("vms", vm, "messages", query=q))

    def cancel(self, vm: str, seq: int | None = None) -> "JsonObject":
        """Cancel the VM's undelivered message ``seq``, or every one (None)."""
        if seq is None:
            return self.request("DELETE", path("vms", vm, "messages"))
        return self.request("DELETE", path("vms", vm, "messages", str(seq)))

    def audit(self, vm: str, limit: int | None = None) -> "JsonObject":
        q = {"limit": limit} if limit is not None else None
        return self.request("GET", path("vms", vm, "audit", query=q))

    def events(
        self, since: int | None = None, vm: str | None = None, timeout: float = 0.0
    ) -> "JsonObject":
        """The change stream's events after ``since`` (None: only new ones), of ``vm`` only when
        given, waiting up to ``timeout`` seconds for the first: {"events": [...], "last": id}."""
        q: dict[str, object] = {"timeout": timeout}
        if since is not None:
            q["since"] = since
        if vm is not None:
            q["vm"] = vm
        return self.request("GET", path("events", query=q), timeout=self._wait(timeout))

    def _wait(self, agent_timeout: float | None) -> float:
        # The bridge waits for the agent up to agent_timeout; allow it that plus a margin.
        if agent_timeout is None:
            return self.timeout
        return max(self.timeout, agent_timeout + 10.0)
