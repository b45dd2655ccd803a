"""The pool key: 32 random bytes every bridge of a pool shares (docs/pool.md, "Secrets").

It does two things, each with a key of its own derived from it:

- seal() / open(): AES-256-GCM of a log=no value before it reaches the shared database, so that
  the database, its WAL, replicas and backups hold only ciphertext. The caller binds the row's
  identity (VM, seq, key) as associated data: a ciphertext moved to another row fails to open.
- api_token(): the bearer token the bridges of a pool present to each other's API, an HMAC of a
  fixed label, so that no second secret needs distributing.

The key never appears in an error message, a repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import StoreError

KEY_SIZE = 32
NONCE_SIZE = 12  # GCM's standard nonce; random per value (2^-32 collision bound far away)
SEALED_PREFIX = "v1:"
_TOKEN_LABEL = b"ovmd pool api token v1"
_UNSEALABLE = "a log=no value in the pool database cannot be decrypted (wrong pool key?)"


class PoolKey:
    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError("a pool key is exactly %d bytes" % KEY_SIZE)
        self._key = key
        self._aead = AESGCM(key)

    def __repr__(self) -> str:  # never the key
        return "PoolKey(...)"

    @classmethod
    def load(cls, path: str) -> PoolKey:
        """The key in file ``path``: base64 of 32 bytes (whitespace ignored), mode 600 or
        stricter. ConfigError (one line, never the key) otherwise."""
        from .config import ConfigError

        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError("cannot read the pool key %s: %s" % (path, e.strerror)) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError("pool key %s is not a regular file" % path)
            # Checked before reading: a key others could read must not be used, even once.
            if mode & 0o077:
                raise ConfigError(
                    "pool key %s must not be readable by group or others (chmod 600)" % path
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(4096)
        except OSError as e:
            raise ConfigError("cannot read the pool key %s: %s" % (path, e.strerror)) from None
        finally:
            os.close(fd)
        try:
            key = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_SIZE:
            raise ConfigError(
                "pool key %s is not base64 of %d bytes (make one with: head -c 32 /dev/urandom "
                "| base64)" % (path, KEY_SIZE)
            )
        return cls(key)

    @staticmethod
    def generate() -> str:
        """A new key, as the base64 text a key file holds."""
        return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")

    def seal(self, plaintext: str, aad: bytes) -> str:
        """``plaintext`` encrypted and authenticated, with ``aad`` bound to it: "v1:" + base64 of
        the nonce and the ciphertext (with its tag)."""
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad)
        return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, aad: bytes) -> str:
        """The plaintext of seal()'s output under the same ``aad``; StoreError when it is not
        one (another key, another row's aad, altered)."""
        try:
            if not sealed.startswith(SEALED_PREFIX):
                raise ValueError("not sealed")
            data = base64.b64decode(sealed[len(SEALED_PREFIX) :], validate=True)
            if len(data) < NONCE_SIZE + 16:  # a nonce and a tag at least
                raise ValueError("too short")
            plain = self._aead.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad)
            return plain.decode("utf-8")
        except (InvalidTag, ValueError, binascii.Error, UnicodeDecodeError):
            raise StoreError(_UNSEALABLE) from None

    def api_token(self) -> str:
        """The bearer token of the pool's bridges (hex), the same on every bridge with this key."""
        return hmac.new(self._key, _TOKEN_LABEL, hashlib.sha256).hexdigest()
