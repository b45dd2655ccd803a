"""Authentication of API requests that arrive over TCP (the unix socket relies on file permissions).

Two kinds of credential, each from its own file, both re-read when the file changes:

* bearer tokens (``Authorization: Bearer T``): the tokens file holds one token per line, optionally
  preceded by a name and a colon (``ci:3f9a...``) so logs can say who called; ``#`` starts a
  comment. ``add_token()`` (the ``vmmessage newtoken`` command) appends a new one.
* user/password (``Authorization: Basic ...``, the ``-u/-p`` of the original ``ovm_vmmessage``): the
  users file holds ``user:scrypt$N$r$p$salt$hash`` lines (salt and hash in base64), written by
  ``add_user()`` (the ``vmmessage adduser`` command). Passwords are never stored.

Every comparison is constant-time (hmac.compare_digest), every listed token is compared (no early
exit that would reveal a prefix; the pool's token alone is compared first and answers at once, which
tells only its holder anything), and an unknown user costs the same scrypt as a known one. scrypt
is slow on purpose (~50 ms), so a verified (user, password) pair is remembered for a short while
under an HMAC with a per-process random key, never in clear.

Because scrypt is slow, wrong passwords are a way to burn the host's CPU. So:

* each source address may fail AUTH_FAILURES_BURST times, then once per 1/AUTH_FAILURES_PER_S
  seconds; past that its passwords are refused (RateLimited, 429 with Retry-After) before any
  check, a right one included: a lockout must not leave a guessing oracle open. Tokens are still
  checked (a constant-time comparison of an unguessable value: no CPU to save, nothing to guess),
  and a wrong one is a 401 that counts as a failure;
* scrypt runs on one thread of its own, so a flood takes at most one core and never the default
  executor other work uses, and at most AUTH_PENDING_MAX checks may wait for it (then Busy, 503).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from hostbridge.errors import Busy, RateLimited, Unauthorized
from ovmsys.atomicfile import fsync_directory, write_atomic
from ovmsys.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_CACHE_SECONDS = 60.0
_CACHE_MAX = 256
AUTH_FAILURES_BURST = 10  # failed authentications a source address may make in a row
AUTH_FAILURES_PER_S = 0.5  # then one more every 2 s
AUTH_SOURCES_MAX = 4096  # source addresses remembered (then the fully refilled, then the oldest go)
AUTH_PENDING_MAX = 16  # password checks waiting for the scrypt thread; more: Busy


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return the encoded salted scrypt hash of ``password`` (the part after ``user:``)."""
    salt = os.urandom(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=_HASH_BYTES)
    return "scrypt$%d$%d$%d$%s$%s" % (
        n,
        r,
        p,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (from hash_password); False if it is malformed."""
    try:
        scheme, n, r, p, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(digest, expected)


# Verified against when the user is unknown: "no such user" then takes as long as "wrong password".
_DUMMY_HASH = "scrypt$%d$%d$%d$%s$%s" % (
    SCRYPT_N,
    SCRYPT_R,
    SCRYPT_P,
    base64.b64encode(b"\0" * _SALT_BYTES).decode(),
    base64.b64encode(b"\0" * _HASH_BYTES).decode(),
)


class CredentialFileError(Exception):
    """A tokens or users file is unreadable or malformed (one line saying which and where)."""


def _check_user_name(user: str) -> None:
    if not user or ":" in user or any(not ch.isprintable() or ch.isspace() for ch in user):
        raise ValueError("a user name must be non-empty, without ':', spaces or control characters")


def add_user(path: str, user: str, password: str) -> bool:
    """Add ``user`` to the users file at ``path`` or replace their password; return True if added.

    The file is rewritten atomically with mode 0600 (ovmsys.atomicfile); OSError when it cannot be.
    """
    _check_user_name(user)
    if not password:
        raise ValueError("the password is empty")
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        pass
    entry = "%s:%s" % (user, hash_password(password))
    added = True
    out = []
    for line in lines:
        if line.split(":", 1)[0] == user and not line.startswith("#"):
            if added:
                out.append(entry)
            added = False
        else:
            out.append(line)
    if added:
        out.append(entry)
    write_atomic(path, ("\n".join(out) + "\n").encode("utf-8"))
    return added


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _check_token_name(name: str) -> None:
    # "#" first would make the line a comment, which _parse_tokens skips: a token that never works.
    if (
        not name
        or ":" in name
        or name.startswith("#")
        or any(not ch.isprintable() or ch.isspace() for ch in name)
    ):
        raise ValueError(
            "a token name must be non-empty, without ':', spaces or control characters, "
            "and must not start with '#'"
        )


def add_token(path: str, name: str) -> str:
    """Append a new token named ``name`` to the tokens file at ``path``; return the token.

    The file is created if missing and left with mode 0600 (it holds secrets). Existing lines are
    never rewritten, only appended to; the new line is fsynced before the token is returned, so a
    token the operator was shown is on disk.
    """
    _check_token_name(name)
    token = new_token()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        size = os.fstat(fd).st_size
        # A last line without its newline would otherwise run into ours and spoil both.
        lead = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        data = memoryview(lead + ("%s:%s\n" % (name, token)).encode("utf-8"))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(os.path.dirname(os.path.abspath(path)))  # when the file was just created
    return token


_Parsed = TypeVar("_Parsed")


class _WatchedFile(Generic[_Parsed]):
    """A credential file parsed again whenever its mtime/size/inode change (so no restart is needed
    to add a user or revoke a token). ``parse(lines, path)`` makes what get() returns."""

    def __init__(self, path: str | None, parse: Callable[[list[str], str], _Parsed]) -> None:
        self.path = path
        self._parse = parse
        self._stamp: tuple[int, int, int] | None = None
        self._data = parse([], path) if path else parse([], "")

    def get(self) -> _Parsed:
        if not self.path:
            return self._data
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            raise CredentialFileError("cannot read %s: %s" % (self.path, exc.strerror)) from exc
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            if stamp is None:
                log.warning(
                    "credentials file %s does not exist: nobody can log in with it", self.path
                )
                self._data = self._parse([], self.path)
            else:
                if st.st_mode & 0o007:
                    log.warning(
                        "credentials file %s is readable by others; chmod 600 it", self.path
                    )
                with open(self.path, encoding="utf-8") as f:
                    self._data = self._parse(f.read().splitlines(), self.path)
            self._stamp = stamp
        return self._data


def _parse_tokens(lines: list[str], path: str) -> list[tuple[str, bytes]]:
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.rpartition(":")
        if not sep:
            name = "token-%d" % number
        if len(token) < 16:
            log.warning("%s line %d: token shorter than 16 characters ignored", path, number)
            continue
        tokens.append((name, token.encode("utf-8")))
    return tokens


def _parse_users(lines: list[str], path: str) -> dict[str, str]:
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not encoded.startswith("scrypt$"):
            log.warning("%s line %d: not a user:scrypt$... entry, ignored", path, number)
            continue
        users[user] = encoded
    return users


class FailureLimiter:
    """A token bucket of failed authentications per source address (pure; the clock is given)."""

    def __init__(
        self,
        burst: int | None = None,
        per_s: float | None = None,
        max_sources: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # None: the module's constant at the time of the call (a test may raise it).
        self.burst = AUTH_FAILURES_BURST if burst is None else burst
        self.per_s = AUTH_FAILURES_PER_S if per_s is None else per_s
        self.max_sources = AUTH_SOURCES_MAX if max_sources is None else max_sources
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def _tokens(self, source: str, now: float) -> float:
        tokens, when = self._buckets.get(source, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - when) * self.per_s)

    def retry_after(self, source: str) -> float:
        """0 when ``source`` may try; else the seconds until it may try once more."""
        tokens = self._tokens(source, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.per_s

    def failed(self, source: str) -> None:
        now = self._clock()
        tokens = max(0.0, self._tokens(source, now) - 1.0)
        if source not in self._buckets and len(self._buckets) >= self.max_sources:
            self._forget(now)
        self._buckets.pop(source, None)
        self._buckets[source] = (tokens, now)  # re-inserted: the dict's order is by last failure

    def _forget(self, now: float) -> None:
        full = [s for s in self._buckets if self._tokens(s, now) >= self.burst]
        for s in full:
            del self._buckets[s]
        while len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]


@dataclass
class Principal:
    """Who made an authenticated request: ``kind`` is "token" or "user"."""

    kind: str
    name: str


class Authenticator:
    """Checks the Authorization header of a TCP request against the tokens and users files."""

    def __init__(
        self,
        tokens_file: str | None = None,
        users_file: str | None = None,
        pool_token: str | None = None,
    ) -> None:
        self._tokens = _WatchedFile(tokens_file, _parse_tokens)
        # The token the bridges of a pool forward each other's requests with (hostbridge.pool:
        # derived from the pool key, so it is never written anywhere).
        self._pool_token = None if pool_token is None else ("pool", pool_token.encode("ascii"))
        self._users = _WatchedFile(users_file, _parse_users)
        self._cache_key = os.urandom(32)
        self._verified: dict[bytes, float] = {}
        self.failures = FailureLimiter()
        self.scrypt_checks = 0  # password checks run (the cache spares most)
        self._pending = 0  # password checks waiting for or running on the scrypt thread
        self._scrypt: ThreadPoolExecutor | None = None
        self._warn = RateLimitedLog(log, 10.0)

    @property
    def configured(self) -> bool:
        """Whether any credential source is configured (TCP without one would let nobody in)."""
        return bool(self._tokens.path or self._users.path or self._pool_token)

    async def authenticate(self, header: str | None, source: str | None = None) -> Principal:
        """The Principal for ``header``, or raise Unauthorized (one reason, never the secret).

        With ``source`` (the client's address), failures count against that address, and an
        address over its allowance gets RateLimited without any check."""
        if source is None or not header:
            return await self._authenticate(header)
        wait = self.failures.retry_after(source)
        # A token costs a constant-time comparison and cannot be guessed: it is still checked
        # for a limited address, so automation behind a NAT keeps working while someone else
        # there fails. A password would cost a scrypt and be a guessing oracle: refused unseen.
        if wait > 0 and header.split(None, 1)[0].lower() != "bearer":
            raise self._limited(source, wait)
        try:
            return await self._authenticate(header)
        except Unauthorized as exc:
            self.failures.failed(source)
            self._warn.warn("auth_failed", "failed authentication from %s: %s", source, exc)
            raise

    def _limited(self, source: str, wait: float) -> RateLimited:
        self._warn.warn("rate_limited", "refusing credentials from %s: too many failures", source)
        return RateLimited(
            "too many failed authentications from %s; retry in %d s" % (source, wait + 0.999),
            wait,
        )

    async def _authenticate(self, header: str | None) -> Principal:
        if not header:
            raise Unauthorized(
                "authentication required: send a bearer token or a user and password"
            )
        scheme, _, credentials = header.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "bearer":
            name = self._check_token(credentials.encode("utf-8", "surrogateescape"))
            if name is None:
                raise Unauthorized("invalid token")
            return Principal("token", name)
        if scheme == "basic":
            try:
                user, sep, password = (
                    base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
                )
            except (ValueError, binascii.Error, UnicodeDecodeError):
                raise Unauthorized("malformed Basic credentials") from None
            if not sep:
                raise Unauthorized("malformed Basic credentials")
            if not await self._check_password(user, password):
                raise Unauthorized("invalid user or password")
            return Principal("user", user)
        raise Unauthorized("unsupported authorization scheme; use Bearer or Basic")

    def check_bearer(self, header: str | None) -> Principal | None:
        """The Principal of a valid ``Bearer`` token, checked here and now; None for anything else
        (no header, another scheme, a token that does not match), which authenticate() then
        answers, counting a failure against its source. A valid token is all that most requests
        carry (every request a pool forwards does): this spares them two coroutines and the
        failure table's look-up, which a token never depended on."""
        if not header:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        name = self._check_token(credentials.strip().encode("utf-8", "surrogateescape"))
        return None if name is None else Principal("token", name)

    def _check_token(self, presented: bytes) -> str | None:
        # The pool's token first, and alone when it matches: a forwarded request then costs no
        # stat() of the tokens file, and the pool keeps forwarding while that file is unreadable.
        # What this early answer tells apart is only whether the token presented is the pool's,
        # which only its holder can learn; any other token is compared with every listed one.
        if self._pool_token is not None and hmac.compare_digest(presented, self._pool_token[1]):
            return self._pool_token[0]
        found = None
        for name, token in self._tokens.get():
            # No early exit: the time taken must not depend on which token matched.
            if hmac.compare_digest(presented, token) and found is None:
                found = name
        return found

    async def _check_password(self, user: str, password: str) -> bool:
        encoded = self._users.get().get(user)
        mark = hmac.new(
            self._cache_key,
            ("%s\0%s\0%s" % (user, password, encoded)).encode("utf-8", "surrogateescape"),
            hashlib.sha256,
        ).digest()
        now = time.monotonic()
        expires = self._verified.get(mark)
        if expires is not None and expires > now and encoded is not None:
            return True
        # scrypt takes tens of milliseconds of CPU: keep it off the event loop, on its own thread.
        if self._pending >= AUTH_PENDING_MAX:
            self._warn.warn("auth_busy", "%d password checks pending; refusing more", self._pending)
            raise Busy("too many password checks pending; retry shortly", retry_after=1.0)
        if self._scrypt is None:
            self._scrypt = ThreadPoolExecutor(1, thread_name_prefix="hostbridge-scrypt")
        self._pending += 1
        self.scrypt_checks += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self._scrypt,
                verify_password,
                password,
                encoded if encoded is not None else _DUMMY_HASH,
            )
        finally:
            self._pending -= 1
        ok = ok and encoded is not None
        if ok:
            if len(self._verified) >= _CACHE_MAX:
                self._verified = {k: v for k, v in self._verified.items() if v > now}
                if len(self._verified) >= _CACHE_MAX:
                    self._verified.clear()
            self._verified[mark] = now + _CACHE_SECONDS
        return ok
