"""Module `authentication`: the root password, com.oracle.linux.root-password, sent last.

Plain text, or a hash written as {crypt}HASH (yescrypt, sha512crypt, bcrypt...; an unknown
format is refused). It runs last in `configure` (priority 90), as in the original.
"""

from __future__ import annotations

from .. import ROOT_PASSWORD_KEY
from . import passwords, validate
from .base import Module, Pairs, Param, System


def params(target: str) -> list[Param]:
    if target not in ("configure", "reconfigure"):
        return []
    return [
        Param(
            ROOT_PASSWORD_KEY,
            "Root password (or {crypt}HASH)",
            required=True,
            password=True,
        )
    ]


def configure(pairs: Pairs, system: System) -> None:
    text = pairs.get(ROOT_PASSWORD_KEY) or ""
    if not text:
        return  # nothing sent: the password stays as it is
    passwords.set_password(system, "root", validate.password(ROOT_PASSWORD_KEY, text))


MODULE = Module(params, {"configure": configure, "reconfigure": configure})

if __name__ == "__main__":
    MODULE.main()
