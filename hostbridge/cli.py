"""`vmmessage`: the operator's command line to the host bridge's API.

    vmmessage send VM KEY VALUE [--no-log] [--no-queue] [--timeout S]
    vmmessage query VM KEY | list | status VM | keys VM | rm VM KEY | audit VM
    vmmessage sendVmMessage Vm name=X key=foo message=bar log=no      (the manager CLI's form)
    vmmessage adduser USER --users-file F | vmmessage newtoken NAME --tokens-file F

Fast path: ``vmmessage query VM KEY`` (and ``send VM KEY VALUE``) is what scripts run in loops, so
main() recognises that exact argv by hand and answers with only apiclient (``_socket`` + ``json``)
and humanize imported: no click, no socket module, no asyncio. Every other shape goes through click.
Both paths call the same run_*() functions below, so their output and exit codes are identical.

Nothing here imports click at module level (only _click_main does).
"""

import os
import sys
import time

from hostbridge import humanize
from hostbridge.apiclient import ENV_BRIDGE, EXIT_OK, EXIT_USAGE, ApiError, Client, exit_code

PROG = "vmmessage"
ENV_TOKEN = "VMMESSAGE_TOKEN"
ENV_USER = "VMMESSAGE_USER"
ENV_PASSWORD = "VMMESSAGE_PASSWORD"
ENV_CACERT = "VMMESSAGE_CACERT"

EXIT_HELP = """Exit status:
  0  success
  1  not found (unknown VM, or the key is not set)
  2  usage error or invalid input (bad key, value too long, ...)
  3  the bridge is unreachable (no socket, connection refused, TLS failure, no answer)
  4  the agent did not answer in time
  5  the agent is not connected (send --no-queue, or rm of an unconnected VM's key)
  6  unauthorized (no or bad token / user and password, or no permission on the socket)
  7  any other error of the bridge (busy, internal)"""

_QUEUED = (
    "Message queued: the agent in VM '%s' is not connected; it will be delivered when it connects."
)


def _out(line):
    sys.stdout.write(line + "\n")


def _fail(exc, prog=PROG):
    """Report an ApiError on one line of stderr; return its exit status."""
    sys.stderr.write(
        "%s: error: %s\n" % (prog, humanize.escape(" ".join(str(exc.message).split())))
    )
    return exit_code(exc.code)


def _emit_json(doc):
    import json

    # ensure_ascii: a guest's string can then never put a raw control or C1 character on a terminal.
    _out(json.dumps(doc, ensure_ascii=True))


def _ago(ts, now):
    return humanize.ago(ts, now) if isinstance(ts, (int, float)) else "at an unknown time"


def stale_line(last_seen, now):
    if isinstance(last_seen, (int, float)):
        return "(stale: the agent was last seen %s)" % humanize.ago(last_seen, now)
    return "(stale: the agent has not been seen since the bridge started)"


def query_lines(doc, now):
    """The human lines for a query answer (the original tool's phrases, then the stale marker)."""
    lines = [
        "Query for Key : '%s' returned value '%s'."
        % (humanize.escape(doc["key"]), humanize.escape(doc["value"])),
        "Key set %s." % _ago(doc.get("ts"), now),
    ]
    if doc.get("stale"):
        lines.append(stale_line(doc.get("last_seen"), now))
    return lines


def send_line(doc):
    if doc.get("outcome") == "queued":
        return _QUEUED % humanize.escape(doc.get("vm", ""))
    return "Message sent successfully."


# ---- operations shared by the fast path, click and compat ----


def run_query(client, vm, key, *, as_json=False, timeout=None):
    try:
        doc = client.query(vm, key, timeout=timeout)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
    else:
        for line in query_lines(doc, time.time()):
            _out(line)
    return EXIT_OK


def run_send(client, vm, key, value, *, log=True, queue=True, timeout=None, as_json=False):
    try:
        doc = client.send(vm, key, value, log=log, queue=queue, timeout=timeout)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
    else:
        _out(send_line(doc))
    return EXIT_OK


def _fmt_time(ts):
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def run_list(client, *, as_json=False):
    try:
        vms = client.vms()
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json({"vms": vms})
        return EXIT_OK
    now = time.time()
    rows = [("NAME", "AGENT", "LAST SEEN", "QUEUED", "CHANNEL")]
    for vm in vms:
        seen = (
            "now"
            if vm.get("agent") == "connected"
            else (_ago(vm.get("last_seen"), now) if vm.get("last_seen") is not None else "never")
        )
        rows.append(
            (
                humanize.escape(vm["name"]),
                vm.get("agent", "?"),
                seen,
                str(vm.get("queued", 0)),
                humanize.escape(vm.get("channel", "")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    if len(rows) == 1:
        _out("(no VMs)")
    return EXIT_OK


def status_lines(vm, now):
    agent = vm.get("agent", "?")
    if vm.get("agent_version"):
        agent += " (agent version %s)" % humanize.escape(str(vm["agent_version"]))
    lines = [
        "VM : '%s'" % humanize.escape(vm["name"]),
        "Channel: %s (%s)" % (humanize.escape(vm.get("channel", "")), vm.get("source", "?")),
        "Agent: %s" % agent,
    ]
    if vm.get("connected_since") is not None and vm.get("agent") == "connected":
        lines.append(
            "Connected since: %s (%s)"
            % (_fmt_time(vm["connected_since"]), _ago(vm["connected_since"], now))
        )
    last = vm.get("last_seen")
    lines.append(
        "Last seen: %s"
        % ("%s (%s)" % (_fmt_time(last), _ago(last, now)) if last is not None else "never")
    )
    lines.append("Queued messages: %s" % vm.get("queued", 0))
    counters = vm.get("counters") or {}
    if counters:
        lines.append(
            "Counters: " + ", ".join("%s=%s" % (k, v) for k, v in sorted(counters.items()))
        )
    return lines


def run_status(client, vm, *, as_json=False):
    try:
        doc = client.vm(vm)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
    else:
        for line in status_lines(doc, time.time()):
            _out(line)
    return EXIT_OK


def run_keys(client, vm, *, as_json=False):
    try:
        doc = client.keys(vm)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
        return EXIT_OK
    now = time.time()
    for e in doc.get("entries", []):
        _out(
            "%s = '%s'  (set %s by the %s)"
            % (
                humanize.escape(e["key"]),
                humanize.escape(e["value"]),
                _ago(e.get("ts"), now),
                e.get("origin", "?"),
            )
        )
    if not doc.get("entries"):
        _out("(no keys)")
    if doc.get("stale"):
        _out(stale_line(doc.get("last_seen"), now))
    return EXIT_OK


def run_rm(client, vm, key, *, as_json=False):
    try:
        doc = client.delete(vm, key)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
    elif doc.get("outcome") == "queued":
        _out(
            "Deletion queued: the agent in VM '%s' is not connected; it will be done when it connects."
            % humanize.escape(vm)
        )
    else:
        _out("Key '%s' deleted." % humanize.escape(key))
    return EXIT_OK


def run_audit(client, vm, *, limit=None, as_json=False):
    try:
        doc = client.audit(vm, limit)
    except ApiError as exc:
        return _fail(exc)
    if as_json:
        _emit_json(doc)
        return EXIT_OK
    for row in doc.get("entries", []):
        value = row.get("value")
        shown = "'%s'" % humanize.escape(value) if value is not None else "(not logged)"
        _out(
            "%s  %-9s  %s  %d bytes  %s"
            % (
                _fmt_time(row.get("ts")),
                row.get("outcome", "?"),
                humanize.escape(row.get("key", "")),
                row.get("size", 0),
                shown,
            )
        )
    if not doc.get("entries"):
        _out("(no audit rows)")
    return EXIT_OK


# ---- the manager CLI's form: sendVmMessage Vm name=X key=foo message=bar log=no ----


def manager_time(now):
    """``2026-11-22 09:04:29,890 UTC`` (the manager CLI's Time: line, always in UTC)."""
    return "%s,%03d UTC" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        int(now * 1000) % 1000,
    )


def parse_manager_args(args):
    """``Vm name=X key=foo message=bar log=no`` -> dict; raise ValueError with a one-line reason."""
    if not args or args[0].lower() != "vm":
        raise ValueError(
            "the object type must be 'Vm' (sendVmMessage Vm name=NAME key=KEY message=VALUE [log=yes|no])"
        )
    fields = {}
    for arg in args[1:]:
        name, sep, value = arg.partition("=")
        name = name.lower()
        if not sep or name not in ("name", "key", "message", "log", "queue"):
            raise ValueError("unexpected argument %r (expected name=, key=, message=, log=)" % arg)
        if name in fields:
            raise ValueError("%s= given twice" % name)
        fields[name] = value
    for required in ("name", "key", "message"):
        if required not in fields:
            raise ValueError("%s= is required" % required)
    for flag in ("log", "queue"):
        if fields.get(flag, "yes").lower() not in ("yes", "no", "true", "false"):
            raise ValueError("%s= must be yes or no" % flag)
    return fields


def run_manager_send(client, args):
    """Print Command:/Status:/Time: like the manager CLI; return the exit status."""
    _out("Command: sendVmMessage %s" % humanize.escape(" ".join(args)))
    try:
        fields = parse_manager_args(args)
    except ValueError as exc:
        _out("Status: Failure")
        _out("Time: %s" % manager_time(time.time()))
        _out("Error Msg: %s" % humanize.escape(str(exc)))
        return EXIT_USAGE
    try:
        doc = client.send(
            fields["name"],
            fields["key"],
            fields["message"],
            log=fields.get("log", "yes").lower() in ("yes", "true"),
            queue=fields.get("queue", "yes").lower() in ("yes", "true"),
        )
    except ApiError as exc:
        _out("Status: Failure")
        _out("Time: %s" % manager_time(time.time()))
        _out("Error Msg: %s" % humanize.escape(" ".join(exc.message.split())))
        return exit_code(exc.code)
    _out("Status: Success")
    _out("Time: %s" % manager_time(time.time()))
    if doc.get("outcome") == "queued":
        _out(_QUEUED % humanize.escape(fields["name"]))
    return EXIT_OK


# ---- entry points ----


def _env_client():
    """The client the fast path uses: everything from the environment, as click's defaults."""
    return Client(
        os.environ.get(ENV_BRIDGE),
        token=os.environ.get(ENV_TOKEN),
        user=os.environ.get(ENV_USER),
        password=os.environ.get(ENV_PASSWORD),
        cacert=os.environ.get(ENV_CACERT),
    )


def _plain(arg):
    return not arg.startswith("-")


def fast_path(argv):
    """Run ``query VM KEY`` / ``send VM KEY VALUE`` without click; None when argv is another shape."""
    if len(argv) == 3 and argv[0] == "query" and _plain(argv[1]) and _plain(argv[2]):
        run = lambda c: run_query(c, argv[1], argv[2])  # noqa: E731
    elif len(argv) == 4 and argv[0] == "send" and all(_plain(a) for a in argv[1:]):
        run = lambda c: run_send(c, argv[1], argv[2], argv[3])  # noqa: E731
    else:
        return None
    try:
        client = _env_client()
    except ApiError as exc:
        return _fail(exc)
    return run(client)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    status = fast_path(argv)
    if status is None:
        status = _click_main(argv)
    return status


def _click_main(argv):
    import click

    group = _build_cli(click)
    try:
        return group.main(args=list(argv), prog_name=PROG, standalone_mode=False) or EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if exc.exit_code == 2 else exc.exit_code
    except click.Abort:
        sys.stderr.write("%s: aborted\n" % PROG)
        return 1
    except ApiError as exc:
        return _fail(exc)


def _build_cli(click):
    """Define the click commands (inside a function so that importing this module stays click-free)."""
    epilog = "\b\n" + EXIT_HELP  # \b: click must not rewrap the table

    def connection_options(f):
        f = click.option(
            "--bridge",
            metavar="URL",
            default=None,
            help="unix socket path (default $%s or /run/hostbridge/api.sock) or https://HOST:PORT"
            % ENV_BRIDGE,
        )(f)
        f = click.option(
            "--token", default=None, help="bearer token for https (default $%s)" % ENV_TOKEN
        )(f)
        f = click.option(
            "-u", "--user", default=None, help="user for https (default $%s)" % ENV_USER
        )(f)
        f = click.option(
            "-p",
            "--password",
            default=None,
            help="password for https (default $%s; asked when -u is given without it)"
            % ENV_PASSWORD,
        )(f)
        f = click.option(
            "--cacert",
            default=None,
            type=click.Path(dir_okay=False),
            help="CA certificate file to verify the bridge's TLS certificate (default $%s)"
            % ENV_CACERT,
        )(f)
        return f

    def json_option(f):
        return click.option(
            "--json", "as_json", is_flag=True, default=None, help="print the API's JSON answer"
        )(f)

    def client_for(ctx, bridge, token, user, password, cacert):
        top = ctx.find_root().params
        pick = lambda mine, name, env: (
            mine
            if mine is not None
            else top.get(name)
            if top.get(name) is not None
            else os.environ.get(env)
        )
        bridge = pick(bridge, "bridge", ENV_BRIDGE)
        token = pick(token, "token", ENV_TOKEN)
        user = pick(user, "user", ENV_USER)
        password = pick(password, "password", ENV_PASSWORD)
        cacert = pick(cacert, "cacert", ENV_CACERT)
        if user is not None and password is None and (bridge or "").startswith("https://"):
            password = click.prompt("Password for %s" % user, hide_input=True)
        return Client(bridge, token=token, user=user, password=password, cacert=cacert)

    def want_json(ctx, as_json):
        return bool(as_json or ctx.find_root().params.get("as_json"))

    @click.group(context_settings={"help_option_names": ["--help"]}, epilog=epilog)
    @connection_options
    @json_option
    def cli(**_):
        """Send messages to and query keys of the ovmd agents in the VMs of this host, through the
        host bridge (hostbridge). Values that come from a guest are shown with control characters
        escaped (e.g. \\x1b)."""

    def command(name, **kw):
        def wrap(f):
            f = json_option(f)
            f = connection_options(f)
            f = click.pass_context(f)
            return cli.command(name, epilog=epilog, **kw)(f)

        return wrap

    @command("send")
    @click.argument("vm")
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
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True, max=300),
        default=None,
        help="seconds to wait for the guest's acknowledgement (default: the bridge's, 5)",
    )
    def send_cmd(ctx, vm, key, value, no_log, no_queue, timeout, as_json, **conn):
        """Send KEY=VALUE to the agent in VM (queued until it connects unless --no-queue)."""
        return run_send(
            client_for(ctx, **conn),
            vm,
            key,
            value,
            log=not no_log,
            queue=not no_queue,
            timeout=timeout,
            as_json=want_json(ctx, as_json),
        )

    @command("query")
    @click.argument("vm")
    @click.argument("key")
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True, max=300),
        default=None,
        help="seconds to wait for the live agent before answering from the mirror",
    )
    def query_cmd(ctx, vm, key, timeout, as_json, **conn):
        """Print the value of KEY in VM and when it was set (stale when answered from the mirror)."""
        return run_query(
            client_for(ctx, **conn), vm, key, as_json=want_json(ctx, as_json), timeout=timeout
        )

    @command("list")
    def list_cmd(ctx, as_json, **conn):
        """List every VM with its agent state, last seen time, queued count and channel."""
        return run_list(client_for(ctx, **conn), as_json=want_json(ctx, as_json))

    @command("status")
    @click.argument("vm")
    def status_cmd(ctx, vm, as_json, **conn):
        """Show one VM's details."""
        return run_status(client_for(ctx, **conn), vm, as_json=want_json(ctx, as_json))

    @command("keys")
    @click.argument("vm")
    def keys_cmd(ctx, vm, as_json, **conn):
        """List the keys of VM with their values."""
        return run_keys(client_for(ctx, **conn), vm, as_json=want_json(ctx, as_json))

    @command("rm")
    @click.argument("vm")
    @click.argument("key")
    def rm_cmd(ctx, vm, key, as_json, **conn):
        """Delete KEY inside VM."""
        return run_rm(client_for(ctx, **conn), vm, key, as_json=want_json(ctx, as_json))

    @command("audit")
    @click.argument("vm")
    @click.option(
        "--limit", type=click.IntRange(1, 1000), default=None, help="rows to show (default 100)"
    )
    def audit_cmd(ctx, vm, limit, as_json, **conn):
        """Show the audit trail of messages sent to VM, newest first."""
        return run_audit(client_for(ctx, **conn), vm, limit=limit, as_json=want_json(ctx, as_json))

    @cli.command(
        "sendVmMessage",
        epilog=epilog,
        context_settings={"ignore_unknown_options": True, "help_option_names": ["--help"]},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @connection_options
    @click.pass_context
    def manager_cmd(ctx, args, **conn):
        """The manager CLI's form: sendVmMessage Vm name=NAME key=KEY message=VALUE [log=yes|no]."""
        return run_manager_send(client_for(ctx, **conn), list(args))

    @cli.command("adduser", epilog=epilog)
    @click.argument("user")
    @click.option(
        "--users-file",
        required=True,
        type=click.Path(dir_okay=False),
        help="the bridge's users file (created if missing, mode 0600)",
    )
    @click.option(
        "--password-stdin", is_flag=True, help="read the password from the first line of stdin"
    )
    def adduser_cmd(user, users_file, password_stdin):
        """Add USER (or change their password) in the bridge's users file, for https with -u/-p."""
        from hostbridge.auth import add_user

        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt(
                "Password for %s" % user, hide_input=True, confirmation_prompt=True
            )
        try:
            added = add_user(users_file, user, password)
        except (ValueError, OSError) as exc:
            raise click.UsageError(str(exc)) from None
        _out("User '%s' %s." % (user, "added" if added else "updated"))
        return EXIT_OK

    @cli.command("newtoken", epilog=epilog)
    @click.argument("name")
    @click.option(
        "--tokens-file",
        required=True,
        type=click.Path(dir_okay=False),
        help="the bridge's tokens file (created if missing, mode 0600)",
    )
    def newtoken_cmd(name, tokens_file):
        """Append a new random bearer token named NAME to the tokens file and print it."""
        from hostbridge.auth import new_token

        if not name or ":" in name or not name.isprintable() or any(ch.isspace() for ch in name):
            raise click.UsageError("a token name must be non-empty, without ':' or spaces")
        token = new_token()
        try:
            fd = os.open(tokens_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write("%s:%s\n" % (name, token))
        except OSError as exc:
            raise click.UsageError("cannot write %s: %s" % (tokens_file, exc.strerror)) from None
        _out(token)
        return EXIT_OK

    return cli


if __name__ == "__main__":
    sys.exit(main())
