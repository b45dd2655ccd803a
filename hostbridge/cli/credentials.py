"""``vmmessage adduser`` and ``vmmessage newtoken``: credentials for the bridge's https listener.

They only parse, call hostbridge.auth (which owns the files' format, mode and durability) and
print. A bad name is a usage error; a file that cannot be written is one line and exit 2 too.
hostbridge.auth is imported only when one of them runs: it brings asyncio, which no other command
of vmmessage needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from hostbridge import render
from hostbridge.apiclient import EXIT_OK, EXIT_USAGE
from hostbridge.cli import EXIT_HELP, PROG, out

EPILOG = "\b\n" + EXIT_HELP  # \b: click must not rewrap the table


_F = TypeVar("_F", bound=Callable[..., Any])


def _file_option(name: str, what: str) -> Callable[[_F], _F]:
    return click.option(
        name,
        required=True,
        type=click.Path(dir_okay=False),
        help="the bridge's %s file (created if missing, mode 0600)" % what,
    )


def _cannot_write(path: str, exc: OSError) -> int:
    sys.stderr.write(
        render.error_line(PROG, "cannot write %s: %s" % (path, exc.strerror or exc)) + "\n"
    )
    return EXIT_USAGE


@click.command("adduser", epilog=EPILOG)
@click.argument("user")
@_file_option("--users-file", "users")
@click.option(
    "--password-stdin", is_flag=True, help="read the password from the first line of stdin"
)
def adduser(user: str, users_file: str, password_stdin: bool) -> int:
    """Add USER (or change their password) in the bridge's users file, for https with -u/-p."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password for %s" % user, hide_input=True, confirmation_prompt=True)
    from hostbridge import auth

    try:
        added = auth.add_user(users_file, user, password)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        return _cannot_write(users_file, exc)
    out("User '%s' %s." % (user, "added" if added else "updated"))
    return EXIT_OK


@click.command("newtoken", epilog=EPILOG)
@click.argument("name")
@_file_option("--tokens-file", "tokens")
def newtoken(name: str, tokens_file: str) -> int:
    """Append a new random bearer token named NAME to the tokens file and print it (this once)."""
    from hostbridge import auth

    try:
        token = auth.add_token(tokens_file, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'NAME'") from None
    except OSError as exc:
        return _cannot_write(tokens_file, exc)
    out(token)
    return EXIT_OK
