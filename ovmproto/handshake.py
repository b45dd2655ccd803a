"""The resynchronizing handshake, from the host's side, and the guest's answer to it.

Host, on every (re)connect and after every timeout:
    hs = Handshake(request_id=next_id(), nonce=os.urandom(8).hex(), epoch=epoch)
    channel.write(hs.opening())              # RESYNC + Hello
    for each decoded message: result = hs.accept(msg)   # None until the matching reply
Everything before the reply that echoes the nonce is ignored: it may be a stale reply from an
earlier connection (docs/virtio-serial.md). Pure: the caller supplies the nonce and does the
I/O.
"""

from __future__ import annotations

from . import MIN_VERSION, PROTOCOL_VERSION
from .codec import encode
from .errors import RemoteError
from .framing import RESYNC
from .messages import Err, Hello, Ok


class HelloResult:
    """What the guest said about itself in its hello reply."""

    __slots__ = ("version", "agent", "gid", "gseq", "epoch", "hseq")

    def __init__(
        self, version: int, agent: str, gid: str, gseq: int, epoch: str | None, hseq: int
    ) -> None:
        self.version = version
        self.agent = agent
        self.gid = gid  # identity of the guest's cache; a new one means it was recreated
        self.gseq = gseq  # the guest's change counter
        self.epoch = epoch  # the host stream the guest follows
        self.hseq = hseq  # the last host seq the guest applied in that epoch

    def __repr__(self) -> str:
        return "HelloResult(v=%d, agent=%r, gid=%r, gseq=%d, epoch=%r, hseq=%d)" % (
            self.version,
            self.agent,
            self.gid,
            self.gseq,
            self.epoch,
            self.hseq,
        )


class Handshake:
    __slots__ = ("request_id", "nonce", "epoch", "version")

    def __init__(
        self,
        request_id: int,
        nonce: str,
        epoch: str | None = None,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        self.request_id = request_id
        self.nonce = nonce
        self.epoch = epoch
        self.version = version

    def opening(self) -> bytes:
        """The bytes to write: RESYNC, then the Hello."""
        return RESYNC + encode(
            Hello(id=self.request_id, v=self.version, nonce=self.nonce, epoch=self.epoch)
        )

    def accept(self, msg: object) -> HelloResult | None:
        """Return a HelloResult for the reply that echoes our nonce, None for anything else.

        Raise RemoteError if the guest refused this very hello (matching id) or negotiated a
        version we do not speak.
        """
        if type(msg) is Err and msg.id == self.request_id:
            raise RemoteError("guest refused hello: %s" % msg.msg, msg.code)
        if type(msg) is not Ok or msg.id != self.request_id or msg.nonce != self.nonce:
            return None
        v = msg.v if msg.v is not None else MIN_VERSION
        if not MIN_VERSION <= v <= self.version:
            raise RemoteError(
                "guest chose protocol version %d; we speak %d..%d" % (v, MIN_VERSION, self.version),
                "unsupported_version",
            )
        return HelloResult(
            v, msg.agent or "", msg.gid or "", msg.gseq or 0, msg.epoch, msg.hseq or 0
        )


def answer_hello(
    hello: Hello,
    agent: str,
    gid: str,
    gseq: int,
    epoch: str | None,
    hseq: int,
    max_version: int = PROTOCOL_VERSION,
) -> bytes:
    """The guest's bytes for a Hello: RESYNC then Ok (or Err if no common version).

    The leading RESYNC makes the host drop any stale partial frame in front of the reply.
    """
    if hello.v < MIN_VERSION:
        return RESYNC + encode(
            Err(
                id=hello.id,
                code="unsupported_version",
                msg="host speaks protocol %d; this agent speaks %d..%d"
                % (hello.v, MIN_VERSION, max_version),
            )
        )
    return RESYNC + encode(
        Ok(
            id=hello.id,
            v=min(hello.v, max_version),
            nonce=hello.nonce,
            agent=agent,
            gid=gid,
            gseq=gseq,
            epoch=epoch,
            hseq=hseq,
        )
    )
