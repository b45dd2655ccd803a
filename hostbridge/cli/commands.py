"""The click commands of `vmmessage`: every command line the fast path (hostbridge.cli) leaves.

Imported only then: click costs ~40 ms of start-up. An API command is a function that returns
``(call, lines)``: ``call(client)`` makes its request, ``lines`` renders the answer (a function of
hostbridge.render). api_command() adds --json and the connection options and runs both through
hostbridge.cli.run_api, as the fast path does, so the two print the same bytes and exit with the
same status.

Usage errors (missing argument, unknown option or command, bad value) are one line on stderr,
``vmmessage: error: REASON (see vmmessage COMMAND --help)``, and exit 2, as ``ovmd`` does.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem, shell_complete

from hostbridge import TIMEOUT_MAX, TIMEOUT_MIN, check_idempotency_key, render
from hostbridge.apiclient import ENV_BRIDGE, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, ApiError, Client
from hostbridge.apiclient import path as api_path
from hostbridge.cli import (
    ENV_CACERT,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    EXIT_INTERRUPTED,
    PROG,
    credentials,
    manager,
    out,
    print_json,
    report,
    run_api,
    watching,
)

EPILOG = credentials.EPILOG
# configure --wait: the guest reported that its template configuration failed or timed out.
EXIT_CONFIG_FAILED = 8

# What an API command's function returns: its request, and how to render the answer.
ApiCall = tuple[Callable[[Client], dict[str, Any]], Callable[[dict[str, Any], float], list[str]]]

_F = TypeVar("_F", bound=Callable[..., Any])

# (option, environment variable): an option given to the command wins over the same option given
# before the command name, which wins over the environment.
_CONNECTION = (
    ("bridge", ENV_BRIDGE),
    ("token", ENV_TOKEN),
    ("user", ENV_USER),
    ("password", ENV_PASSWORD),
    ("cacert", ENV_CACERT),
)


def connection_options(f: _F) -> _F:
    """--bridge, --token, -u/--user, -p/--password, --cacert."""
    for option in reversed(
        (
            click.option(
                "--bridge",
                metavar="URL",
                help="unix socket path (default $%s or /run/hostbridge/api.sock) "
                "or https://HOST:PORT" % ENV_BRIDGE,
            ),
            click.option("--token", help="bearer token for https (default $%s)" % ENV_TOKEN),
            click.option("-u", "--user", help="user for https (default $%s)" % ENV_USER),
            click.option(
                "-p",
                "--password",
                help="password for https (default $%s; asked when -u is given without it)"
                % ENV_PASSWORD,
            ),
            click.option(
                "--cacert",
                type=click.Path(dir_okay=False),
                help="CA certificate file to verify the bridge's TLS certificate (default $%s)"
                % ENV_CACERT,
            ),
        )
    ):
        f = option(f)
    return f


def json_option(f: _F) -> _F:
    """--json, accepted before and after the command name."""
    return click.option(
        "--json", "as_json", is_flag=True, default=None, help="print the API's JSON answer"
    )(f)


def client_for(given: Mapping[str, str | None]) -> Client:
    """The Client for this command line; asks for the password when -u comes without one."""
    return _client(given, click.get_current_context(), prompt=True)


def _client(given: Mapping[str, str | None], ctx: click.Context, prompt: bool = False) -> Client:
    top = ctx.find_root().params
    s: dict[str, str | None] = {}
    for name, env in _CONNECTION:
        for value in (given.get(name), top.get(name), os.environ.get(env)):
            if value is not None:
                break
        s[name] = value
    if (
        prompt
        and s["user"] is not None
        and s["password"] is None
        and (s["bridge"] or "").startswith("https://")
    ):
        s["password"] = click.prompt("Password for %s" % s["user"], hide_input=True)
    return Client(
        s["bridge"], token=s["token"], user=s["user"], password=s["password"], cacert=s["cacert"]
    )


class _Completed(click.ParamType):
    """A string argument whose shell completion (click's: docs/cli-host.md) asks the bridge."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value

    def candidates(self, c: Client, ctx: click.Context) -> list[str]:
        raise NotImplementedError

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        # The bridge this command line names (--bridge before or after the command, else the
        # environment). A bridge that is down or slow completes nothing, and says nothing: a
        # completion must never print an error into the user's command line.
        given = {name: ctx.params.get(name) for name, _ in _CONNECTION}
        try:
            c = _client(given, ctx)
            c.timeout = COMPLETION_TIMEOUT
            names = self.candidates(c, ctx)
        except Exception:  # noqa: BLE001 - see above
            return []
        return [CompletionItem(n) for n in names if n.startswith(incomplete)]


class _VmName(_Completed):
    def candidates(self, c: Client, ctx: click.Context) -> list[str]:
        return [str(vm["name"]) for vm in c.vms()]


class _KeyName(_Completed):
    def candidates(self, c: Client, ctx: click.Context) -> list[str]:
        vm = ctx.params.get("vm")
        if not vm:
            return []
        return [str(e["key"]) for e in c.keys(vm)["entries"]]


COMPLETION_TIMEOUT = 2.0  # seconds a Tab may wait for the bridge
VM_NAME = _VmName()
KEY_NAME = _KeyName()


@click.group(context_settings={"help_option_names": ["--help"]}, epilog=EPILOG)
@connection_options
@json_option
def vmmessage(**_: object) -> None:
    """Send messages to and query keys of the ovmd agents in the VMs of this host, through the
    host bridge (hostbridge). Values that come from a guest are shown with control characters
    escaped (e.g. \\x1b)."""


def api_command(name: str) -> Callable[[Callable[..., ApiCall]], click.Command]:
    """Register an API command; the decorated function returns an ApiCall (see above)."""

    def register(f: Callable[..., ApiCall]) -> click.Command:
        @functools.wraps(f)
        def invoke(as_json: bool | None, **params: Any) -> int:
            given = {option: params.pop(option) for option, _ in _CONNECTION}
            call, lines = f(**params)
            as_json = bool(as_json or click.get_current_context().find_root().params["as_json"])
            return run_api(lambda: call(client_for(given)), lines, as_json=as_json)

        # Its own list: wraps() shares f's, to which the options below would add theirs. A function
        # takes any attribute, which mypy does not know.
        invoke.__click_params__ = list(getattr(f, "__click_params__", ()))  # type: ignore[attr-defined]
        return vmmessage.command(name, epilog=EPILOG)(json_option(connection_options(invoke)))

    return register


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType):
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds; ``never`` or ``0`` -> 0."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        text = str(value).strip().lower()
        if text == "never":
            return 0.0
        number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
        try:
            seconds = float(number) * _UNITS[unit]
        except ValueError:
            seconds = -1.0
        if not seconds >= 0 or seconds == float("inf"):
            self.fail("%r is not a duration such as 90s, 15m, 2h, 7d or never" % value, param, ctx)
        return seconds


def timeout_option(text: str) -> Callable[[_F], _F]:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=TIMEOUT_MIN, max=TIMEOUT_MAX),
        default=None,
        help=text,
    )


@api_command("send")
@click.argument("vm", type=VM_NAME)
@click.argument("key")
@click.argument("value")
@click.option(
    "--no-log", is_flag=True, help="keep the value out of the bridge's audit trail and logs"
)
@click.option(
    "--no-queue",
    is_flag=True,
    help="fail (exit 5) instead of queueing when the agent is not connected",
)
@timeout_option("seconds to wait for the guest's acknowledgement (default: the bridge's, 5)")
@click.option(
    "--expires",
    type=Duration(),
    default=None,
    metavar="DURATION",
    help="drop the message if it is still undelivered after DURATION (90s, 15m, 2h, 7d; "
    "'never'); default: the bridge's [limits] message_expiry",
)
@click.option(
    "--id",
    "ident",
    metavar="KEY",
    callback=lambda _ctx, _param, value: idempotency_key(value),
    help="idempotency key: a send with the KEY of an earlier send to VM is not applied again "
    "but answered with that message's outcome (default: a random one). Up to 128 letters, "
    "digits and - _ . : ~ + / =",
)
def send(
    vm: str,
    key: str,
    value: str,
    no_log: bool,
    no_queue: bool,
    timeout: float | None,
    expires: float | None,
    ident: str | None,
) -> ApiCall:
    """Send KEY=VALUE to the agent in VM (queued until it connects unless --no-queue). After a
    failed connection, a reset or a bad answer it tries again, with the same idempotency key."""
    return (
        lambda c: c.send(
            vm,
            key,
            value,
            log=not no_log,
            queue=not no_queue,
            timeout=timeout,
            expires=expires,
            idempotency_key=ident,
        ),
        render.send_lines,
    )


def idempotency_key(value: str | None) -> str | None:
    """--id's value, checked as the bridge checks it (a usage error otherwise)."""
    problem = None if value is None else check_idempotency_key(value)
    if problem is not None:
        raise click.BadParameter(problem)
    return value


@api_command("queue")
@click.argument("vm", type=VM_NAME)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=None, help="rows to show (default 100)"
)
def queue(vm: str, limit: int | None) -> ApiCall:
    """List the messages to VM waiting for delivery, oldest first, with their SEQ (never a
    value)."""
    return lambda c: c.queue(vm, limit), render.queue_lines


@api_command("cancel")
@click.argument("vm", type=VM_NAME)
@click.argument("seq", type=click.IntRange(min=1), required=False)
@click.option("--all", "every", is_flag=True, help="cancel every undelivered message to VM")
def cancel(vm: str, seq: int | None, every: bool) -> ApiCall:
    """Cancel message SEQ (see vmmessage queue VM) to VM, or --all, while still undelivered: it
    is never delivered and its value leaves the bridge's database."""
    if (seq is None) == (not every):
        raise click.UsageError(
            "give either a message number SEQ or --all", ctx=click.get_current_context()
        )
    return lambda c: c.cancel(vm, seq), render.cancel_lines


def fresh_option(f: _F) -> _F:
    return click.option(
        "--fresh",
        is_flag=True,
        help="ask the agent itself, a round trip through its channel, even when the bridge's "
        "copy of a connected agent's keys could answer: it then sees every change the guest "
        "had made when the request reached it (docs/bridge.md, what live means)",
    )(f)


def fresh_read(c: Client, timeout: float | None, *segments: str) -> dict[str, Any]:
    """GET /v1/SEGMENTS?fresh=true (and the timeout, when given)."""
    q: dict[str, object] = {"fresh": "true"}
    if timeout is not None:
        q["timeout"] = timeout
    # As Client.query: the bridge may wait for the agent up to ``timeout``; allow a margin.
    wait = None if timeout is None else max(c.timeout, timeout + 10.0)
    return c.request("GET", api_path(*segments, query=q), timeout=wait)


@api_command("query")
@click.argument("vm", type=VM_NAME)
@click.argument("key", type=KEY_NAME)
@timeout_option("seconds to wait for the live agent before answering from the mirror")
@fresh_option
def query(vm: str, key: str, timeout: float | None, fresh: bool) -> ApiCall:
    """Print the value of KEY in VM and when it was set (stale when answered from the mirror)."""
    if fresh:
        return lambda c: fresh_read(c, timeout, "vms", vm, "keys", key), render.query_lines
    return lambda c: c.query(vm, key, timeout=timeout), render.query_lines


@api_command("list")
def list_vms() -> ApiCall:
    """List every VM with its agent state, last seen time, queued count and channel."""
    return lambda c: {"vms": c.vms()}, render.vm_table


@api_command("status")
@click.argument("vm", type=VM_NAME)
def status(vm: str) -> ApiCall:
    """Show one VM's details."""
    return lambda c: c.vm(vm), render.status_lines


@api_command("keys")
@click.argument("vm", type=VM_NAME)
def keys(vm: str) -> ApiCall:
    """List the keys of VM with their values."""
    return lambda c: c.keys(vm), render.keys_lines


@api_command("rm")
@click.argument("vm", type=VM_NAME)
@click.argument("key", type=KEY_NAME)
def rm(vm: str, key: str) -> ApiCall:
    """Delete KEY inside VM."""
    return lambda c: c.delete(vm, key), render.rm_lines


@api_command("audit")
@click.argument("vm", type=VM_NAME)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=None, help="rows to show (default 100)"
)
def audit(vm: str, limit: int | None) -> ApiCall:
    """Show the audit trail of messages sent to VM, newest first."""
    return lambda c: c.audit(vm, limit), render.audit_lines


@api_command("wait")
@click.argument("vm", type=VM_NAME)
@click.argument("key", type=KEY_NAME)
@click.option(
    "--changed",
    is_flag=True,
    help="wait for the next change made after the command started (a set, even to the same "
    "value, or a deletion), even when KEY is already set",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="give up after this many seconds (exit 1); default: wait for ever",
)
def wait(vm: str, key: str, changed: bool, timeout: float | None) -> ApiCall:
    """Wait until KEY is set in VM (at once when it is), then print it as `query` does."""
    return lambda c: watching.wait_for(c, vm, key, changed, timeout), watching.wait_lines


@vmmessage.command("watch", epilog=EPILOG)
@click.argument("vm", type=VM_NAME, required=False)
@json_option
@connection_options
def watch(vm: str | None, as_json: bool | None, **given: str | None) -> int:
    """Print what happens to VM (default: every VM) as it happens, one line an event: keys set
    and deleted, agents connecting and leaving, messages queued and delivered, run states.
    Runs until interrupted."""
    top = click.get_current_context().find_root().params
    try:
        return watching.watch(client_for(given), vm, bool(as_json or top["as_json"]))
    except ApiError as exc:
        return report(exc)


@vmmessage.command("configure", epilog=EPILOG)
@click.argument("vm", type=VM_NAME)
@click.option("--hostname", help="host name (com.oracle.linux.network.hostname)")
@click.option("--device", help="interface of the first NIC (default eth0)")
@click.option("--ip", metavar="ADDR/PREFIX", help="static IPv4 address of the first NIC")
@click.option("--dhcp", is_flag=True, help="DHCP on the first NIC")
@click.option("--gateway", metavar="ADDR", help="default gateway")
@click.option("--dns", multiple=True, metavar="ADDR", help="a DNS server (repeatable)")
@click.option("--search", multiple=True, metavar="DOMAIN", help="a search domain (repeatable)")
@click.option("--timezone", metavar="ZONE", help="time zone, e.g. Europe/Paris")
@click.option("--ntp-server", multiple=True, metavar="HOST", help="an NTP server (repeatable)")
@click.option("--account", metavar="NAME", help="an account to make or update (root: its keys)")
@click.option(
    "--groups", multiple=True, metavar="GROUP", help="with --account: a group (repeatable)"
)
@click.option(
    "--ssh-key",
    multiple=True,
    metavar="FILE",
    help="with --account: a public key file (repeatable)",
)
@click.option(
    "--account-password-file", metavar="FILE", help="with --account: its password ('-': stdin)"
)
@click.option("--root-password-file", metavar="FILE", help="the root password's file ('-': stdin)")
@click.option("--root-password-hash", metavar="HASH", help="the root password as a crypt(3) hash")
@click.option("--file", "files", multiple=True, metavar="FILE", help="keys from a TOML/JSON file")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE", help="any other key")
@click.option("--wait", is_flag=True, help="wait for the guest's report and print it")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1, max=30 * 86400),
    default=900.0,
    show_default=True,
    help="with --wait: seconds to wait for the report",
)
@json_option
@connection_options
def configure(vm: str, as_json: bool | None, **o: Any) -> int:
    """Send VM a whole template configuration for its first boot, in order, the secrets unlogged
    and the root password last; queued until the agent connects. With --wait, print the guest's
    report: each module's outcome and the error in one line. Exit 8 when the guest reports a
    failure, 4 when no report came within --timeout."""
    from hostbridge.cli import configure as cfg

    given = {option: o.pop(option) for option, _ in _CONNECTION}
    as_json = bool(as_json or click.get_current_context().find_root().params["as_json"])
    try:
        settings: dict[str, str] = {}
        for path in o.pop("files"):
            settings.update(cfg.load_file(path))
        o["set"] = o.pop("pairs")
        settings.update(cfg.from_options(o, cfg.read_secret_file))
        request = cfg.new_request()
        messages = cfg.plan(settings, request)
    except cfg.ConfigureError as e:
        raise click.UsageError(str(e), ctx=click.get_current_context()) from None
    client = client_for(given)
    outcomes = []
    for n, m in enumerate(messages):
        try:
            if m.value is None:  # with --dhcp, an earlier static address
                doc = client.delete(vm, m.key)
            else:
                ident = "%s-%d" % (request, n)
                doc = client.send(vm, m.key, m.value, log=m.log, idempotency_key=ident)
        except ApiError as exc:
            if n:
                sys.stderr.write(
                    render.error_line(PROG, "%d of %d messages were sent to VM '%s' before this:"
                                      % (n, len(messages), render.escape(vm))) + "\n"
                )  # fmt: skip
            return report(exc)
        outcomes.append(doc.get("outcome"))
    queued = outcomes.count("queued")
    doc_out: dict[str, Any] = {"vm": vm, "request": request, "messages": len(messages),
                               "queued": queued, "report": None}  # fmt: skip
    lines = [render.configure_sent_line(vm, len(messages), queued)]
    status = EXIT_OK
    if o["wait"]:
        if not as_json:
            render_out(lines)
            lines = []
        try:
            got = cfg.wait_report(lambda: client.keys(vm).get("entries", []), request,
                                  o["timeout"])  # fmt: skip
        except ApiError as exc:
            return report(exc)
        if got is None:
            sys.stderr.write(render.error_line(PROG, render.configure_no_report(vm, o["timeout"]))
                             + "\n")  # fmt: skip
            return EXIT_TIMEOUT
        doc_out["report"] = {"state": got.state, "error": got.error, "modules": got.modules}
        lines += render.configure_report_lines(vm, got.state, got.error, got.modules)
        status = EXIT_OK if got.state == "done" else EXIT_CONFIG_FAILED
    if as_json:
        print_json(doc_out)
    else:
        render_out(lines)
    return status


def render_out(lines: list[str]) -> None:
    for line in lines:
        out(line)


@vmmessage.command(
    "sendVmMessage",
    epilog=EPILOG,
    context_settings={"ignore_unknown_options": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@connection_options
def send_vm_message(args: tuple[str, ...], **given: str | None) -> int:
    """The manager CLI's form: sendVmMessage Vm name=NAME key=KEY message=VALUE [log=yes|no]."""
    return manager.run_manager_send(client_for(given), list(args))


vmmessage.add_command(credentials.adduser)
vmmessage.add_command(credentials.newtoken)


def _usage(reason: str, command: str) -> int:
    sys.stderr.write(render.usage_line(PROG, reason, command) + "\n")
    return EXIT_USAGE


COMPLETE_VAR = "_VMMESSAGE_COMPLETE"


def complete(instruction: str) -> int:
    """Shell completion, as click does it: ``instruction`` is bash_source, bash_complete, zsh_...
    (docs/cli-host.md, "Shell completion")."""
    return shell_complete(vmmessage, {}, PROG, COMPLETE_VAR, instruction)


def click_main(argv: list[str]) -> int:
    """Parse ``argv`` with click and run the command; return the exit status."""
    # make_context() and invoke() rather than main(): main() turns a closed stdout into exit 1 and
    # prints usage errors on several lines; hostbridge.cli.shielded() and the handlers below do it
    # as documented.
    try:
        with vmmessage.make_context(PROG, list(argv)) as ctx:
            return vmmessage.invoke(ctx) or EXIT_OK
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError:
        return _usage("no command given", PROG)
    except click.UsageError as exc:
        return _usage(exc.format_message(), exc.ctx.command_path if exc.ctx else PROG)
    except click.ClickException as exc:
        sys.stderr.write(render.error_line(PROG, exc.format_message()) + "\n")
        return exc.exit_code
    except (click.Abort, EOFError):  # e.g. no password at the prompt
        sys.stderr.write(render.error_line(PROG, "aborted") + "\n")
        return EXIT_INTERRUPTED
    except ApiError as exc:  # sendVmMessage's client, made outside run_api: e.g. a bad --bridge
        return report(exc)
