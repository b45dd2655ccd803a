"""A template directory with the built-in modules, a system root to change, and running the real
commands (ovm-template-config, ovm-chkconfig) on them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

from tests.support.processes import ROOT, child_env, script

BUILTIN = ("network", "datetime", "ssh", "user", "authentication", "system")


def template_dir(tmp_path, builtin=BUILTIN, extra=None):
    """TMP/template.d with the built-in scripts (enabled with ovm-chkconfig --add) and ``extra``
    {name: script text} (only installed: a test enables what it needs)."""
    d = tmp_path / "template.d"
    (d / "scripts").mkdir(parents=True)
    for name in builtin:
        shutil.copy(os.path.join(ROOT, "templateconfig", "scripts", name), d / "scripts" / name)
        assert chkconfig(d, "--add", name).returncode == 0
    for name, text in (extra or {}).items():
        path = d / "scripts" / name
        path.write_text(textwrap.dedent(text).lstrip())
        path.chmod(0o755)
    return d


def plugin(name, targets, body, interpreter="/usr/bin/env python"):
    """A module's text in the original's style: its header and a body."""
    header = "".join("# %s: %s\n" % t for t in targets.items())
    return (
        "#!%s\n### BEGIN PLUGIN INFO\n# name: %s\n%s# description: test module\n"
        "### END PLUGIN INFO\n" % (interpreter, name, header)
    ) + textwrap.dedent(body)


def chkconfig(template, *args):
    return subprocess.run(
        [script("ovm-chkconfig"), "--template-dir", str(template), *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )


def master(template, *args, stdin="", env=None, timeout=120, pass_fds=()):
    e = child_env(env)
    e.setdefault("OVM_TEMPLATE_CONFIG_LOG", os.path.join(str(template), "run.log"))
    return subprocess.run(
        [script("ovm-template-config"), "--template-dir", str(template), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        pass_fds=pass_fds,
    )


def lines(pairs):
    """``pairs`` as `ovmd -l` prints them: one object a line."""
    return "".join(json.dumps({k: v}) + "\n" for k, v in pairs.items())


def system_root(tmp_path, network="ifupdown"):
    """A small system tree to configure: accounts, shells, hosts, a zone, and the commands the
    modules look for (empty executables: with OVM_TEMPLATE_COMMANDS set nothing is run)."""
    r = tmp_path / "root"
    for d in ("etc/network/interfaces.d", "etc/ssh", "home", "usr/sbin", "usr/bin", "proc/1"):
        (r / d).mkdir(parents=True, exist_ok=True)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (r / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (r / "etc/group").write_text("root:x:0:\nsudo:x:27:\nusers:x:100:\n")
    (r / "etc/gshadow").write_text("root:*::\nsudo:*::\nusers:*::\n")
    (r / "etc/shells").write_text("/bin/sh\n/bin/bash\n")
    (r / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 template\n")
    zone = r / "usr/share/zoneinfo/Europe"
    zone.mkdir(parents=True)
    shutil.copy("/usr/share/zoneinfo/Europe/Paris", zone / "Paris")
    commands = {"ifupdown": ["ifup"], "networkd": ["networkctl"], "nm": ["nmcli"]}[network]
    for c in commands + ["ssh-keygen"]:
        (r / "usr/sbin" / c).write_text("#!/bin/sh\n")
        (r / "usr/sbin" / c).chmod(0o755)
    comm = {"ifupdown": "systemd", "networkd": "systemd-network", "nm": "NetworkManager"}[network]
    (r / "proc/1/comm").write_text(comm + "\n")
    return r


def verifies(plain, hashed):
    """Whether ``plain`` matches the crypt(3) hash ``hashed`` (the C library's crypt, as login
    checks it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt: deprecated in 3.11
        import crypt
    return crypt.crypt(plain, hashed) == hashed


def commands(path):
    """The commands a module asked for (OVM_TEMPLATE_COMMANDS), one argument list each."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]
