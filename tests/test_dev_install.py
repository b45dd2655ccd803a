"""The checkout's own install (scripts/bootstrap.sh) starts as fast as an installed one: every
`ovmd -g` and `vmmessage` run from the checkout pays the interpreter's start-up, so nothing may
hook into it. setuptools' default editable install adds an import-hook finder that imports
pathlib, fnmatch and re in `site` (~17 ms on every start); bootstrap.sh asks for a plain path
entry instead (editable_mode=compat)."""

import subprocess
import sys

from tests.support.processes import ROOT, child_env

PROBE = (
    "import sys; print(sorted(m for m in sys.modules if 'editable' in m or m in "
    "('pathlib', 'fnmatch', 're')))"
)


def fresh_interpreter(code):
    """``code`` run by this venv's interpreter as a user's command runs: from /, no PYTHONPATH."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=child_env(drop_prefixes=("PYTHONPATH",)),
    )


def test_the_checkouts_interpreter_should_start_without_an_import_hook():
    done = fresh_interpreter(PROBE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (
        "the interpreter imports %s at start-up: reinstall with scripts/bootstrap.sh" % done.stdout
    )


def test_the_checkout_should_still_be_importable_from_anywhere():
    done = fresh_interpreter(
        "import guestagent, hostbridge, templateconfig; print(guestagent.__file__)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(ROOT + "/guestagent/")
