"""`ovm-template-config [option] target`: the master command of template configuration.

Exit status: 0 every module succeeded; 1 a module failed or was killed after its timeout (the
others still ran); 2 usage; 3 the agent could not be reached for its keys; 4 the input is not
key/value JSON. docs/template-config.md documents it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pprint
import sys
from collections.abc import Sequence

from guestagent.client import ClientError

from . import MODULE_TIMEOUT, TARGETS, VERSION
from .cliargs import Parser, Usage
from .common import TemplateError
from .log import Log
from .plugins import Registry
from .report import Reporter
from .runner import ModuleResult, enumerate_module, run_target, selected

EXIT_FAILED, EXIT_USAGE, EXIT_AGENT, EXIT_INPUT = 1, 2, 3, 4


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="ovm-template-config",
        description="Run a template configuration target: every module enabled for it, in "
        "priority order, with the key/values from the agent (default) or the input given.",
    )
    p.add_argument("--version", action="version", version="ovm-template-config " + VERSION)
    p.add_argument("-e", "--enumerate", action="store_true", help="list the keys the modules take")
    p.add_argument("--human-readable", action="store_true", help="with -e: a Python literal")
    p.add_argument("-s", "--script", metavar="NAME", help="run module NAME only")
    p.add_argument("--stdin", action="store_true", help="read key/values as JSON on stdin")
    p.add_argument("--console-input", action="store_true", help="ask for each key on the terminal")
    p.add_argument("--ovf-transport-iso", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", metavar="FD", type=int, help="read key/values from descriptor FD")
    p.add_argument("--output", metavar="FD", type=int, help="write the result to descriptor FD")
    p.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=MODULE_TIMEOUT,
        help="kill a module after this long (default %g)" % MODULE_TIMEOUT,
    )
    p.add_argument("--config", metavar="FILE", help="the agent's configuration (its socket)")
    p.add_argument("--socket", metavar="PATH", help="the agent's socket (default: its config's)")
    p.add_argument("target", choices=TARGETS, metavar="target", help=", ".join(TARGETS))
    return p


def parse_pairs(text: str) -> dict[str, str]:
    """Key/values from `ovmd -l` output (one object a line) or one object holding every pair;
    later lines win. ValueError (one line) when it is not that."""
    pairs: dict[str, str] = {}
    text = text.strip()
    if not text:
        return pairs
    try:
        objects = [json.loads(text)]
    except ValueError:
        objects = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objects.append(json.loads(line))
                except ValueError:
                    raise ValueError("line %d is not JSON" % n) from None
    for obj in objects:
        if not isinstance(obj, dict):
            raise ValueError("a JSON value other than an object of key/values")
        for k, v in obj.items():
            if not isinstance(v, str):
                v = json.dumps(v) if not isinstance(v, bool) else str(v)
            pairs[str(k)] = v
    return pairs


def _read_fd(fd: int) -> str:
    with os.fdopen(fd, "rb", closefd=True) as f:
        return f.read().decode("utf-8")


def _console(registry: Registry, target: str, only: str | None, pairs: dict) -> dict:
    """Ask on the terminal for each key a module takes and does not hide (passwords unechoed)."""
    for _, plugin in selected(registry, target, only):
        for param in enumerate_module(plugin, target):
            key = param.get("key") if isinstance(param, dict) else None
            if not key or param.get("hidden") or key in pairs:
                continue
            prompt = "%s [%s]: " % (param.get("description") or key, key)
            value = getpass.getpass(prompt) if param.get("password") else input(prompt)
            if value:
                pairs[key] = value
    return pairs


def _fail(status: int, text: str) -> int:
    """Say why on one line of stderr; return the exit status."""
    sys.stderr.write("ovm-template-config: %s\n" % text)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_intermixed_args(argv)
    except Usage as e:
        return _fail(EXIT_USAGE, str(e))
    if args.ovf_transport_iso:
        return _fail(EXIT_USAGE, "--ovf-transport-iso is not supported")
    registry = Registry(args.template_dir)
    try:
        selected(registry, args.target, args.script)  # a bad --script before any input is read
        if args.enumerate:
            return _enumerate(registry, args)
        pairs = _input(registry, args)
    except TemplateError as e:
        return _fail(EXIT_USAGE, str(e))
    except ValueError as e:
        return _fail(EXIT_INPUT, "the input: %s" % e)
    except _AgentUnreachable as e:
        return _fail(EXIT_AGENT, str(e))
    log = Log()
    log.line("%s: start%s" % (args.target, " (module %s)" % args.script if args.script else ""))
    reporter = _reporter(args)

    def report(r: ModuleResult) -> None:
        text = "%s: %s %s%s" % (args.target, r.name, r.status, ": " + r.error if r.error else "")
        log.line(text + " (%.1fs)" % r.seconds)
        print(text, flush=True)
        if reporter is not None:
            reporter.module(r)

    try:
        if reporter is not None:
            reporter.reset("running")
            reporter.running(pairs)
        try:
            result, results = run_target(
                registry, args.target, pairs, args.script, args.timeout, on_result=report
            )
        finally:
            if reporter is not None and args.target in SECRET_TARGETS:
                reporter.forget_secrets(registry, list(pairs))
        if reporter is not None:
            reporter.finish(results)
    except TemplateError as e:
        return _fail(EXIT_USAGE, str(e))
    except ClientError as e:
        return _fail(EXIT_AGENT, "the agent: %s" % e)
    failed = [r for r in results if r.status != "ok"]
    log.line("%s: done, %d module(s), %d failed" % (args.target, len(results), len(failed)))
    if args.output is not None:
        with os.fdopen(args.output, "wb", closefd=True) as f:
            f.write(json.dumps(result).encode("utf-8"))
    return EXIT_FAILED if failed else 0


class _AgentUnreachable(Exception):
    pass


# Targets whose run on the agent's keys is reported to the host (not cleanup: it empties the
# cache of a sealed image, which must stay empty), and those after which secrets are deleted.
REPORTED_TARGETS = ("configure", "reconfigure", "unconfigure")
SECRET_TARGETS = ("configure", "reconfigure")


def _reporter(args: argparse.Namespace) -> Reporter | None:
    """A Reporter when the keys came from the agent and the target is reported, else None."""
    from_agent = not (args.stdin or args.input is not None or args.console_input)
    if not from_agent or args.target not in REPORTED_TARGETS:
        return None
    from .agent import Agent, socket_path

    return Reporter(Agent(args.socket or socket_path(args.config)))


def _input(registry: Registry, args: argparse.Namespace) -> dict[str, str]:
    if args.stdin:
        pairs = parse_pairs(sys.stdin.read())
    elif args.input is not None:
        pairs = parse_pairs(_read_fd(args.input))
    elif args.console_input:
        pairs = {}
    else:
        pairs = _agent_keys(args.config, args.socket)
    if args.console_input:
        pairs = _console(registry, args.target, args.script, pairs)
    return pairs


def _agent_keys(config_file: str | None, socket: str | None) -> dict[str, str]:
    from guestagent.config import ConfigError

    from .agent import Agent, socket_path

    try:
        return Agent(socket or socket_path(config_file)).keys()
    except (ClientError, ConfigError) as e:
        raise _AgentUnreachable("cannot read the agent's keys: %s" % e) from None


def _enumerate(registry: Registry, args: argparse.Namespace) -> int:
    out = []
    status = 0
    for priority, plugin in selected(registry, args.target, args.script):
        try:
            params = enumerate_module(plugin, args.target, args.timeout)
        except TemplateError as e:
            sys.stderr.write("ovm-template-config: %s: %s\n" % (plugin.name, e))
            status = EXIT_FAILED
            continue
        out.append((str(priority), plugin.name, params))
    if args.human_readable:
        pprint.pprint(out, width=100)
    else:
        print(json.dumps(out))
    return status
