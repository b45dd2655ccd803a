"""Human-facing text: relative times ("2 minutes ago") and safe display of untrusted strings.

Keys and values may come from a guest, and a guest is untrusted: printed raw, an escape sequence
could rewrite the operator's terminal (move the cursor, set the title, fake a prompt), and a
bidirectional override could make text read differently from what it is. ``escape()`` makes every
such character visible as a Python-style escape (``\\x1b``, ``\\u202e``) instead.

Imports nothing: it is on the CLI's fast path, where every millisecond of import counts.
"""

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    o = ord(ch)
    if o < 0x100:
        return "\\x%02x" % o
    if o < 0x10000:
        return "\\u%04x" % o
    return "\\U%08x" % o


def escape(text: str) -> str:
    """Return ``text`` with every non-printable character shown as a visible escape.

    "Non-printable" is Python's str.isprintable(): control characters (C0, DEL, C1, so every
    terminal escape sequence loses its ESC/CSI introducer), format characters (bidi overrides,
    zero-width characters), line/paragraph separators, unassigned code points, lone surrogates, and
    spaces other than the ASCII space. Ordinary letters of any script pass through unchanged.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _plural(n: int, unit: str) -> str:
    return "%d %s%s ago" % (n, unit, "" if n == 1 else "s")


def ago(ts: float, now: float) -> str:
    """Return how long before ``now`` the UNIX time ``ts`` was, in words: "2 minutes ago".

    A time slightly in the future (clocks of host and guest disagree) reads "just now"; one far in
    the future says so rather than pretending.
    """
    delta = now - ts
    if delta < -60:
        return "in the future (the clocks disagree)"
    if delta < 1:
        return "just now"
    seconds = int(delta)
    if seconds < 60:
        return _plural(seconds, "second")
    minutes = seconds // 60
    if minutes < 60:
        return _plural(minutes, "minute")
    hours = minutes // 60
    if hours < 48:
        return _plural(hours, "hour")
    return _plural(hours // 24, "day")


def minutes_ago(ts: float, now: float) -> str:
    """The original ``ovm_vmmessage``'s form: whole minutes, always "minutes": "0 minutes ago".

    Scripts parse it (``Key set N minutes ago.``), so it never changes shape: under a minute is
    "0 minutes ago", a day is "1440 minutes ago", and a time in the future (clocks of host and
    guest disagree) counts as now.
    """
    return "%d minutes ago" % max(0, int(now - ts) // 60)
