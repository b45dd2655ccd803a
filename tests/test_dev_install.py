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


def test_the_checkouts_interpreter_should_start_without_an_import_hook():
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=child_env(drop_prefixes=("PYTHONPATH",)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (
        "the interpreter imports %s at start-up: reinstall with scripts/bootstrap.sh" % done.stdout
    )


def test_the_checkout_should_still_be_importable_from_anywhere():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import guestagent, hostbridge, templateconfig; print(guestagent.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=child_env(drop_prefixes=("PYTHONPATH",)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(ROOT + "/guestagent/")
