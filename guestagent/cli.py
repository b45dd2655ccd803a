"""The ``ovmd`` command: the original tool's options (-l -g -p -r -x -e ...), our additions
(--json, -w, --events, --socket) and ``--daemon``. docs/cli.md documents it.

Two parsers, one executor. Shell scripts call ``ovmd -g KEY`` in loops, so main() first tries a
hand-written parser for the few exact argument shapes scripts use (-g KEY, -l, -p K=V..., -r KEY,
-x, each optionally after ``--socket PATH``); everything else goes to click, imported only then
(~40 ms). Both parsers produce a Plan and hand it to execute(), so both print the same bytes and
return the same exit codes. The fast path imports sys, os, the C modules _socket and _json, and
our import-free ovmproto.limits, ovmproto.errors, ovmproto.compactjson, guestagent.output,
guestagent.client and guestagent.config (no json, re, socket or click); nothing else on it may
import more.
"""

from __future__ import annotations

import os
import sys

from ovmproto import __version__
from ovmproto.limits import check_key, check_value

from . import output
from .client import DEFAULT_TIMEOUT, EXIT_OK, EXIT_USAGE, BadInput, Client, ClientError
from .config import DEFAULT_PATH as DEFAULT_CONFIG
from .config import DEFAULT_SOCKET, ConfigError, read_file

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any, TypeVar

    import click

    _T = TypeVar("_T")

PROG = "ovmd"
SOCKET_ENV = "OVMD_SOCKET"
# A process killed by SIGPIPE shows as 128 + 13 in the shell; `ovmd -l | head -1` ends so, quietly.
EXIT_BROKEN_PIPE = 141
EXIT_OUTPUT_FAILED = 5  # stdout failed otherwise (a full disk, a closed descriptor)
EXIT_INTERRUPTED = 130
EXIT_DAEMON_FAILED = 1  # --daemon: could not start (daemon.run returns the same)

EXIT_CODES_HELP = """\
Exit codes:
  0  success
  1  key not found, or a wait timed out
  2  usage error or invalid input (key or value over its limit, bad key, -p without '=')
  3  the daemon is not reachable (socket missing, refused, no permission)
  4  the daemon refused (cache full, access denied, internal error)
  5  the output could not be written
141  stdout is a pipe nobody reads any more (quietly, as if killed by SIGPIPE)"""


class Plan:
    """What one invocation asks for, whichever parser read it."""

    __slots__ = (
        "action",
        "socket",
        "config",
        "key",
        "pairs",
        "value",
        "as_json",
        "changed",
        "timeout",
    )

    def __init__(
        self,
        action: str,
        socket: str | None = None,
        config: str | None = None,
        key: str | None = None,
        pairs: Sequence[str] = (),
        value: str | None = None,
        as_json: bool = False,
        changed: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.action = action  # list, get, set, delete, clear, event, wait, events
        self.socket = socket  # --socket, or None: $OVMD_SOCKET, the config file, the default
        self.config = config  # --config: where to look for the socket path
        self.key = key
        self.pairs = pairs  # -p arguments as given ("KEY=VALUE")
        self.value = value  # -e EVENT
        self.as_json = as_json
        self.changed = changed
        self.timeout = timeout  # -w --timeout, seconds; None waits forever


# -- the executor ----------------------------------------------------------------------------------


def socket_path(
    option: str | None, config_path: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """--socket, else $OVMD_SOCKET, else `socket` in the config file's [ovmd], else the default."""
    if option:
        return option
    env = (os.environ if environ is None else environ).get(SOCKET_ENV)
    if env:
        return env
    try:
        configured = read_file(config_path or DEFAULT_CONFIG).get("socket")
    except ConfigError as e:
        raise BadInput(str(e)) from None
    return configured or DEFAULT_SOCKET


# Each returns its argument unchanged, whatever its type: _validate() also checks a Plan's
# value, which is None when the command line gave no -e.
def _valid_key(key: _T) -> _T:
    problem = check_key(key)
    if problem:
        raise BadInput(problem[1])
    return key


def _valid_value(value: _T) -> _T:
    problem = check_value(value)
    if problem:
        raise BadInput(problem[1])
    return value


def parse_pairs(args: Iterable[str]) -> list[list[str]]:
    """-p arguments to [[key, value], ...], split at the first '='.

    Raise BadInput for the first bad one; the message never shows a value.
    """
    pairs = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            # Not the argument itself: a mistyped "-p PASSWORD" must not end up in a log.
            raise BadInput("-p expects KEY=VALUE, and its argument has no '='")
        pairs.append([_valid_key(key), _valid_value(value)])
    return pairs


def _entries(items: Iterable[Mapping[str, Any]], as_json: bool) -> bytes:
    return output.entry_lines(items) if as_json else output.pair_lines(items)


def _do_list(client: Client, plan: Plan) -> bytes:
    return _entries(client.collect("list"), plan.as_json)


def _do_get(client: Client, plan: Plan) -> bytes:
    reply = client.call("get", key=plan.key)
    return _one_entry(reply, plan)


def _one_entry(reply: Mapping[str, Any], plan: Plan) -> bytes:
    value = reply.get("value")
    if type(value) is not str:
        raise ClientError("the daemon's answer has no value")
    if plan.as_json:
        return output.entry_line(
            {"key": plan.key, "value": value, "ts": reply.get("ts"), "origin": reply.get("origin")}
        )
    return output.value_line(value)


def _do_set(client: Client, plan: Plan) -> bytes:
    client.call("put", items=parse_pairs(plan.pairs))
    return b""


def _do_delete(client: Client, plan: Plan) -> bytes:
    # A key that is not there is not an error (found: false): scripts clean up with -r, and the
    # original documented no failure for it.
    client.call("del", key=plan.key)
    return b""


def _do_clear(client: Client, plan: Plan) -> bytes:
    client.call("clear")
    return b""


def _do_event(client: Client, plan: Plan) -> bytes:
    client.call("event", value=plan.value)
    return b""


def _do_wait(client: Client, plan: Plan) -> bytes:
    fields: dict[str, object] = {"key": plan.key}
    if plan.changed:
        fields["changed"] = True
    if plan.timeout is not None:
        fields["timeout"] = plan.timeout
        client.set_timeout(plan.timeout + DEFAULT_TIMEOUT)
    else:
        client.set_timeout(None)  # the daemon answers when the key comes, however long it takes
    return _one_entry(client.call("wait", **fields), plan)


def _do_events(client: Client, plan: Plan) -> bytes:
    return _entries(client.collect("events"), plan.as_json)


_ACTIONS: dict[str, Callable[[Client, Plan], bytes]] = {
    "list": _do_list,
    "get": _do_get,
    "set": _do_set,
    "delete": _do_delete,
    "clear": _do_clear,
    "event": _do_event,
    "wait": _do_wait,
    "events": _do_events,
}


def _validate(plan: Plan) -> None:
    """Check the input before talking to the daemon (which checks again)."""
    if plan.key is not None:
        _valid_key(plan.key)
    if plan.action == "set":
        parse_pairs(plan.pairs)
    if plan.action == "event":
        _valid_value(plan.value)


def _explain(err: ClientError, plan: Plan) -> str:
    """The one line for a failure; not_found and timeout get our own wording with the key."""
    if err.code == "not_found" and plan.key is not None:
        return "key not found: %s" % plan.key
    if err.code == "timeout" and plan.key is not None:
        what = "to be set again" if plan.changed else "to be set"
        return "timed out after %g s waiting for key %s %s" % (plan.timeout or 0, plan.key, what)
    return str(err)


def complain(message: object) -> None:
    """One line on stderr: "ovmd: <message>"."""
    line = "%s: %s\n" % (PROG, " ".join(str(message).splitlines()))
    try:
        output.write_all(2, line.encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # nowhere left to tell


# Where `ovmd -s` finds the master command of template configuration: next to this command (a
# virtualenv), on PATH, where the package installs it.
TEMPLATE_CONFIG = "ovm-template-config"
TEMPLATE_CONFIG_PATH = "/usr/sbin/ovm-template-config"


def run_script(plan: Plan) -> int:
    """-s TARGET: run `ovm-template-config TARGET` on this agent's keys (it reads them through the
    socket itself); its exit status is ours."""
    import shutil

    try:
        path = socket_path(plan.socket, plan.config)
    except ClientError as e:
        complain(str(e))
        return e.exit_code
    here = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), TEMPLATE_CONFIG)
    for candidate in (here, shutil.which(TEMPLATE_CONFIG), TEMPLATE_CONFIG_PATH):
        if candidate and os.access(candidate, os.X_OK):
            break
    else:
        complain("-s needs %s, which is not installed" % TEMPLATE_CONFIG)
        return EXIT_USAGE
    argv = [candidate, "--socket", path, str(plan.key)]
    try:
        sys.stdout.flush()
        os.execv(candidate, argv)
    except OSError as e:
        complain("cannot run %s: %s" % (candidate, e.strerror))
    return EXIT_USAGE


def execute(plan: Plan) -> int:
    """Run a client Plan; print its output; return the exit code. Never raises a ClientError."""
    if plan.action == "script":
        return run_script(plan)
    try:
        _validate(plan)
        path = socket_path(plan.socket, plan.config)
        with Client(path) as client:
            data = _ACTIONS[plan.action](client, plan)
    except ClientError as e:
        complain(_explain(e, plan))
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return emit(data)


def emit(data: bytes) -> int:
    """Write ``data`` to stdout; the exit code (a reader that went away is not worth a message)."""
    if not data:
        return EXIT_OK
    try:
        output.write_all(1, data)
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE
    except OSError as e:
        complain("cannot write the output: %s" % (e.strerror or e))
        return EXIT_OUTPUT_FAILED
    return EXIT_OK


# -- the fast parser -------------------------------------------------------------------------------


def _plain(arg: str) -> bool:
    # An argument click would also read as a value. Anything starting with '-' is left to click,
    # so the two parsers never disagree about an odd command line.
    return not arg.startswith("-")


def fast_plan(args: Sequence[str]) -> Plan | None:
    """A Plan for the exact shapes scripts use, or None to let click parse ``args``."""
    socket = None
    if len(args) >= 2 and args[0] == "--socket" and _plain(args[1]):
        socket = args[1]
        args = args[2:]
    n = len(args)
    if n == 1:
        if args[0] == "-l":
            return Plan("list", socket=socket)
        if args[0] == "-x":
            return Plan("clear", socket=socket)
    elif n == 2 and args[0] in ("-g", "-r") and _plain(args[1]):
        return Plan("get" if args[0] == "-g" else "delete", socket=socket, key=args[1])
    elif (
        n >= 2
        and n % 2 == 0
        and all(args[i] == "-p" and _plain(args[i + 1]) for i in range(0, n, 2))
    ):
        return Plan("set", socket=socket, pairs=tuple(args[1::2]))
    return None


def main(argv: Iterable[str] | None = None) -> int:
    """The console script. Returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    plan = fast_plan(args)
    if plan is not None:
        return execute(plan)
    opts = daemon_options(args)
    if opts is not None:
        return run_daemon(opts)
    return click_main(args)


# The daemon's options, read without click: click would stay resident in the daemon for its whole
# life (1.6 MB of its ~15 MB). config.load() validates the values; any other shape of command line
# (an unknown option, a value-less flag, -d2) goes to click, which explains what is wrong. A test
# checks that this table names exactly click's options that apply to --daemon.
DAEMON_OPTIONS: dict[str, str | None] = {
    "--channel": "channel",
    "--socket": "socket",
    "--state-dir": "state_dir",
    "--config": "config",
    "--max-keys": "max_keys",
    "--max-events": "max_events",
    "--group": "group",
    "--facts": "facts",
    "-d": "debug",
    "--debug": "debug",
    "-f": None,
    "--pid-file": None,  # accepted for compatibility; unused
    "-t": None,
    "--time-period": None,  # accepted for compatibility; ignored
}


def daemon_options(args: Sequence[str]) -> dict[str, str] | None:
    """The options of a plain ``ovmd --daemon ...`` command line as a dict, else None."""
    if "--daemon" not in args:
        return None
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--daemon":
            continue
        name, eq, value = arg.partition("=")
        if name not in DAEMON_OPTIONS or (eq and not name.startswith("--")):
            return None
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        field = DAEMON_OPTIONS[name]
        if field is not None:
            opts[field] = value
    return opts


# -- the full parser (click) -----------------------------------------------------------------------

_DAEMON_ONLY = ("channel", "state_dir", "max_keys", "max_events", "group", "facts")
_ACTION_FLAGS = (
    # (parameter, how the user wrote it in messages, action)
    ("list_params", "-l", "list"),
    ("get_param", "-g", "get"),
    ("set_param", "-p", "set"),
    ("delete_param", "-r", "delete"),
    ("delete_params", "-x", "clear"),
    ("event", "-e", "event"),
    ("wait", "-w", "wait"),
    ("events", "--events", "events"),
    ("script", "-s", None),
    ("daemon", "--daemon", None),
)


def plan_from_options(opts: Mapping[str, Any]) -> Plan | None:
    """Check a click parse's combination of options; return a Plan, or None for --daemon.

    Raise BadInput for combinations that make no sense (one action per call).
    """
    given = [
        (flag, action)
        for param, flag, action in _ACTION_FLAGS
        if opts.get(param) not in (None, False, ())
    ]
    if not given:
        raise BadInput("no action given; try 'ovmd --help'")
    if len(given) > 1:
        raise BadInput(
            "%s cannot be combined; give one action per call"
            % " and ".join(flag for flag, _ in given)
        )
    flag, action = given[0]
    if flag == "-s":
        return Plan("script", socket=opts.get("socket"), config=opts.get("config"),
                    key=opts.get("script"))  # fmt: skip
    if action is None:  # --daemon, the only other flag that is no client action
        for name in ("json", "changed"):
            if opts.get(name):
                raise BadInput("--%s does not apply to --daemon" % name)
        if opts.get("timeout") is not None:
            raise BadInput("--timeout does not apply to --daemon")
        return None
    for name in _DAEMON_ONLY:
        if opts.get(name) is not None:
            raise BadInput("--%s only applies to --daemon" % name.replace("_", "-"))
    if opts.get("json") and action not in ("list", "get", "wait", "events"):
        raise BadInput("--json applies to -l, -g, -w and --events only")
    if action != "wait" and (opts.get("changed") or opts.get("timeout") is not None):
        raise BadInput(
            "--%s applies to -w only" % ("changed" if opts.get("changed") else "timeout")
        )
    key = {
        "get": opts.get("get_param"),
        "delete": opts.get("delete_param"),
        "wait": opts.get("wait"),
    }.get(action)
    return Plan(
        action,
        socket=opts.get("socket"),
        config=opts.get("config"),
        key=key,
        pairs=tuple(opts.get("set_param") or ()),
        value=opts.get("event"),
        as_json=bool(opts.get("json")),
        changed=bool(opts.get("changed")),
        timeout=opts.get("timeout"),
    )


def run_daemon(opts: Mapping[str, Any]) -> int:
    """--daemon: load the configuration and run the daemon until it stops; its exit code."""
    # Imported here only: the daemon pulls in orjson, selectors, logging... which no client needs.
    try:
        from . import config, daemon
    except ImportError as e:  # a broken installation (e.g. orjson missing): say so in one line
        complain("cannot load the daemon: %s" % e)
        return EXIT_DAEMON_FAILED
    overrides: dict[str, object] = {"socket": opts.get("socket"), "debug": opts.get("debug")}
    for name in _DAEMON_ONLY:
        overrides[name] = opts.get(name)
    try:
        cfg = config.load(opts.get("config"), overrides)
    except ConfigError as e:
        complain(e)
        return EXIT_USAGE
    return daemon.run(cfg)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        ctx.exit(emit(("%s %s\n" % (PROG, __version__)).encode("ascii")))


def build_command() -> click.Command:
    """The click command (built on demand: importing click is the slow part of the CLI)."""
    import click

    context = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
    epilog = "\b\n" + EXIT_CODES_HELP + "\n\n\b\nSee docs/cli.md for the details."

    @click.command(
        name=PROG,
        context_settings=context,
        epilog=epilog,
        help="Read and write the key/value pairs shared with the Oracle VM host, "
        "or run the daemon (--daemon).",
    )
    @click.option(
        "-l", "--list-params", is_flag=True, help="Print every pair, one JSON object per line."
    )
    @click.option("-g", "--get-param", metavar="KEY", help="Print the value of KEY.")
    @click.option(
        "-p",
        "--set-param",
        metavar="KEY=VALUE",
        multiple=True,
        help="Set KEY (repeatable: all pairs are set together, or none).",
    )
    @click.option("-r", "--delete-param", metavar="KEY", help="Delete KEY.")
    @click.option("-x", "--delete-params", is_flag=True, help="Delete every pair.")
    @click.option("-e", "--event", metavar="EVENT", help="Inject an event, as if the host sent it.")
    @click.option(
        "-w",
        "--wait",
        metavar="KEY",
        help="Wait until KEY exists (or, with --changed, is next set); print its value.",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0),
        metavar="SECONDS",
        help="With -w: give up after SECONDS (exit 1).",
    )
    @click.option("--changed", is_flag=True, help="With -w: wait for the next set of KEY.")
    @click.option("--events", is_flag=True, help="Print the recent events from the host.")
    @click.option(
        "--json",
        is_flag=True,
        help="With -l, -g, -w, --events: print entries with value, set time (ISO 8601 "
        "UTC) and origin.",
    )
    @click.option(
        "--socket",
        metavar="PATH",
        help="The daemon's socket (default: $OVMD_SOCKET, else `socket` in "
        "/etc/ovmd.conf, else /run/ovmd/ovmd.sock).",
    )
    @click.option(
        "--config", metavar="FILE", help="The configuration file (default /etc/ovmd.conf)."
    )
    @click.option(
        "-s",
        "--script",
        metavar="TARGET",
        help="Run template configuration's TARGET (configure, cleanup...) on the keys here: "
        "ovm-template-config's exit status.",
    )
    @click.option(
        "-d",
        "--debug",
        type=click.IntRange(0, 2),
        metavar="LEVEL",
        help="Daemon logging: 0 off, 1 stderr, 2 syslog/journal (default 2).",
    )
    @click.option("-f", "--pid-file", metavar="FILE", help="Accepted for compatibility; unused.")
    @click.option(
        "-t",
        "--time-period",
        type=click.FloatRange(min=0),
        metavar="SECS",
        help="Accepted for compatibility; ignored (the daemon does not poll).",
    )
    @click.option("--daemon", is_flag=True, help="Run the daemon.")
    @click.option(
        "--channel",
        metavar="PATH",
        help="With --daemon: the port (default: found by name com.oracle.ovmd).",
    )
    @click.option("--state-dir", metavar="DIR", help="With --daemon: where the cache is stored.")
    @click.option(
        "--max-keys",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --daemon: the most keys the cache holds.",
    )
    @click.option(
        "--max-events",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --daemon: how many recent events are kept.",
    )
    @click.option(
        "--group", metavar="NAME", help="With --daemon: members of this group may use the socket."
    )
    @click.option(
        "--facts",
        metavar="yes|no",
        help="With --daemon: publish the guest facts (host name, OS, addresses); default yes.",
    )
    @click.option(
        "-v",
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Print the version.",
    )
    def command(**opts: Any) -> int:
        try:
            plan = plan_from_options(opts)
        except BadInput as e:
            complain(e)
            return e.exit_code
        if plan is None:
            return run_daemon(opts)
        return execute(plan)

    return command


def click_main(args: list[str]) -> int:
    """Parse ``args`` with click and run; usage errors are one line and exit 2."""
    import click

    try:
        # Not standalone: main() returns what the command returned, or the code given to exit().
        code: int = build_command().main(args, prog_name=PROG, standalone_mode=False)
        return code
    except click.UsageError as e:
        complain(e.format_message())
        return EXIT_USAGE
    except click.ClickException as e:
        complain(e.format_message())
        return EXIT_USAGE
    except click.Abort:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # --help into a closed pipe
        return EXIT_BROKEN_PIPE
