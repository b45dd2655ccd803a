"""A guest agent played by the test: a real unix socket served in the test's own event loop.

The bridge's parts (Session, Delivery, MirrorSync, Keepalive) connect to it exactly as they
connect to QEMU's chardev socket. It speaks the protocol through ovmproto, like the real agent,
and does what a test tells it: answer hellos (with the cache identity and positions the test
sets), apply sequenced sets and deletes once, answer gets and lists, announce changes, stay
silent, refuse, or drop the link.

    guest = ScriptedGuest(path)
    await guest.start()
    guest.silent = {"ping"}          # never answer these request types
    guest.refuse["set"] = "quota"    # answer these with err CODE (refuse_once: the next one)
    guest.announce("set", "k", "v")  # a `changed` frame, gseq + 1
    await guest.drop()               # close the host's connection (it reconnects)
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from hostbridge.channels import UnixChannel
from hostbridge.config import Limits
from hostbridge.session import Session
from ovmproto.codec import Reader, encode
from ovmproto.errors import ProtocolError
from ovmproto.framing import Resync
from ovmproto.handshake import answer_hello
from ovmproto.messages import Changed, Delete, Err, Get, Hello, Item, List, Ok, Ping, Set
from tests.support.tempdirs import short_dir


class ScriptedGuest:
    def __init__(self, path: str) -> None:
        self.path = path
        self.gid = "gid-1"
        self.gseq = 0
        self.epoch: str | None = None  # the host stream it follows (from the last hello)
        self.hseq = 0  # the last host seq it applied in that stream
        self.cache: dict[str, str] = {}
        self.received: list[object] = []  # every message from the host, in order
        self.applied: list[tuple[str, str, int]] = []  # (op, key, seq) of each host change applied
        self.silent: set[str] = set()  # request types it never answers
        self.refuse: dict[str, str] = {}  # request type -> err code it answers with
        self.refuse_once: dict[str, str] = {}  # the same, for the next such request only
        self.listing_extra = b""  # bytes written right after a list answer, in the same write
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connections = 0

    async def start(self) -> ScriptedGuest:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def stop(self) -> None:
        await self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def drop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    def hellos(self) -> list[Hello]:
        return [m for m in self.received if type(m) is Hello]

    def of_type(self, cls: type) -> list:
        return [m for m in self.received if type(m) is cls]

    def send(self, data: bytes) -> None:
        assert self._writer is not None, "no host connected"
        self._writer.write(data)

    def announce(self, op: str, key: str | None = None, value: str | None = None) -> None:
        """Change the cache as a guest program would, and say so (gseq + 1)."""
        self.gseq += 1
        if op == "set":
            self.cache[key] = value
        elif op == "del":
            self.cache.pop(key, None)
        self.send(
            encode(Changed(gseq=self.gseq, op=op, ts=1.0, origin="guest", key=key, value=value))
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.drop()  # like QEMU: the newest client has the port
        self._writer = writer
        self.connections += 1
        frames = Reader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for msg in frames.feed(data):
                    if isinstance(msg, (Resync, ProtocolError)):
                        continue
                    self.received.append(msg)
                    out = self._answer(msg)
                    if out and self._writer is writer:
                        writer.write(out)
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    def _answer(self, msg: object) -> bytes:
        t = type(msg)
        if t.TYPE in self.silent:
            return b""
        code = self.refuse_once.pop(t.TYPE, None) or self.refuse.get(t.TYPE)
        if code is not None:
            return encode(Err(id=msg.id, code=code, msg="refused by the script"))
        if t is Hello:
            if msg.epoch != self.epoch:
                self.epoch, self.hseq = msg.epoch, 0
            return answer_hello(msg, "scripted 1", self.gid, self.gseq, self.epoch, self.hseq)
        if t is Ping:
            return encode(Ok(id=msg.id))
        if t is Set or t is Delete:
            if msg.seq is not None and msg.seq <= self.hseq:
                return encode(Ok(id=msg.id, seq=msg.seq, dup=True))
            if t is Set:
                self.cache[msg.key] = msg.value
            else:
                self.cache.pop(msg.key, None)
            self.hseq = msg.seq or self.hseq
            self.applied.append((t.TYPE, msg.key, msg.seq))
            return encode(Ok(id=msg.id, seq=msg.seq))
        if t is Get:
            if msg.key not in self.cache:
                return encode(Err(id=msg.id, code="not_found", msg="no such key"))
            value = self.cache[msg.key]
            return encode(Ok(id=msg.id, key=msg.key, value=value, ts=1.0, origin="guest"))
        if t is List:
            items = b"".join(
                encode(Item(id=msg.id, key=k, value=v, ts=1.0, origin="guest"))
                for k, v in self.cache.items()
            )
            ok = encode(Ok(id=msg.id, count=len(self.cache), gseq=self.gseq))
            extra, self.listing_extra = self.listing_extra, b""
            return items + ok + extra
        return b""


@contextlib.asynccontextmanager
async def linked(limits: Limits | None = None, epoch: str = "epoch-1"):
    """A ScriptedGuest and a Session attached to it over a real unix socket."""
    with short_dir() as d:
        guest = await ScriptedGuest(str(d / "chan")).start()
        session = Session("vm", limits or Limits(), epoch)
        session.attach(UnixChannel(guest.path))
        try:
            yield guest, session
        finally:
            await session.detach()
            await guest.stop()
