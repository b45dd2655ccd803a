"""Forwarding a request for a VM to the pool host that runs it (docs/pool.md).

The owner answers exactly as if it had been asked directly: the request goes as it came (method,
path, query, body, Idempotency-Key), authenticated with the pool's token, and the owner's status,
body and Retry-After come back unchanged, so a client sees the same answers and exit statuses
through any bridge. The owner never forwards a forwarded request again (FORWARDED_HEADER): two
bridges that disagree about the placement answer from the database instead of looping.

The client is our own HTTP/1.1 on an asyncio Protocol, not aiohttp's ClientSession: a forwarded
query is one small request and one small answer on a warm connection, and aiohttp's client spent
~0.25 ms of CPU a request around that. The Protocol keeps what arrives in one buffer and wakes the
waiting request as it comes (one TLS record holds a whole answer): ~45 us of CPU a request
against a TLS server in C, where asyncio's streams (readuntil, readexactly, drain) took ~50; a
bare Protocol that parses nothing takes ~28, asyncio's TLS and event loop included
(bench/forward_hop.py measures the hop).

Per owner URL a few kept-alive TLS connections (verified against the pool's CA file, or the
system's CAs) are reused, each only after a complete answer, and dropped on any error or when
bytes arrive beyond an answer (never taken for the next one). The owner's answers are always
aiohttp's: a status line, headers and a Content-Length body; anything else (chunked, oversized,
malformed) is refused.

Failures keep the caller's guarantees: OwnerUnreachable when the request cannot have reached the
owner (the caller answers it here, from the database), OwnerUnavailable (503, Retry-After) once it
may have (a send retried with its Idempotency-Key is never applied twice, wherever it goes). A
certificate that does not verify is OwnerUnreachable too, as nothing was sent: the VM stays
served from here (sends queued, queries stale) rather than failing, and the cause is logged as a
certificate to fix, not as a host that does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import cast
from urllib.parse import urlsplit

from aiohttp import web

from ovmsys.ratelimit import RateLimitedLog

from . import IDEMPOTENCY_HEADER, TIMEOUT_MAX
from .errors import InvalidInput, OwnerUnavailable

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ovmd-Forwarded-By"
# Headers of the request that the owner needs; anything else (the caller's own credentials
# first of all) stays here.
_REQUEST_HEADERS = ("Content-Type", "Accept", IDEMPOTENCY_HEADER)
_RESPONSE_HEADERS = (("Content-Type", b"content-type"), ("Retry-After", b"retry-after"))
CONNECT_TIMEOUT = 2.0  # TCP connect and TLS handshake
# The whole exchange, waiting for a connection included. The request's own `timeout` parameter is
# what the owner honours; this only ends an owner that stopped answering.
TOTAL_TIMEOUT = TIMEOUT_MAX + 10
MAX_CONNECTIONS = 64  # per owner; beyond, a request waits for one
# Connections opened at once per owner. The owner's admission counts a connection against
# `[api] max_per_address` (16 by default) until its first request has been authenticated, and
# refuses past that: a burst of new connections would be refused at the handshake and the owner
# taken for dead. A slot is held until the first answer, or OPENING_HOLD at most (a long query
# would otherwise keep it, although the owner authenticated it long ago).
MAX_OPENING = 8
OPENING_HOLD = 1.0
# An idle connection is not reused after this long: the owner's server closes one after 75 s
# (aiohttp's keepalive_timeout), and one closed just as a request is written costs that request.
IDLE_MAX = 30.0
MAX_ANSWER = 16 * 1024 * 1024
_NO_BODY = (204, 304)
_IDEMPOTENT = ("GET", "HEAD", "DELETE")


class OwnerUnreachable(Exception):
    """The owner did not take the connection: nothing reached it, so the request may be answered
    here instead."""


class _Unanswered(Exception):
    """A connection ended (EOF or reset) before any byte of the answer."""


class _Broken(Exception):
    """The owner's answer is not one we take (cut short, malformed, chunked, oversized): said by
    the name of what went wrong, never by what the owner sent."""


# An answer's head (status line and headers) over this is refused: aiohttp's are ~200 bytes, and
# this was asyncio's StreamReader limit, which refused them before.
MAX_HEAD = 64 * 1024


class _Conn(asyncio.Protocol):
    """One kept-alive TLS connection to an owner. Whatever arrives is kept in ``buf``; the request
    waiting for an answer is woken when something arrives or the connection ends."""

    __slots__ = ("transport", "buf", "waiter", "ended", "reset", "idle_since")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False  # EOF or lost: nothing more will arrive
        self.reset: BaseException | None = None  # why it was lost, when not by a clean EOF
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if exc is not None and self.reset is None:
            self.reset = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Wait until more arrives or the connection ends."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def why_ended(self) -> str:
        return "cut short" if self.reset is None else type(self.reset).__name__

    @property
    def open(self) -> bool:
        return not self.ended and self.transport is not None and not self.transport.is_closing()

    def drop(self) -> None:
        # abort(), not close(): no TLS close_notify to wait for on a connection we give up on.
        if self.transport is not None:
            self.transport.abort()


class _Owner:
    """One owner URL: where to connect, and its connections."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise OwnerUnreachable("the pool host URL %s is not https://HOST[:PORT]" % url)
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.hostport = parts.netloc
        self.idle: list[_Conn] = []
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.opening = asyncio.Semaphore(MAX_OPENING)

    def take_idle(self) -> _Conn | None:
        """The most recently used idle connection that is still open (an owner that closed one
        while idle, restarting for instance, has been seen doing so: its reader is at EOF)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since < IDLE_MAX and conn.open and not conn.buf:
                return conn
            conn.drop()
        return None


class Forwarder:
    def __init__(self, token: str, ca_file: str | None, host: str) -> None:
        self._token = token
        self._host = host
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._owners: dict[str, _Owner] = {}
        self._closed = False
        self._warn = RateLimitedLog(log, 30.0)
        self.forwarded = 0  # requests answered by another host

    async def close(self) -> None:
        self._closed = True
        for owner in self._owners.values():
            for conn in owner.idle:
                conn.drop()
            owner.idle.clear()
        self._owners.clear()

    async def proxy(self, request: web.Request, base_url: str) -> web.Response:
        """The owner's answer to ``request``; OwnerUnreachable when it took no connection.

        Once the request may have reached the owner, a failure is OwnerUnavailable (503): a send
        retried with its Idempotency-Key is never applied twice, wherever the retry goes."""
        owner = self._owners.get(base_url)
        if owner is None:
            owner = self._owners[base_url] = _Owner(base_url)
        body = await request.read() if request.can_read_body else b""
        # The target as it came (path_qs would decode a key's %2F), unless in absolute form.
        target = request.raw_path
        if not target.startswith("/"):
            target = request.rel_url.raw_path_qs
        head = "%s %s%s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n%s: %s\r\n" % (
            request.method,
            owner.prefix,
            target,
            owner.hostport,
            self._token,
            FORWARDED_HEADER,
            self._host,
        )
        for name in _REQUEST_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                # The server's parser admits no line break in a value; were one to pass, it
                # would let a caller write headers (or a request) under the pool's token.
                if "\r" in value or "\n" in value:
                    raise InvalidInput("the %s header has a line break" % name)
                head += "%s: %s\r\n" % (name, value)
        head += "Content-Length: %d\r\n\r\n" % len(body)
        data = head.encode("utf-8", "surrogateescape") + body  # the header bytes as they came
        try:
            async with asyncio.timeout(TOTAL_TIMEOUT), owner.slots:
                status, headers, answer = await self._exchange(owner, request.method, data)
        except TimeoutError:
            raise self._busy(owner, "did not answer in %d s" % TOTAL_TIMEOUT) from None
        self.forwarded += 1
        return web.Response(status=status, body=answer, headers=headers)

    async def _exchange(
        self, owner: _Owner, method: str, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        conn = owner.take_idle()
        if conn is not None:
            try:
                return await self._round_trip(owner, conn, method, data)
            except _Unanswered:
                # The owner closed this kept-alive connection as we wrote (idle too long, or
                # restarting): it did not take the request. A GET or DELETE is asked again on
                # a fresh connection; a POST may have been read, and only its client, with the
                # Idempotency-Key, may send it again safely.
                if method not in _IDEMPOTENT:
                    raise self._busy(owner, "closed the connection") from None
        return await self._fresh(owner, method, data)

    async def _fresh(
        self, owner: _Owner, method: str, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """The exchange on a new connection, holding one of the owner's opening slots."""
        await owner.opening.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                owner.opening.release()

        timer = asyncio.get_running_loop().call_later(OPENING_HOLD, release)
        try:
            conn = await self._connect(owner)
            try:
                return await self._round_trip(owner, conn, method, data)
            except _Unanswered:
                raise self._busy(owner, "closed the connection") from None
        finally:
            timer.cancel()
            release()

    async def _connect(self, owner: _Owner) -> _Conn:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await asyncio.get_running_loop().create_connection(
                    _Conn, owner.host, owner.port, ssl=self._ssl, server_hostname=owner.host
                )
        except ssl.SSLCertVerificationError as e:
            # Nothing was sent, so the request is answered here (as for a dead owner), but a
            # certificate that does not verify is a configuration to fix, not an outage:
            # said as such, rate-limited.
            message = "the certificate of the pool host %s does not verify (%s)" % (
                owner.url,
                e.verify_message,
            )
            self._warn.warn("cert:" + owner.url, "%s; answering its VMs from here", message)
            raise OwnerUnreachable(message) from None
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            why = "timed out" if isinstance(e, TimeoutError) else e.strerror or type(e).__name__
            raise OwnerUnreachable("cannot connect to %s: %s" % (owner.url, why)) from None
        return conn

    async def _round_trip(
        self, owner: _Owner, conn: _Conn, method: str, data: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Write ``data`` on ``conn`` and read the answer. ``conn`` goes back to the owner's idle
        connections after a complete answer that lets it, and is dropped otherwise."""
        keep = False
        try:
            if not conn.open:
                raise _Unanswered()
            assert conn.transport is not None
            conn.transport.write(data)
            buf = conn.buf
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD:
                    raise _Broken("a head over %d bytes" % MAX_HEAD)
                if conn.ended:
                    # A reset before the whole head: an answer cut short is what only a
                    # crashing owner sends, and it is asked nothing again on this connection
                    # anyway. A clean EOF after part of a head is a broken answer.
                    if isinstance(conn.reset, ConnectionError) or (not buf and not conn.reset):
                        raise _Unanswered()
                    raise _Broken(conn.why_ended())
                seen = len(buf)
                await conn.more()
                end = buf.find(b"\r\n\r\n", max(0, seen - 3))
            end += 4
            if end > MAX_HEAD:
                raise _Broken("a head over %d bytes" % MAX_HEAD)
            try:
                status, fields, http11 = _parse_head(bytes(buf[:end]))
            except (ValueError, KeyError) as e:
                raise _Broken(type(e).__name__) from None
            if b"transfer-encoding" in fields:
                raise _Broken("chunked")  # aiohttp's answers have a length
            if method == "HEAD" or status in _NO_BODY:
                length = 0
            else:
                try:
                    length = int(fields[b"content-length"])  # no length: refused
                except (ValueError, KeyError) as e:
                    raise _Broken(type(e).__name__) from None
                if not 0 <= length <= MAX_ANSWER:
                    raise _Broken("over %d bytes" % MAX_ANSWER)
            while len(buf) < end + length:
                if conn.ended:
                    raise _Broken(conn.why_ended())
                await conn.more()
            answer = bytes(buf[end : end + length])
            # Bytes beyond the answer were never asked for: the connection is not reused.
            keep = (
                http11
                and len(buf) == end + length
                and fields.get(b"connection", b"").lower() != b"close"
            )
            del buf[:]
        except _Broken as e:
            raise self._busy(owner, "sent a broken answer (%s)" % e) from None
        finally:
            if keep and not self._closed and conn.open:
                conn.idle_since = time.monotonic()
                owner.idle.append(conn)
            else:
                conn.drop()
        headers = {
            name: fields[key].decode("latin-1") for name, key in _RESPONSE_HEADERS if key in fields
        }
        return status, headers, answer

    @staticmethod
    def _busy(owner: _Owner, what: str) -> OwnerUnavailable:
        return OwnerUnavailable("the VM's host %s %s; try again" % (owner.url, what))


def _parse_head(raw: bytes) -> tuple[int, dict[bytes, bytes], bool]:
    """(status, {lower-case name: value}, whether HTTP/1.1) from a response head; ValueError
    when it is not one."""
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status = int(rest[:3])
    if not version.startswith(b"HTTP/1.") or not 200 <= status <= 599:
        raise ValueError("not an HTTP answer")  # 1xx included: we never ask for 100-continue
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("a header line without a colon")
        fields[name.strip().lower()] = value.strip()
    return status, fields, version == b"HTTP/1.1"
