"""`ovm_vmmessage`: the original Oracle VM utility's flags and lines, over the bridge's API.

    ovm_vmmessage -u admin -p PW -h HOST -v VM -k KEY -V VALUE      send a message
    ovm_vmmessage -u admin -p PW -h HOST -v VM -q KEY               query a key

``-h`` names the bridge (as it named the manager): "localhost", "" or a path = the local unix
socket ($VMMESSAGE_BRIDGE or /run/hostbridge/api.sock; file permissions decide, -u/-p are not
needed there); any other HOST[:PORT] = https://HOST:PORT with -u/-p sent as HTTP Basic. ``-h`` is
therefore not help: ``--help`` is. Exit statuses are vmmessage's (see docs/cli-host.md).

Its lines are the original's; the shared ones (send, query, errors) come from hostbridge.render, and
"Key set N minutes ago." keeps the original's whole minutes, which scripts parse.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hostbridge import check_idempotency_key, cli, humanize, render
from hostbridge.apiclient import ENV_BRIDGE, EXIT_OK, EXIT_USAGE, ApiError, Client

TYPE_CHECKING = False  # mypy takes a name TYPE_CHECKING as true; typing is not imported at run time
if TYPE_CHECKING:
    from typing import NoReturn

PROG = "ovm_vmmessage"
BANNER = "Oracle VM VM Message utility 0.5.2."


def _usage(reason: str) -> int:
    sys.stderr.write(render.usage_line(PROG, reason, PROG) + "\n")
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and the documented usage status, not argparse's usage dump.
        raise SystemExit(_usage(message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        add_help=False,
        description="Send a message to, or query a key of, the ovmd agent in a VM (compatible "
        "with Oracle VM's ovm_vmmessage).",
        epilog=cli.EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("-u", dest="user", help="user name (for a remote bridge)")
    p.add_argument("-p", dest="password", help="password (for a remote bridge)")
    p.add_argument(
        "-h",
        dest="host",
        default="localhost",
        help="bridge host[:port]; localhost (default) or empty = the local unix socket",
    )
    p.add_argument("-v", dest="vm", required=True, help="the VM's name")
    p.add_argument("-k", dest="key", help="key of the message to send")
    p.add_argument("-V", dest="value", help="value of the message to send")
    p.add_argument("-q", dest="query", help="key to query")
    p.add_argument(
        "--cacert", help="CA certificate to verify a remote bridge (default $%s)" % cli.ENV_CACERT
    )
    p.add_argument(
        "--id",
        dest="ident",
        metavar="KEY",
        help="idempotency key of the message (default: a random one); a send with the KEY of an "
        "earlier one to the VM is answered with that message's outcome, not applied again",
    )
    return p


def client_for(host: str, user: str | None, password: str | None, cacert: str | None) -> Client:
    """The bridge ``-h HOST`` names: the local unix socket, a socket path, or https://HOST."""
    host = (host or "").strip()
    if host in ("", "localhost") or host.startswith("/"):
        return Client(host if host.startswith("/") else os.environ.get(ENV_BRIDGE))
    return Client(
        "https://" + host,
        user=user,
        password=password,
        cacert=cacert or os.environ.get(cli.ENV_CACERT),
    )


def _say(*lines: str) -> None:
    # Flushed line by line, as the original: a script (or a person) sees how far it got.
    for line in lines:
        print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    """Send and/or query as the parsed options ask; print the original's lines; the exit status."""
    if args.key is None and args.query is None:
        return _usage("give -k KEY -V VALUE to send, or -q KEY to query")
    if (args.key is None) != (args.value is None):
        return _usage("-k and -V go together")
    problem = check_idempotency_key(args.ident) if args.ident is not None else None
    if problem is not None:
        return _usage("--id: " + problem)
    _say(BANNER)
    try:
        client = client_for(args.host, args.user, args.password, args.cacert)
        vm = client.vm(args.vm)
        _say(
            "Connected.",
            "VM : '%s' has status :  %s." % (humanize.escape(args.vm), render.manager_status(vm)),
        )
        if args.key is not None:
            _say("Sending message.")
            doc = client.send(args.vm, args.key, args.value, idempotency_key=args.ident)
            _say(*render.send_lines(doc, time.time()))
        if args.query is not None:
            _say("Querying for key '%s'." % humanize.escape(args.query))
            doc = client.query(args.vm, args.query)
            _say("Query successful.", *render.query_lines(doc, time.time(), whole_minutes=True))
    except ApiError as exc:
        return cli.report(exc, PROG)
    return EXIT_OK


def _run(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """The `ovm_vmmessage` command; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    return cli.shielded(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
