"""What the built-in modules share: their parameters, the system they change, and main().

``System`` is the machine a module changes: its files (under ``root``, / unless
OVM_TEMPLATE_ROOT names another, as a test or an image build does) and its commands. With
OVM_TEMPLATE_COMMANDS=FILE set, commands are appended to FILE (one JSON argument list a line)
instead of being run: the tests of the files a module writes on a distribution this machine is not
(RHEL's NetworkManager, for one) use it. Nothing else does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from .. import cli
from ..common import TemplateError, read_file, remove, run_cmd, write_file


@dataclass
class Param:
    key: str
    description: str
    required: bool = False
    password: bool = False
    hidden: bool = False

    def as_dict(self) -> dict:
        d: dict = {"key": self.key, "description": self.description}
        for flag in ("required", "password", "hidden"):
            if getattr(self, flag):
                d[flag] = True
        return d


class System:
    def __init__(self, root: str | None = None, command_log: str | None = None) -> None:
        self.root = root if root is not None else os.environ.get("OVM_TEMPLATE_ROOT", "/")
        self.command_log = command_log or os.environ.get("OVM_TEMPLATE_COMMANDS") or None

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def exists(self, p: str) -> bool:
        return os.path.lexists(self.path(p))

    def read(self, p: str, default: str = "") -> str:
        return read_file(self.path(p), default)

    def write(self, p: str, text: str, mode: int = 0o644) -> None:
        write_file(self.path(p), text, mode)

    def remove(self, p: str) -> bool:
        return remove(self.path(p))

    def has_command(self, *names: str) -> str | None:
        """The first of ``names`` found in the system's sbin/bin directories."""
        for name in names:
            for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
                if os.access(self.path(os.path.join(d, name)), os.X_OK):
                    return os.path.join(d, name)
        return None

    def running(self, name: str) -> bool:
        """Whether a process of that name runs (its /proc/PID/comm, which holds 15 characters)."""
        try:
            pids = [p for p in os.listdir(self.path("/proc")) if p.isdigit()]
        except OSError:
            return False
        for pid in pids:
            if self.read("/proc/%s/comm" % pid).strip() == name[:15]:
                return True
        return False

    def run(self, argv: list[str], input: str | None = None, check: bool = True) -> str:
        if self.command_log:
            with open(self.command_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(argv) + "\n")  # never the input: it may be a secret
            return ""
        try:
            return run_cmd(argv, input=input)
        except TemplateError:
            if check:
                raise
            return ""


Pairs = dict[str, str]


class Module:
    """A built-in module: its parameters per target and a function per target."""

    def __init__(
        self,
        params: Callable[[str], list[Param]],
        targets: dict[str, Callable[[Pairs, System], None]],
    ) -> None:
        self.params = params
        self.targets = targets

    def enumerate(self, target: str) -> str:
        return json.dumps([p.as_dict() for p in self.params(target)])

    def run(self, target: str, pairs: Pairs, system: System | None = None) -> Pairs:
        self.targets[target](pairs, system or System())
        return pairs

    def main(self) -> None:
        def wrap(target: str) -> Callable[[str], str]:
            def call(param: str) -> str:
                pairs = json.loads(param)
                if not isinstance(pairs, dict):
                    raise TemplateError("the input is not a JSON object")
                return json.dumps(self.run(target, {str(k): str(v) for k, v in pairs.items()}))

            return call

        cli.main(self.enumerate, {t: wrap(t) for t in self.targets})


def value(pairs: Pairs, key: str) -> str:
    """The value of ``key``, stripped; '' when absent (the original's modules read it so)."""
    return (pairs.get(key) or "").strip()


def boolean(pairs: Pairs, key: str) -> bool | None:
    text = value(pairs, key).lower()
    if not text:
        return None
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise TemplateError("%s: not True or False" % key)
