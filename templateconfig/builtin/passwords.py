"""Setting a password: a plain one is hashed here (SHA-512 crypt, which every libxcrypt and glibc
verifies) and only the hash goes to `chpasswd -e`, on its standard input, never in arguments."""

from __future__ import annotations

import warnings

from ..common import run_cmd
from .base import System


def hash_password(plain: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # crypt: deprecated in 3.11
            import crypt
        return crypt.crypt(plain, crypt.mksalt(crypt.METHOD_SHA512))
    except ImportError:  # Python 3.13 has no crypt module
        return run_cmd(["openssl", "passwd", "-6", "-stdin"], input=plain + "\n").strip()


def set_password(system: System, user: str, checked: tuple[str, bool]) -> None:
    secret, is_hash = checked
    hashed = secret if is_hash else hash_password(secret)
    root = ["-R", system.root] if system.root not in ("", "/") else []
    system.run(["chpasswd", "-e", *root], input="%s:%s\n" % (user, hashed))
