"""ovmd host bridge: one asyncio daemon that talks to the guest agents of many VMs.

Deliberately imports nothing: ``python -m hostbridge.daemon`` and the CLI import only what they use.
"""

# The API's unix socket: the daemon binds it, the CLIs connect to it (config.api_socket and
# $VMMESSAGE_BRIDGE change it). Written once, here, where every part of the bridge can read it.
DEFAULT_API_SOCKET = "/run/hostbridge/api.sock"

# The bounds of a request's `timeout` (seconds), for the API, the CLIs and the config's
# query_timeout alike. Below the minimum the bridge cannot honour it: a guest's answer takes a
# round trip through the channel and, for a send, an fsync on each side, and every request the
# agent leaves unanswered in time sends its link through a resync. So a timeout under it is refused
# (400 / exit 2, the message names the minimum), not turned into an agent_timeout.
TIMEOUT_MIN = 0.1
TIMEOUT_MAX = 300.0

# A send's idempotency key (the API's Idempotency-Key header, vmmessage send --id): a retry with
# the same key to the same VM is answered with the first send's outcome, never applied twice.
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_MAX = 128
_IDEMPOTENCY_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:~+/="
)


def check_idempotency_key(key: str) -> "str | None":
    """None when ``key`` may be an idempotency key, else a one-line reason (never echoing it)."""
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        return "an idempotency key is 1 to %d characters, not %d" % (IDEMPOTENCY_KEY_MAX, len(key))
    if not _IDEMPOTENCY_CHARS.issuperset(key):
        return "an idempotency key holds only letters, digits and - _ . : ~ + / ="
    return None
