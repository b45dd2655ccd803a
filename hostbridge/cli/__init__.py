"""`vmmessage`: the operator's command line to the host bridge's API (docs/cli-host.md).

    vmmessage send VM KEY VALUE [--no-log] [--no-queue] [--timeout S] [--expires DURATION]
                                [--id KEY]
    vmmessage query VM KEY | list | status VM | keys VM | rm VM KEY | audit VM
    vmmessage queue VM | vmmessage cancel VM SEQ | vmmessage cancel VM --all
    vmmessage sendVmMessage Vm name=X key=foo message=bar log=no      (the manager CLI's form)
    vmmessage adduser USER --users-file F | vmmessage newtoken NAME --tokens-file F

Where things are:

* here: main(), the fast path, and run_api(), through which every API command goes (the call,
  then its error line and exit status, --json, or the human lines), so both paths print the same;
* hostbridge.cli.commands: the click commands (every shape the fast path does not take);
* hostbridge.cli.manager: the manager CLI's ``sendVmMessage`` form;
* hostbridge.cli.credentials: ``adduser`` and ``newtoken`` (hostbridge.auth writes the files);
* hostbridge.render: every human line, shared with ``ovm_vmmessage`` (hostbridge.compat).

Fast path: ``vmmessage query VM KEY`` (and ``send VM KEY VALUE``) is what scripts run in loops, so
main() recognises that exact argv by hand and answers with only apiclient (``_socket`` and
ovmproto.compactjson), render and humanize imported: no click, json, re, typing, socket or asyncio.
Click (~40 ms) is imported only by hostbridge.cli.commands, for every other shape. This module and
hostbridge.render do without ``from __future__ import annotations``, which is a real import too.
"""

import os
import sys
import time

# _collections_abc is loaded by every interpreter at start-up; typing and collections.abc are not.
from _collections_abc import Callable

from hostbridge import render
from hostbridge.apiclient import ENV_BRIDGE, EXIT_OK, ApiError, Client, exit_code

TYPE_CHECKING = False  # mypy takes a name TYPE_CHECKING as true; nothing is imported at run time
if TYPE_CHECKING:
    from hostbridge.apiclient import JsonObject

PROG = "vmmessage"
ENV_TOKEN = "VMMESSAGE_TOKEN"
ENV_USER = "VMMESSAGE_USER"
ENV_PASSWORD = "VMMESSAGE_PASSWORD"
ENV_CACERT = "VMMESSAGE_CACERT"

# As a shell reports a process killed by SIGINT / SIGPIPE (128 + the signal).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

EXIT_HELP = """Exit status:
  0  success
  1  not found (unknown VM, the key is not set, no such message waiting to cancel), or a
     wait ran out of time
  2  usage error or invalid input (bad key, value too long, ...)
  3  the bridge is unreachable (no socket, connection refused, TLS failure, no answer); a send
     retries first, and then says whether the message may have been queued and the --id to
     send it again with (it is then not applied twice); or, in a pool of hosts, the pool's
     database is (nothing was kept)
  4  the agent did not answer in time
  5  the agent is not connected (send --no-queue, or rm of an unconnected VM's key)
  6  unauthorized (no or bad token / user and password, or no permission on the socket)
  7  the agent refused the message (e.g. its key quota is full), the message was cancelled
     or expired while send waited, or any other error of the bridge (busy, internal)
130  interrupted (Ctrl-C, or no answer at a password prompt)
141  stdout is a pipe nobody reads any more (quietly, as if killed by SIGPIPE)"""


def out(line: str) -> None:
    sys.stdout.write(line + "\n")


def report(exc: ApiError, prog: str = PROG) -> int:
    """Report an ApiError on one line of stderr; return its exit status."""
    sys.stderr.write(render.error_line(prog, exc.message) + "\n")
    return exit_code(exc.code)


def print_json(doc: "JsonObject") -> None:
    import json

    # ensure_ascii: a guest's string can then never put a raw control or C1 character on a terminal.
    out(json.dumps(doc, ensure_ascii=True))


def run_api(
    fetch: "Callable[[], JsonObject]",
    lines: "Callable[[JsonObject, float], list[str]]",
    *,
    as_json: bool = False,
) -> int:
    """Call ``fetch()`` (one request to the bridge); print its answer as JSON or as the human
    ``lines(answer, now)``, or its error as one line on stderr; return the exit status."""
    try:
        doc = fetch()
    except ApiError as exc:
        return report(exc)
    if as_json:
        print_json(doc)
    else:
        for line in lines(doc, time.time()):
            out(line)
    return EXIT_OK


def env_client() -> Client:
    """The client when no option is given: everything from the environment (as click's defaults)."""
    return Client(
        os.environ.get(ENV_BRIDGE),
        token=os.environ.get(ENV_TOKEN),
        user=os.environ.get(ENV_USER),
        password=os.environ.get(ENV_PASSWORD),
        cacert=os.environ.get(ENV_CACERT),
    )


def _plain(arg: str) -> bool:
    # An argument click would also read as a value; anything starting with '-' is left to click,
    # so the two parsers never disagree about an odd command line.
    return not arg.startswith("-")


def fast_path(argv: list[str]) -> int | None:
    """Run ``query VM KEY`` / ``send VM KEY VALUE`` without click; None for any other argv."""
    if len(argv) == 3 and argv[0] == "query" and _plain(argv[1]) and _plain(argv[2]):
        return run_api(lambda: env_client().query(argv[1], argv[2]), render.query_lines)
    if len(argv) == 4 and argv[0] == "send" and all(_plain(a) for a in argv[1:]):
        return run_api(lambda: env_client().send(argv[1], argv[2], argv[3]), render.send_lines)
    return None


def shielded(run: Callable[[], int]) -> int:
    """``run()``'s exit status, with Ctrl-C and a reader that went away ended quietly, as a shell
    expects (`vmmessage list | head -1`), instead of with a traceback."""
    try:
        status = run()
        sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The interpreter flushes stdout again at exit; into /dev/null, so that it stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status


def _run(argv: list[str]) -> int:
    instruction = os.environ.get("_VMMESSAGE_COMPLETE")  # the shell asks for completions
    if instruction:
        from hostbridge.cli.commands import complete

        return complete(instruction)
    status = fast_path(argv)
    if status is None:
        from hostbridge.cli.commands import click_main

        status = click_main(argv)
    return status


def main(argv: list[str] | None = None) -> int:
    """The `vmmessage` command; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shielded(lambda: _run(args))
