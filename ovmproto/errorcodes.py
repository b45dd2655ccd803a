"""Every error code, once: what it means, the API's HTTP status, and both CLIs' exit statuses.

The codes are the protocol's vocabulary (``err.code``, docs/protocol.md); the bridge's API and the
CLIs add a few of their own. Everything that turns a code into a status derives it from CODES:
hostbridge.errors (HTTP), hostbridge.apiclient (``vmmessage``/``ovm_vmmessage`` exit statuses) and
guestagent.client (``ovmd`` exit statuses). docs/api.md, docs/cli-host.md and docs/cli.md list the
same numbers for people.

Columns: HTTP status when the bridge itself fails with that code (None: never on its own; a
guest's ``err`` reaches the API as 409, hostbridge.errors.GuestError), the exit status of
vmmessage and of ovmd (None: that program never meets the code).

Both CLIs import this on their fast path: plain literals only, no imports.
"""

# fmt: off
CODES = {
    # code                      HTTP  vmmsg  ovmd   meaning
    # -- the protocol: a peer's err reply (docs/protocol.md)
    "bad_frame":              (None,  7,    2,    "not UTF-8, not JSON, or not a JSON object"),
    "frame_too_long":         (None,  7,    2,    "a frame over 65,536 bytes was discarded"),
    "bad_request":            (400,   2,    2,    "no `t` string, or a field missing or mistyped"),
    "unknown_type":           (None,  7,    2,    "the receiver does not know this `t`"),
    "unsupported_version":    (None,  7,    4,    "no common protocol version"),
    "key_too_long":           (413,   2,    2,    "key over 256 bytes of UTF-8"),
    "value_too_long":         (413,   2,    2,    "value over 8,192 bytes of UTF-8"),
    "invalid_key":            (400,   2,    2,    "empty key, `=` or a control character in it"),
    "invalid_value":          (400,   2,    2,    "value not a string"),
    "quota":                  (None,  7,    4,    "the cache holds its maximum number of keys"),
    "not_found":              (404,   1,    1,    "no such key (the API: or no such route)"),
    "timeout":                (None,  7,    1,    "a `wait` ran out of time"),
    "denied":                 (None,  7,    4,    "the local client is not allowed"),
    "busy":                   (503,   7,    4,    "too much outstanding work; try again later"),
    "internal":               (500,   7,    4,    "the daemon or the bridge failed; see its log"),
    # -- the bridge's API (docs/api.md)
    "unknown_vm":             (404,   1,    None, "no VM of that name"),
    "agent_not_connected":    (409,   5,    None, "the agent is away and the request needs it"),
    "agent_timeout":          (504,   4,    None, "the agent did not answer in time"),
    "unauthorized":           (401,   6,    None, "no or bad credentials, or no permission"),
    "rate_limited":           (429,   6,    None, "too many failed authentications from this "
                                                  "address; retry after Retry-After seconds"),
    "config":                 (500,   7,    None, "the bridge cannot run as configured"),
    "method_not_allowed":     (405,   7,    None, "no such method on that resource"),
    "request_too_large":      (413,   7,    None, "a request body over 128 KiB"),
    "unsupported_media_type": (415,   7,    None, "a request body that is not JSON"),
    "cancelled":              (410,   7,    None, "the message was cancelled before delivery"),
    "expired":                (410,   7,    None, "the message expired before delivery"),
    "idempotency_key_reused": (422,   2,    None, "a send's idempotency key, used before for "
                                                  "another message to that VM"),
    "not_delivered":          (409,   7,    None, "a retry (same idempotency key) of a message "
                                                  "that ended undelivered; not sent again"),
    "store_unavailable":      (503,   3,    None, "the pool's shared database cannot be reached; "
                                                  "nothing was kept or changed"),
    "not_owner":              (409,   7,    None, "a pool bridge asked to deliver for a VM whose "
                                                  "placement another host holds"),
    "owner_unavailable":      (503,   3,    None, "in a pool, the VM's host took the forwarded "
                                                  "request but did not answer; try again"),
    # -- the CLIs themselves, before or instead of an answer
    "wait_timeout":           (None,  1,    None, "`vmmessage wait` ran out of time"),
    "usage":                  (None,  2,    2,    "bad command line or invalid input"),
    "unreachable":            (None,  3,    3,    "cannot talk to the daemon or the bridge"),
}
# fmt: on

HTTP_STATUS = {code: row[0] for code, row in CODES.items() if row[0] is not None}
VMMESSAGE_EXIT = {code: row[1] for code, row in CODES.items() if row[1] is not None}
OVMD_EXIT = {code: row[2] for code, row in CODES.items() if row[2] is not None}


def http_status(code: str, default: int = 500) -> int:
    """The API's HTTP status for an error the bridge raises with ``code``."""
    return HTTP_STATUS.get(code, default)


def vmmessage_exit(code: str) -> int:
    """vmmessage's (and ovm_vmmessage's) exit status for ``code``; unknown: "internal"'s."""
    return VMMESSAGE_EXIT.get(code, VMMESSAGE_EXIT["internal"])


def ovmd_exit(code: str) -> int:
    """ovmd's exit status for ``code``; an unknown one is "internal"'s (the daemon refused)."""
    return OVMD_EXIT.get(code, OVMD_EXIT["internal"])
