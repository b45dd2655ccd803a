"""Size and content limits of keys and values, and the frame limit derived from them.

Stdlib only and cheap to import: the CLI validates input with it before it talks to the daemon.
"""

KEY_MAX = 256  # bytes of UTF-8, as the original driver
VALUE_MAX = 8192  # bytes of UTF-8, as the original driver (it refused larger with EMSGSIZE)

# The largest legal message is a value of VALUE_MAX bytes that JSON-escapes worst: every byte a
# control character written as \u00XX (6 bytes), plus a key of quotes and backslashes (2 bytes each;
# control characters are illegal in keys) and an envelope of well under a kilobyte.
_WORST_ESCAPED = VALUE_MAX * 6 + KEY_MAX * 2 + 1024
FRAME_MAX = 64 * 1024
assert FRAME_MAX >= _WORST_ESCAPED

DEFAULT_MAX_KEYS = 1024  # the guest cache's default quota
EVENT_KEY = "VMAPIEvent"  # a host message with this key is an event, not a stored key
# Keys under this prefix are the guest agent's own facts (hostname, OS, addresses: docs/cli.md,
# "Guest facts"): only the agent sets them; local programs and the host are refused.
FACTS_PREFIX = "org.ovmd.guest."

# The codes check_key() and check_value() return (ovmproto.errorcodes has every code).
KEY_TOO_LONG = "key_too_long"
VALUE_TOO_LONG = "value_too_long"
INVALID_KEY = "invalid_key"
INVALID_VALUE = "invalid_value"


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def check_key(key: object) -> "tuple[str, str] | None":
    """Return None if ``key`` is a legal key, else ``(code, one-line reason)``."""
    if not isinstance(key, str):
        return INVALID_KEY, "key must be a string"
    if not key:
        return INVALID_KEY, "key is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return INVALID_KEY, "key is not valid UTF-8"
    if size > KEY_MAX:
        return KEY_TOO_LONG, "key is %d bytes, the limit is %d bytes" % (size, KEY_MAX)
    if "=" in key:
        return INVALID_KEY, "key contains '=', which is not allowed"
    for ch in key:
        if _is_control(ch):
            return INVALID_KEY, "key contains control character U+%04X, which is not allowed" % ord(
                ch
            )
    return None


def check_value(value: object) -> "tuple[str, str] | None":
    """Return None if ``value`` is a legal value, else ``(code, one-line reason)``."""
    if not isinstance(value, str):
        return INVALID_VALUE, "value must be a string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return INVALID_VALUE, "value is not valid UTF-8"
    if size > VALUE_MAX:
        return VALUE_TOO_LONG, "value is %d bytes, the limit is %d bytes" % (size, VALUE_MAX)
    return None
