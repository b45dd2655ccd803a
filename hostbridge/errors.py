"""Errors the host bridge raises across its own module boundary (to the API, the CLI, the daemon).

All subclass ovmproto.errors.OvmError. Each carries ``code`` (machine-readable, docs/protocol.md
and docs/bridge.md) and ``http_status`` (what the API answers). Messages are one line and never
contain a message's value.
"""

from ovmproto import limits
from ovmproto.errors import OvmError


class BridgeError(OvmError):
    code = "internal"
    http_status = 500


class UnknownVm(BridgeError):
    code = "unknown_vm"
    http_status = 404

    def __init__(self, name):
        super().__init__("no VM named %r" % (name,))
        self.name = name


class InvalidInput(BridgeError):
    """A key or value breaks ovmproto.limits; ``code`` names which limit, the message states it."""

    code = "bad_request"
    http_status = 400

    _STATUS = {
        limits.KEY_TOO_LONG: 413,
        limits.VALUE_TOO_LONG: 413,
        limits.INVALID_KEY: 400,
        limits.INVALID_VALUE: 400,
        "bad_request": 400,
    }

    def __init__(self, message, code="bad_request"):
        super().__init__(message, code)
        self.http_status = self._STATUS.get(code, 400)


class NotFound(BridgeError):
    code = "not_found"
    http_status = 404


class AgentNotConnected(BridgeError):
    code = "agent_not_connected"
    http_status = 409


class AgentTimeout(BridgeError):
    code = "agent_timeout"
    http_status = 504


class Busy(BridgeError):
    code = "busy"
    http_status = 503


class Unauthorized(BridgeError):
    code = "unauthorized"
    http_status = 401


class GuestError(BridgeError):
    """The guest answered a request with `err`; ``code`` is the guest's (e.g. "quota")."""

    http_status = 409


class LinkReset(AgentNotConnected):
    """The link was lost or resynchronized while the request waited; its reply will not come."""
