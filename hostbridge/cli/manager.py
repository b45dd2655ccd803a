"""The manager CLI's form, for old runbooks: ``vmmessage sendVmMessage Vm name=X key=foo message=bar
log=no``. It answers as the manager did, on stdout (Command:, Status:, Time:, Error Msg:; the lines
are hostbridge.render.manager_lines), with vmmessage's exit statuses.
"""

from __future__ import annotations

import time

from hostbridge import check_idempotency_key, render
from hostbridge.apiclient import EXIT_OK, EXIT_USAGE, ApiError, Client, exit_code
from hostbridge.cli import out

_FIELDS = ("name", "key", "message", "log", "queue", "id")
_YES = ("yes", "true")
_NO = ("no", "false")


def parse_manager_args(args: list[str]) -> dict[str, str]:
    """``Vm name=X key=foo message=bar log=no`` -> dict; raise ValueError with a one-line reason."""
    if not args or args[0].lower() != "vm":
        raise ValueError(
            "the object type must be 'Vm' "
            "(sendVmMessage Vm name=NAME key=KEY message=VALUE [log=yes|no])"
        )
    fields: dict[str, str] = {}
    for arg in args[1:]:
        name, sep, value = arg.partition("=")
        name = name.lower()
        if not sep or name not in _FIELDS:
            raise ValueError(
                "unexpected argument %r (expected name=, key=, message=, log=, queue=, id=)" % arg
            )
        if name in fields:
            raise ValueError("%s= given twice" % name)
        fields[name] = value
    for required in ("name", "key", "message"):
        if required not in fields:
            raise ValueError("%s= is required" % required)
    for flag in ("log", "queue"):
        if fields.get(flag, "yes").lower() not in _YES + _NO:
            raise ValueError("%s= must be yes or no" % flag)
    problem = check_idempotency_key(fields["id"]) if "id" in fields else None
    if problem is not None:
        raise ValueError("id=: %s" % problem)
    return fields


def run_manager_send(client: Client, args: list[str]) -> int:
    """Send as ``sendVmMessage ARGS`` asks; print the manager's lines; return the exit status."""
    status, doc = EXIT_OK, None
    error: object = None  # the reason of a failure, as manager_lines takes it
    try:
        fields = parse_manager_args(args)
    except ValueError as exc:
        status, error = EXIT_USAGE, exc
    else:
        try:
            doc = client.send(
                fields["name"],
                fields["key"],
                fields["message"],
                log=fields.get("log", "yes").lower() in _YES,
                queue=fields.get("queue", "yes").lower() in _YES,
                idempotency_key=fields.get("id"),
            )
        except ApiError as exc:
            status, error = exit_code(exc.code), exc.message
    for line in render.manager_lines(args, time.time(), error=error, doc=doc):
        out(line)
    return status
