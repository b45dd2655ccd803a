"""Errors the host bridge raises across its own module boundary (to the API, the CLI, the daemon).

All subclass ovmproto.errors.OvmError. Each carries ``code`` (machine-readable, docs/protocol.md
and docs/bridge.md) and ``http_status`` (what the API answers). Messages are one line and never
contain a message's value.

A class declares only its ``code``: its HTTP status comes from ovmproto.errorcodes, the one table
of codes and statuses. A class whose instances carry a code that is not its own (a guest's ``err``
code, which varies) declares ``http_status`` itself.
"""

from ovmproto import errorcodes
from ovmproto.errors import OvmError


class BridgeError(OvmError):
    code = "internal"

    @property
    def http_status(self) -> int:
        # The class's code, not the instance's: BridgeError(msg, code) may pass a guest's code on
        # (a malformed reply's "bad_frame"), but the failure is still the bridge's own.
        return errorcodes.http_status(type(self).code)


class UnknownVm(BridgeError):
    code = "unknown_vm"

    def __init__(self, name: str) -> None:
        super().__init__("no VM named %r" % (name,))
        self.name = name


class InvalidInput(BridgeError):
    """A key or value breaks ovmproto.limits; ``code`` names which limit, the message states it."""

    code = "bad_request"

    @property
    def http_status(self) -> int:
        return errorcodes.http_status(self.code, 400)


class NotFound(BridgeError):
    code = "not_found"


class AgentNotConnected(BridgeError):
    code = "agent_not_connected"


class AgentTimeout(BridgeError):
    code = "agent_timeout"


class Busy(BridgeError):
    code = "busy"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, for the API's Retry-After (None: none)


class MessageCancelled(BridgeError):
    """The message a sender waits for was cancelled (vmmessage cancel) before it was delivered."""

    code = "cancelled"


class MessageExpired(BridgeError):
    """The message a sender waits for reached its expiry before it was delivered."""

    code = "expired"


class Unauthorized(BridgeError):
    code = "unauthorized"


class RateLimited(BridgeError):
    """Too many failed authentications from one address: refused without checking anything."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyKeyReused(BridgeError):
    """A send's idempotency key was used before for a different message to the same VM."""

    code = "idempotency_key_reused"


class NotDelivered(BridgeError):
    """A retry (same idempotency key) of a message that ended undelivered (e.g. the agent
    refused it); it is not sent again."""

    code = "not_delivered"


class GuestError(BridgeError):
    """The guest answered a request with `err`; ``code`` is the guest's (e.g. "quota")."""

    # Not from the table: the code is the guest's and varies. An int attribute may stand for the
    # base's read-only property: reading it still gives an int.
    http_status: int = 409


class LinkReset(AgentNotConnected):
    """The link was lost or resynchronized while the request waited; its reply will not come."""


class StoreError(BridgeError):
    """The bridge's database failed (SQLite or the pool's PostgreSQL): what the bridge code catches
    beside sqlite3.Error. Its message is one line and never holds a message's value."""

    code = "internal"


class StoreUnavailable(StoreError):
    """The pool's shared database cannot be reached (down, restarting, failing over, or the
    network to it is cut): the request kept and changed nothing; it may be tried again."""

    code = "store_unavailable"
    retry_after = 1.0  # seconds, for the API's Retry-After


class Fenced(StoreError):
    """This bridge no longer holds VM's placement (another host claimed it with a higher fencing
    number): it must stop delivering to that VM. Nothing was written."""

    code = "not_owner"

    def __init__(self, vm: str, message: str | None = None) -> None:
        super().__init__(message or "this host no longer owns VM %r in the pool" % (vm,))
        self.vm = vm


class OwnerUnavailable(BridgeError):
    """In a pool, the VM's host took a forwarded request and then did not answer (it died or the
    network failed): the request may have reached it. A send is tried again with its idempotency
    key (never applied twice); a query may simply be asked again."""

    code = "owner_unavailable"

    def __init__(self, message: str, retry_after: float | None = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
