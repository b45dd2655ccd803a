"""`ovm_vmmessage`: the original Oracle VM utility's flags and lines, over the bridge's API.

    ovm_vmmessage -u admin -p PW -h HOST -v VM -k KEY -V VALUE      send a message
    ovm_vmmessage -u admin -p PW -h HOST -v VM -q KEY               query a key

``-h`` names the bridge (as it named the manager): "localhost", "" or a path = the local unix
socket ($VMMESSAGE_BRIDGE or /run/hostbridge/api.sock; file permissions decide, -u/-p are not
needed there); any other HOST[:PORT] = https://HOST:PORT with -u/-p sent as HTTP Basic. ``-h`` is
therefore not help: ``--help`` is. Exit statuses are vmmessage's (see docs/cli-host.md).
"""

import argparse
import os
import sys
import time

from hostbridge import cli, humanize
from hostbridge.apiclient import ENV_BRIDGE, EXIT_OK, EXIT_USAGE, ApiError, Client, exit_code

PROG = "ovm_vmmessage"
BANNER = "Oracle VM VM Message utility 0.5.2."


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and the documented usage status, not argparse's usage dump.
        sys.stderr.write("%s: error: %s (see --help)\n" % (PROG, message))
        raise SystemExit(EXIT_USAGE)


def _parser():
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
    return p


def client_for(host, user, password, cacert):
    host = (host or "").strip()
    if host in ("", "localhost") or host.startswith("/"):
        return Client(host if host.startswith("/") else os.environ.get(ENV_BRIDGE))
    return Client(
        "https://" + host,
        user=user,
        password=password,
        cacert=cacert or os.environ.get(cli.ENV_CACERT),
    )


def _status_word(vm):
    # The original printed the VM's run state; what the bridge knows is whether its agent is there.
    return "Running" if vm.get("agent") == "connected" else "Not connected"


def _error(exc):
    sys.stderr.write(
        "%s: error: %s\n" % (PROG, humanize.escape(" ".join(str(exc.message).split())))
    )
    return exit_code(exc.code)


def run(args):
    if args.key is None and args.query is None:
        sys.stderr.write(
            "%s: error: give -k KEY -V VALUE to send, or -q KEY to query (see --help)\n" % PROG
        )
        return EXIT_USAGE
    if (args.key is None) != (args.value is None):
        sys.stderr.write("%s: error: -k and -V go together (see --help)\n" % PROG)
        return EXIT_USAGE
    print(BANNER, flush=True)
    try:
        client = client_for(args.host, args.user, args.password, args.cacert)
        vm = client.vm(args.vm)
    except ApiError as exc:
        return _error(exc)
    print("Connected.")
    print("VM : '%s' has status :  %s." % (humanize.escape(args.vm), _status_word(vm)), flush=True)
    if args.key is not None:
        print("Sending message.", flush=True)
        try:
            doc = client.send(args.vm, args.key, args.value)
        except ApiError as exc:
            return _error(exc)
        print(cli.send_line(doc), flush=True)
    if args.query is not None:
        print("Querying for key '%s'." % humanize.escape(args.query), flush=True)
        try:
            doc = client.query(args.vm, args.query)
        except ApiError as exc:
            return _error(exc)
        print("Query successful.")
        for line in cli.query_lines(doc, time.time()):
            print(line)
    return EXIT_OK


def main(argv=None):
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
