"""Module `user`: accounts and their ssh keys. Keys, N the account's index from 0:

    com.oracle.linux.user.name.N                 the login (required for the index; may be root)
    com.oracle.linux.user.password.N             plain or {crypt}HASH (a password key)
    com.oracle.linux.user.uid.N                  its uid, for a new account
    com.oracle.linux.user.group.N                its primary group (created if missing)
    com.oracle.linux.user.groups.N               more groups, comma-separated (must exist)
    com.oracle.linux.user.shell.N                its shell (must be in /etc/shells)
    com.oracle.linux.user.ssh-authorized-keys.N  public keys, one a line: its authorized_keys

The original's user module keys were not recovered; these follow its naming. An existing account
is updated (password, groups, keys), never recreated. authorized_keys is replaced by the keys given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..common import TemplateError
from . import passwords, validate
from .base import Module, Pairs, Param, System, value

P = "com.oracle.linux.user."
MAX_USERS = 32
FIELDS = ("name", "password", "uid", "group", "groups", "shell", "ssh-authorized-keys")


@dataclass
class Account:
    name: str
    password: tuple[str, bool] | None = None
    uid: int | None = None
    group: str = ""
    groups: list[str] = field(default_factory=list)
    shell: str = ""
    keys: list[str] | None = None


def params(target: str) -> list[Param]:
    if target not in ("configure", "reconfigure"):
        return []
    return [
        Param(P + "name.0", "Login of the first account"),
        Param(P + "password.0", "Its password (or {crypt}HASH)", password=True),
        Param(P + "uid.0", "Its uid (new account)"),
        Param(P + "group.0", "Its primary group"),
        Param(P + "groups.0", "Its other groups, comma-separated"),
        Param(P + "shell.0", "Its shell"),
        Param(P + "ssh-authorized-keys.0", "Its ssh public keys, one a line"),
    ]


def _group_names(system: System) -> set[str]:
    return {line.split(":")[0] for line in system.read("/etc/group").splitlines() if ":" in line}


def plan(pairs: Pairs, system: System) -> list[Account]:
    accounts = []
    groups = _group_names(system)
    shells = {s.strip() for s in system.read("/etc/shells").splitlines() if s.startswith("/")}
    for n in range(MAX_USERS):
        k = {f: "%s%s.%d" % (P, f, n) for f in FIELDS}
        if not any(value(pairs, key) for key in k.values()):
            continue
        if not value(pairs, k["name"]):
            raise TemplateError(
                "%s: required with the other user keys of index %d" % (k["name"], n)
            )
        a = Account(validate.user_name(k["name"], value(pairs, k["name"])))
        if pairs.get(k["password"]):
            a.password = validate.password(k["password"], pairs[k["password"]])
        if value(pairs, k["uid"]):
            if not value(pairs, k["uid"]).isdigit() or not 0 < int(value(pairs, k["uid"])) < 2**31:
                raise TemplateError("%s: not a uid (a number from 1)" % k["uid"])
            a.uid = int(value(pairs, k["uid"]))
        if value(pairs, k["group"]):
            a.group = validate.user_name(k["group"], value(pairs, k["group"]))
        for g in validate.comma_list(value(pairs, k["groups"])):
            if validate.user_name(k["groups"], g) not in groups:
                raise TemplateError("%s: no group named %s" % (k["groups"], g))
            a.groups.append(g)
        if value(pairs, k["shell"]):
            if value(pairs, k["shell"]) not in shells:
                raise TemplateError("%s: not a shell listed in /etc/shells" % k["shell"])
            a.shell = value(pairs, k["shell"])
        if value(pairs, k["ssh-authorized-keys"]):
            a.keys = validate.ssh_keys(k["ssh-authorized-keys"], pairs[k["ssh-authorized-keys"]])
        accounts.append(a)
    return accounts


def _passwd_entry(system: System, name: str) -> list[str] | None:
    for line in system.read("/etc/passwd").splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) >= 7:
            return fields
    return None


def _root_args(system: System) -> list[str]:
    return ["-R", system.root] if system.root not in ("", "/") else []


def _authorized_keys(system: System, a: Account) -> None:
    entry = _passwd_entry(system, a.name)
    if entry is None or a.keys is None:
        return
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    ssh_dir = os.path.join(home, ".ssh")
    system.write(os.path.join(ssh_dir, "authorized_keys"), "\n".join(a.keys) + "\n", 0o600)
    os.chmod(system.path(ssh_dir), 0o700)
    for p in (ssh_dir, os.path.join(ssh_dir, "authorized_keys")):
        os.lchown(system.path(p), uid, gid)


def configure(pairs: Pairs, system: System) -> None:
    accounts = plan(pairs, system)
    for a in accounts:
        root = _root_args(system)
        if a.group and a.group not in _group_names(system):
            system.run(["groupadd", *root, a.group])
        if _passwd_entry(system, a.name) is None:
            args = ["useradd", *root, "-m"]
            if a.uid is not None:
                args += ["-u", str(a.uid)]
            if a.group:
                args += ["-g", a.group]
            if a.groups:
                args += ["-G", ",".join(a.groups)]
            args += ["-s", a.shell or "/bin/bash", a.name]
            system.run(args)
        else:
            mod = []
            if a.group:
                mod += ["-g", a.group]
            if a.groups:
                mod += ["-a", "-G", ",".join(a.groups)]
            if a.shell:
                mod += ["-s", a.shell]
            if mod:
                system.run(["usermod", *root, *mod, a.name])
        if a.password is not None:
            passwords.set_password(system, a.name, a.password)
        if not system.command_log:
            _authorized_keys(system, a)


MODULE = Module(params, {"configure": configure, "reconfigure": configure})

if __name__ == "__main__":
    MODULE.main()
