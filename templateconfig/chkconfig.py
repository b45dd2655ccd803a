"""`ovm-chkconfig`: enable and disable modules per target, as the original's tool does.

    ovm-chkconfig [--list [name]] [--add name] [--del name]
                  [--target=target[,target...] name {on|off}] [--version] [-h|--help]

Exit status: 0 done; 1 no such module, or a target it does not implement; 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import TARGETS, VERSION
from .cliargs import Parser, Usage
from .common import TemplateError
from .plugins import Registry


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="ovm-chkconfig", description="Enable template configuration modules.")
    p.add_argument("--version", action="version", version="ovm-chkconfig " + VERSION)
    p.add_argument("--list", nargs="?", const="", metavar="name", help="modules by targets")
    p.add_argument("--add", metavar="name", help="enable for every target its header declares")
    p.add_argument("--del", dest="delete", metavar="name", help="disable for every target")
    p.add_argument("--target", metavar="target[,target...]", help="with NAME on|off")
    p.add_argument("rest", nargs="*", metavar="name {on|off}")
    return p


def table(registry: Registry, only: str = "") -> str:
    names = [only] if only else registry.installed()
    enabled = {t: {n: p for p, n in registry.enabled(t)} for t in TARGETS}
    width = max([len(n) for n in names] + [14]) + 2
    lines = ["%-*s" % (width, "module") + "".join("%-13s" % t for t in TARGETS)]
    for name in names:
        registry.script(name)  # a name that is not installed: an error, not a row of "off"
        cells = []
        for t in TARGETS:
            p = enabled[t].get(name)
            cells.append("%-13s" % ("on:%02d" % p if p is not None else "off"))
        lines.append("%-*s" % (width, name) + "".join(cells))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_intermixed_args(argv)
        actions = [a for a in (args.list is not None, args.add, args.delete, args.rest) if a]
        if len(actions) != 1:
            raise Usage("give one of --list, --add NAME, --del NAME, or NAME on|off")
        if args.rest and (len(args.rest) != 2 or args.rest[1] not in ("on", "off")):
            raise Usage("expected NAME on|off")
        if args.target and not args.rest:
            raise Usage("--target goes with NAME on|off")
    except Usage as e:
        sys.stderr.write("ovm-chkconfig: %s\n" % e)
        return 2
    registry = Registry(args.template_dir)
    try:
        if args.list is not None:
            sys.stdout.write(table(registry, args.list))
        elif args.add:
            registry.add(args.add)
        elif args.delete:
            registry.delete(args.delete)
        else:
            name, state = args.rest
            plugin = registry.script(name)
            targets = args.target.split(",") if args.target else sorted(plugin.priorities)
            for t in targets:
                if t not in TARGETS:
                    sys.stderr.write("ovm-chkconfig: unknown target %s\n" % t)
                    return 2
            for t in targets:  # all checked before any link changes
                if state == "on" and t not in plugin.priorities:
                    raise TemplateError("module %s does not implement %s" % (name, t))
            for t in targets:
                registry.set_enabled(plugin, t, state == "on")
    except TemplateError as e:
        sys.stderr.write("ovm-chkconfig: %s\n" % e)
        return 1
    except OSError as e:
        sys.stderr.write("ovm-chkconfig: %s: %s\n" % (e.filename or "", e.strerror))
        return 1
    return 0
