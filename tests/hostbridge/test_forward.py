"""hostbridge.forward: a request forwarded to the VM's owner, through real servers on 127.0.0.1.

The owner is an aiohttp server over TLS (its handler chosen by each test and every request it
got recorded, with the connection it came on); the forwarding bridge is an aiohttp server whose
handler is Forwarder.proxy, asked by an aiohttp client, as the bridge's API is. A failure of the
forward is answered by the front as HTTP 599 with the exception's class and message, so that each
test sees what hostbridge.api would.

A certificate the forwarder does not trust is OwnerUnreachable (decided in hostbridge.forward:
nothing was sent, so the request is answered from here, and the cause is logged as such).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from hostbridge import forward
from hostbridge.errors import OwnerUnavailable
from hostbridge.forward import FORWARDED_HEADER, Forwarder, OwnerUnreachable
from tests.hostbridge.fakes import make_tls_cert
from tests.support.waiting import async_wait_for

TOKEN = "pool-token-0123456789"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """(cert, key) of the owner, which the forwarder trusts."""
    return make_tls_cert(tmp_path_factory.mktemp("owner"))


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory):
    """Another self-signed certificate for 127.0.0.1, which the forwarder does not trust."""
    return make_tls_cert(tmp_path_factory.mktemp("stranger"))


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]


@dataclass
class Scene:
    """An owner serving ``handler`` over TLS and a front forwarding every request to it."""

    cert: tuple[str, str]
    handler: Handler
    ca_file: str | None = None  # None: the owner's own certificate
    keepalive_timeout: float = 75.0
    seen: list[Seen] = field(default_factory=list)

    async def __aenter__(self) -> Scene:
        owner = web.Application()
        owner.router.add_route("*", "/{tail:.*}", self._record)
        self.owner_runner = web.AppRunner(owner, keepalive_timeout=self.keepalive_timeout)
        await self.owner_runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*self.cert)
        await web.TCPSite(self.owner_runner, "127.0.0.1", 0, ssl_context=ctx).start()
        port = self.owner_runner.addresses[0][1]
        self.url = "https://127.0.0.1:%d" % port
        self.forwarder = Forwarder(TOKEN, self.ca_file or self.cert[0], "hv2")
        front = web.Application()
        front.router.add_route("*", "/{tail:.*}", self._front)
        self.front_runner = web.AppRunner(front)
        await self.front_runner.setup()
        await web.TCPSite(self.front_runner, "127.0.0.1", 0).start()
        self.front_url = "http://127.0.0.1:%d" % self.front_runner.addresses[0][1]
        self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        await self.front_runner.cleanup()
        await self.forwarder.close()
        await self.owner_runner.cleanup()

    async def _record(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                dict(request.headers),
                await request.read(),
                request.transport.get_extra_info("peername"),  # type: ignore[union-attr]
            )
        )
        return await self.handler(request)

    async def _front(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self.forwarder.proxy(request, self.url)
        except (OwnerUnreachable, OwnerUnavailable) as exc:
            return web.json_response(
                {"raised": type(exc).__name__, "message": str(exc)}, status=599
            )

    async def call(
        self, method: str = "GET", path: str = "/v1/vms/web1", **kw: object
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """(status, headers, body) of the front's answer."""
        url = URL(self.front_url + path, encoded=True)  # sent as written, %2F in a query too
        async with self.client.request(method, url, **kw) as resp:  # type: ignore[arg-type]
            return resp.status, resp.headers, await resp.read()

    @property
    def peers(self) -> set[tuple[str, int]]:
        return {s.peer for s in self.seen}


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def raised(body: bytes) -> tuple[str, str]:
    doc = json.loads(body)
    return doc["raised"], doc["message"]


def test_the_owners_answer_should_pass_through_unchanged_with_the_pool_token(cert):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            status=409,
            body=b'{"error": {"code": "busy"}}',
            headers={"Content-Type": "application/json", "Retry-After": "7", "X-Other": "y"},
        )

    async def main():
        async with Scene(cert, answer) as scene:
            status, headers, body = await scene.call(
                "POST",
                "/v1/vms/web1/keys/a%2Fb%20c?timeout=2&x=%2F",
                data=b'{"value": "v"}',
                headers={
                    "Authorization": "Bearer the-callers-own",
                    "Idempotency-Key": "k-1",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "X-Secret": "stays here",
                },
            )
            assert (status, body) == (409, b'{"error": {"code": "busy"}}')
            assert headers["Content-Type"] == "application/json"
            assert headers["Retry-After"] == "7"
            assert "X-Other" not in headers
            [seen] = scene.seen
            assert seen.method == "POST"
            assert seen.raw_path == "/v1/vms/web1/keys/a%2Fb%20c?timeout=2&x=%2F"
            assert seen.body == b'{"value": "v"}'
            assert seen.headers["Authorization"] == "Bearer " + TOKEN
            assert seen.headers[FORWARDED_HEADER] == "hv2"
            assert seen.headers["Idempotency-Key"] == "k-1"
            assert seen.headers["Content-Type"] == "application/json"
            assert seen.headers["Accept"] == "application/json"
            assert "X-Secret" not in seen.headers
            assert scene.forwarder.forwarded == 1

            status, _, body = await scene.call("DELETE", "/v1/vms/web1/messages/3")
            assert status == 409 and scene.seen[-1].method == "DELETE"
            assert scene.seen[-1].body == b""

    asyncio.run(main())


def test_an_answer_without_a_body_should_pass_through(cert):
    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def main():
        async with Scene(cert, empty) as scene:
            for _ in range(2):
                status, _, body = await scene.call()
                assert (status, body) == (204, b"")
            assert len(scene.peers) == 1

    asyncio.run(main())


def test_connections_should_be_kept_alive_and_reused(cert):
    async def main():
        async with Scene(cert, ok) as scene:
            for i in range(20):
                status, _, body = await scene.call("GET", "/v1/vms/web1/keys/k%d" % i)
                assert (status, body) == (200, b'{"ok": true}')
            assert len(scene.seen) == 20
            assert len(scene.peers) == 1
            assert scene.forwarder.forwarded == 20

    asyncio.run(main())


def test_an_owner_that_nothing_listens_for_should_be_unreachable(cert):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there

    async def main():
        async with Scene(cert, ok) as scene:
            scene.url = "https://127.0.0.1:%d" % port
            status, _, body = await scene.call()
            assert status == 599
            kind, message = raised(body)
            assert kind == "OwnerUnreachable"
            assert "127.0.0.1:%d" % port in message and "\n" not in message
            assert scene.forwarder.forwarded == 0

    asyncio.run(main())


def test_an_owner_that_closes_in_the_middle_of_its_answer_should_be_unavailable(cert):
    async def cut(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/cut"):
            resp = web.StreamResponse()
            resp.content_length = 100
            await resp.prepare(request)
            await resp.write(b'{"par')
            await asyncio.sleep(0.05)  # the head and the start reach the forwarder first
            assert request.transport is not None
            request.transport.abort()
            return resp
        return await ok(request)

    async def main():
        async with Scene(cert, cut) as scene:
            for method in ("GET", "POST"):
                status, _, body = await scene.call(method, "/v1/vms/web1/cut")
                assert status == 599
                kind, message = raised(body)
                assert kind == "OwnerUnavailable" and "\n" not in message
            # Asked once each (a GET cut short is not asked again), and the next request goes on
            # a new connection.
            assert [s.method for s in scene.seen] == ["GET", "POST"]
            status, _, _ = await scene.call()
            assert status == 200
            assert len(scene.peers) == 3

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["chunked", "oversized"])
def test_a_chunked_or_oversized_answer_should_be_refused_and_its_connection_dropped(cert, kind):
    async def odd(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/odd"):
            resp = web.StreamResponse()
            if kind == "chunked":
                resp.enable_chunked_encoding()
            else:
                resp.content_length = forward.MAX_ANSWER + 1
            await resp.prepare(request)
            await resp.write(b"{}")
            if kind == "chunked":
                await resp.write_eof()
            else:
                await asyncio.sleep(0.5)  # the forwarder drops the connection meanwhile
            return resp
        return await ok(request)

    async def main():
        async with Scene(cert, odd) as scene:
            assert (await scene.call())[0] == 200
            status, _, body = await scene.call("GET", "/v1/vms/web1/odd")
            assert status == 599 and raised(body)[0] == "OwnerUnavailable"
            assert (await scene.call())[0] == 200
            assert len(scene.peers) == 2

    asyncio.run(main())


def test_an_idle_connection_the_owner_closed_should_be_replaced_for_the_next_request(cert):
    async def main():
        async with Scene(cert, ok, keepalive_timeout=0.2) as scene:
            assert (await scene.call())[0] == 200
            server = scene.owner_runner.server
            assert server is not None
            await async_wait_for(lambda: not server.connections, what="the owner to close it")
            for method in ("GET", "POST"):
                status, _, body = await scene.call(method)
                assert (status, body) == (200, b'{"ok": true}')
                await async_wait_for(lambda: not server.connections, what="the owner to close it")
            assert len(scene.peers) == 3

    asyncio.run(main())


def test_a_kept_alive_connection_reset_before_the_answer_should_be_retried_only_for_a_get(cert):
    drop: list[bool] = []

    async def dropping(request: web.Request) -> web.Response:
        if drop:
            # The owner closes the kept-alive connection just as the request arrives, as one
            # whose idle time ran out does: no byte of an answer.
            drop.clear()
            assert request.transport is not None
            request.transport.abort()
        return await ok(request)

    async def main():
        async with Scene(cert, dropping) as scene:
            assert (await scene.call("GET", "/v1/vms/web1/keys/a"))[0] == 200
            drop.append(True)
            status, _, body = await scene.call("GET", "/v1/vms/web1/keys/b")
            assert (status, body) == (200, b'{"ok": true}')
            assert [s.raw_path for s in scene.seen[1:]] == ["/v1/vms/web1/keys/b"] * 2
            assert len(scene.peers) == 2

            drop.append(True)
            status, _, body = await scene.call("POST", "/v1/vms/web1/messages", data=b"{}")
            assert status == 599
            kind, message = raised(body)
            assert kind == "OwnerUnavailable" and "closed the connection" in message
            assert [s.method for s in scene.seen[3:]] == ["POST"]  # not sent twice

            status, _, _ = await scene.call("POST", "/v1/vms/web1/messages", data=b"{}")
            assert status == 200

    asyncio.run(main())


def test_concurrent_requests_should_share_a_bounded_number_of_connections(cert):
    in_flight = [0, 0]  # now, most
    # Connections whose first request is being answered: the owner's admission counts those
    # against `[api] max_per_address` (hostbridge.forward.MAX_OPENING).
    known: set[object] = set()
    new: set[object] = set()
    most_new = [0]

    async def slow(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername")  # type: ignore[union-attr]
        if peer not in known:
            known.add(peer)
            new.add(peer)
            most_new[0] = max(most_new[0], len(new))
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            in_flight[0] -= 1
            new.discard(peer)
        return await ok(request)

    async def main():
        async with Scene(cert, slow) as scene:
            answers = await asyncio.gather(
                *(scene.call("GET", "/v1/vms/web1/keys/k%d" % i) for i in range(100))
            )
            assert [a[0] for a in answers] == [200] * 100
            assert len(scene.seen) == 100
            assert len(scene.peers) <= forward.MAX_CONNECTIONS
            assert in_flight[1] <= forward.MAX_CONNECTIONS
            assert most_new[0] <= forward.MAX_OPENING
            assert scene.forwarder.forwarded == 100

    asyncio.run(main())


def test_a_certificate_that_does_not_verify_should_be_unreachable_and_said_so(
    cert, other_cert, caplog
):
    async def main():
        async with Scene(cert, ok, ca_file=other_cert[0]) as scene:
            with caplog.at_level(logging.WARNING, logger="hostbridge.forward"):
                status, _, body = await scene.call()
            assert status == 599
            kind, message = raised(body)
            assert kind == "OwnerUnreachable"
            assert "does not verify" in message and "\n" not in message
            assert scene.seen == []  # nothing reached the owner
            assert any("does not verify" in r.getMessage() for r in caplog.records)

    asyncio.run(main())


@dataclass
class RawOwner:
    """An owner that writes, for each request head it reads, the bytes ``answers`` gives for
    that request's number (0, 1, ...) over TLS, then closes when told; the connections it
    accepted are counted."""

    cert: tuple[str, str]
    answers: Callable[[int], bytes]
    close_after: bool = False
    connections: int = 0
    requests: int = 0

    async def __aenter__(self) -> RawOwner:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*self.cert)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.url = "https://127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                number, self.requests = self.requests, self.requests + 1
                writer.write(self.answers(number))
                await writer.drain()
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def _forward(forwarder: Forwarder, url: str, path: str = "/v1/vms/web1") -> web.Response:
    """Forwarder.proxy of a GET of ``path``, as the API calls it."""
    from aiohttp.test_utils import make_mocked_request

    return await forwarder.proxy(make_mocked_request("GET", path), url)


def test_bytes_after_an_answer_should_not_be_taken_for_the_next_answer(cert):
    # An owner that sent more than its answer (a broken or hostile one) must not have those
    # bytes read as the answer to the next request on the same connection: the connection is
    # dropped, and the next request gets its own answer on a new one.
    def answers(number: int) -> bytes:
        extra = _answer(b"not asked for") if number == 0 else b""
        return _answer(b'{"n": %d}' % number) + extra

    async def main():
        async with RawOwner(cert, answers) as owner:
            forwarder = Forwarder(TOKEN, cert[0], "hv2")
            try:
                first = await _forward(forwarder, owner.url)
                await asyncio.sleep(0.05)  # everything the owner wrote has arrived
                second = await _forward(forwarder, owner.url)
                third = await _forward(forwarder, owner.url)
            finally:
                await forwarder.close()
            assert [r.body for r in (first, second, third)] == [
                b'{"n": 0}',
                b'{"n": 1}',
                b'{"n": 2}',
            ]
            assert owner.connections == 2  # the second and third shared a kept-alive one

    asyncio.run(main())


@pytest.mark.parametrize(
    "answer, why",
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * (forward.MAX_HEAD + 1) + b"\r\n\r\n", "a head"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "cut short"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "cut short"),
        (b"HTTP/1.1 200 OK\r\n\r\n{}", "KeyError"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "ValueError"),
    ],
    ids=["head-over-limit", "eof-in-head", "eof-in-body", "no-length", "not-http"],
)
def test_a_broken_answer_should_be_unavailable_and_name_what_was_wrong(cert, answer, why):
    async def main():
        async with RawOwner(cert, lambda n: answer, close_after=True) as owner:
            forwarder = Forwarder(TOKEN, cert[0], "hv2")
            try:
                with pytest.raises(OwnerUnavailable) as e:
                    await _forward(forwarder, owner.url)
            finally:
                await forwarder.close()
            assert "broken answer" in str(e.value) and why in str(e.value)
            assert owner.requests == 1  # not asked again, not even a GET
            assert forwarder.forwarded == 0

    asyncio.run(main())
