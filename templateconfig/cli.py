"""The module side: ``main(do_enumerate, {target: function})``, as modules of the original call it.

How the master runs a module (docs/template-config.md, "Writing a module"):

    MODULE --enumerate TARGET [--output FD]   -> the JSON list of keys the module takes
    MODULE TARGET [--output FD] < JSON        -> the JSON object handed to the next module

``do_enumerate(target)`` returns a JSON string (a list of {"key", "description", ...}); a target
function takes every key/value as a JSON string and returns one. The result goes to the file
descriptor given with --output (the master passes a pipe, so whatever a module prints on its
standard output cannot corrupt it), else to standard output. A failure is one line on standard
error and exit status 1; a target the module does not implement hands its input on unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from . import TARGETS
from .common import TemplateError

USAGE = "usage: %s [--enumerate] TARGET [--output FD]\n"


def _parse(argv: Sequence[str]) -> tuple[bool, str, int | None]:
    enumerate_ = False
    target = None
    out_fd = None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-e", "--enumerate"):
            enumerate_ = True
        elif a == "--output" and args:
            out_fd = int(args.pop(0))
        elif a.startswith("--output="):
            out_fd = int(a.split("=", 1)[1])
        elif a in TARGETS and target is None:
            target = a
        else:
            raise ValueError(a)
    if target is None:
        raise ValueError("no target")
    return enumerate_, target, out_fd


def _emit(text: str, out_fd: int | None) -> None:
    data = text.encode("utf-8")
    if out_fd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with os.fdopen(out_fd, "wb", closefd=True) as f:
        f.write(data)


def main(
    do_enumerate: Callable[[str], str],
    targets: Mapping[str, Callable[[str], str]],
    argv: Sequence[str] | None = None,
) -> None:
    """Dispatch on the command line; exit with the module's status."""
    name = os.path.basename(sys.argv[0])
    try:
        enumerate_, target, out_fd = _parse(sys.argv[1:] if argv is None else argv)
    except ValueError:
        sys.stderr.write(USAGE % name)
        sys.exit(2)
    try:
        if enumerate_:
            result = do_enumerate(target) if target in targets else "[]"
        else:
            param = sys.stdin.read() or "{}"
            function = targets.get(target)
            result = function(param) if function is not None else param
        _emit(result if isinstance(result, str) else json.dumps(result), out_fd)
    except TemplateError as e:
        sys.stderr.write("%s\n" % (str(e).splitlines()[0] if str(e) else "failed"))
        sys.exit(1)
    # A module's own bug: its type and the first line of its message.
    except Exception as e:  # noqa: BLE001
        text = str(e).splitlines()[0][:200] if str(e) else ""
        sys.stderr.write("%s: %s%s\n" % (name, type(e).__name__, ": " + text if text else ""))
        sys.exit(1)
    sys.exit(0)
