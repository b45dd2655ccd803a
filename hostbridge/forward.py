"""Forwarding a request for a VM to the pool host that runs it (docs/pool.md).

The owner answers exactly as if it had been asked directly: the request goes as it came (method,
path, query, body, Idempotency-Key), authenticated with the pool's token, and the owner's status,
body and Retry-After come back unchanged, so a client sees the same answers and exit statuses
through any bridge. The owner never forwards a forwarded request again (FORWARDED_HEADER): two
bridges that disagree about the placement answer from the database instead of looping.

One aiohttp session keeps connections to the other bridges open (TLS verified against the pool's
CA file, or the system's CAs): a forwarded query costs one more HTTP round trip on a warm
connection, not a TLS handshake.
"""

from __future__ import annotations

import logging
import ssl

import aiohttp
from aiohttp import web

from . import IDEMPOTENCY_HEADER, TIMEOUT_MAX
from .errors import OwnerUnavailable

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ovmd-Forwarded-By"
# Headers of the request that the owner needs; anything else (the caller's own credentials
# first of all) stays here.
_REQUEST_HEADERS = ("Content-Type", "Accept", IDEMPOTENCY_HEADER)
_RESPONSE_HEADERS = ("Content-Type", "Retry-After")
CONNECT_TIMEOUT = 2.0


class OwnerUnreachable(Exception):
    """The owner did not take the connection: nothing reached it, so the request may be answered
    here instead."""


class Forwarder:
    def __init__(self, token: str, ca_file: str | None, host: str) -> None:
        self._token = token
        self._host = host
        context = ssl.create_default_context(cafile=ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=256, limit_per_host=64),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_MAX + 10, sock_connect=CONNECT_TIMEOUT),
            auto_decompress=False,
        )
        self.forwarded = 0  # requests answered by another host

    async def close(self) -> None:
        await self._session.close()

    async def proxy(self, request: web.Request, base_url: str) -> web.Response:
        """The owner's answer to ``request``; OwnerUnreachable when it took no connection.

        Once the request may have reached the owner, a failure is OwnerUnavailable (503): a send
        retried with its Idempotency-Key is never applied twice, wherever the retry goes."""
        headers = {h: request.headers[h] for h in _REQUEST_HEADERS if h in request.headers}
        headers["Authorization"] = "Bearer " + self._token
        headers[FORWARDED_HEADER] = self._host
        body = await request.read() if request.can_read_body else None
        try:
            async with self._session.request(
                request.method,
                base_url.rstrip("/") + request.rel_url.path_qs,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as answer:
                data = await answer.read()
                out = {h: answer.headers[h] for h in _RESPONSE_HEADERS if h in answer.headers}
                self.forwarded += 1
                return web.Response(status=answer.status, body=data, headers=out)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            # A connect that failed, or a kept-alive connection the owner had closed before
            # reading anything: the request did not reach it.
            if isinstance(e, aiohttp.ServerDisconnectedError) and body is not None:
                raise OwnerUnavailable(
                    "the VM's host %s closed the connection; try again" % base_url
                ) from None
            raise OwnerUnreachable(str(e)) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise OwnerUnavailable(
                "the VM's host %s did not answer (%s); try again" % (base_url, type(e).__name__)
            ) from None
