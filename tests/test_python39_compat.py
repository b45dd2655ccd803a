"""The guest side (ovmproto, ovmsys, guestagent, templateconfig) must run on Python 3.9: guests
carry older interpreters.

vermin checks the syntax and standard library features everywhere. Where a real 3.9 is found
(find_python39: $OVMD_PYTHON39, else python3.9 on PATH, else one of pyenv's versions), every file
is also byte-compiled with it, and every module imported with it, which catches what vermin cannot
see: annotations like ``int | None`` evaluated when a function is defined, keyword arguments 3.9
does not know. Without one those two tests are skipped, saying so.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping

import pytest

from tests.support.processes import ROOT, child_env

PACKAGES = ("ovmproto", "ovmsys", "guestagent", "templateconfig")
PYTHON39_ENV = "OVMD_PYTHON39"  # the path of a Python 3.9 interpreter to use


def is_python39(path: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``path`` runs and reports version 3.9 (a pyenv shim may exist and refuse)."""
    try:
        r = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            env=None if environ is None else dict(environ),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == "3.9"


def pyenv_pythons(environ: Mapping[str, str]) -> list[str]:
    """pyenv's 3.9 interpreters, newest first: under $PYENV_ROOT, else under `pyenv root`."""
    root = environ.get("PYENV_ROOT")
    pyenv = shutil.which("pyenv", path=environ.get("PATH", os.defpath))
    if not root and pyenv:
        r = subprocess.run(
            [pyenv, "root"], capture_output=True, text=True, timeout=60, env=dict(environ)
        )
        root = r.stdout.strip() if r.returncode == 0 else None
    if not root:
        return []
    found = glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9"))

    def version(path: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path.split(os.sep)[-3])]

    return sorted(found, key=version, reverse=True)


def find_python39(environ: Mapping[str, str] = os.environ) -> str | None:
    """A Python 3.9 interpreter: ``$OVMD_PYTHON39`` if set (it must be one), else the first of
    python3.9 on PATH and pyenv's 3.9 versions that really is 3.9; None when there is none."""
    chosen = environ.get(PYTHON39_ENV)
    if chosen:
        if not is_python39(chosen, environ):
            raise ValueError("$%s=%s is not a Python 3.9 interpreter" % (PYTHON39_ENV, chosen))
        return chosen
    on_path = shutil.which("python3.9", path=environ.get("PATH", os.defpath))
    for candidate in [on_path] if on_path else []:
        if is_python39(candidate, environ):
            return candidate
    for candidate in pyenv_pythons(environ):
        if is_python39(candidate, environ):
            return candidate
    return None


@pytest.fixture(scope="module")
def python39() -> str:
    try:
        found = find_python39()
    except ValueError as e:
        pytest.fail(str(e))
    if found is None:
        pytest.skip(
            "no Python 3.9 here (python3.9 on PATH, pyenv's versions, $%s); vermin still ran"
            % PYTHON39_ENV
        )
    return found


def source_files():
    files = []
    for package in PACKAGES:
        for directory, _, names in os.walk(os.path.join(ROOT, package)):
            files.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
    assert files
    return sorted(files)


def module_names():
    names = []
    for path in source_files():
        rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        if rel[-1] != "__main__":
            names.append(".".join(rel))
    return names


def test_vermin_should_find_nothing_that_needs_more_than_python_39():
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.access(vermin, os.X_OK):
        vermin = shutil.which("vermin")
    assert vermin, "vermin is a development dependency: pip install -e '.[dev]'"
    # No --eval-annotations: the code may use `from __future__ import annotations`, under which
    # 3.10 annotations are never evaluated. (vermin's union-types feature is no help: it takes
    # every `os.O_RDWR | os.O_NONBLOCK` for a union type; the 3.9 import below catches those.)
    result = subprocess.run(
        [vermin, "-t=3.9-", "--no-tips", "--violations"]
        + [os.path.join(ROOT, p) for p in PACKAGES],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout


def test_every_file_should_byte_compile_with_python_39(python39, tmp_path):
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path))  # keep 3.9's .pyc out of the tree
    result = subprocess.run(
        [python39, "-m", "py_compile"] + source_files(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout


# Enough of orjson's surface for modules to import when 3.9 has no orjson of its own (module-level
# code only needs the names; nothing here is called).
_ORJSON_STUB = textwrap.dedent("""\
    import json
    JSONDecodeError = json.JSONDecodeError
    JSONEncodeError = TypeError
    def dumps(obj, default=None, option=None):
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    def loads(data):
        return json.loads(data)
    def __getattr__(name):
        if name.startswith("OPT_"):
            return 0
        raise AttributeError(name)
    """)


def test_every_module_should_import_with_python_39(python39, tmp_path):
    py = python39
    paths = [ROOT]
    has_orjson = (
        subprocess.run(
            [py, "-c", "import orjson"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        ).returncode
        == 0
    )
    if not has_orjson:
        stub = tmp_path / "stub"
        stub.mkdir()
        (stub / "orjson.py").write_text(_ORJSON_STUB)
        paths.append(str(stub))
    env = child_env({"PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")}, pythonpath=paths)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [py, "-c", code] + module_names(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout


# ---- finding a 3.9: stand-in interpreters are shell scripts that print a version ----------------


def stand_in(path, version):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho %s\n" % version)
    path.chmod(0o755)
    return str(path)


def test_finding_python39_should_pass_over_a_python39_that_is_not_39_and_take_pyenvs_newest(
    tmp_path,
):
    stand_in(tmp_path / "bin" / "python3.9", "3.11")  # e.g. a pyenv shim of another version
    stand_in(tmp_path / "pyenv" / "versions" / "3.9.2" / "bin" / "python3.9", "3.9")
    newest = stand_in(tmp_path / "pyenv" / "versions" / "3.9.18" / "bin" / "python3.9", "3.9")
    environ = {"PATH": str(tmp_path / "bin"), "PYENV_ROOT": str(tmp_path / "pyenv")}
    assert find_python39(environ) == newest


def test_finding_python39_should_ask_pyenv_for_its_root_and_prefer_path(tmp_path):
    root = tmp_path / "somewhere"
    in_pyenv = stand_in(root / "versions" / "3.9.7" / "bin" / "python3.9", "3.9")
    stand_in(tmp_path / "bin" / "pyenv", root)  # `pyenv root` prints the root
    assert find_python39({"PATH": str(tmp_path / "bin")}) == in_pyenv
    on_path = stand_in(tmp_path / "bin" / "python3.9", "3.9")
    assert find_python39({"PATH": str(tmp_path / "bin")}) == on_path


def test_finding_python39_should_take_the_variable_and_refuse_a_wrong_one(tmp_path):
    stand_in(tmp_path / "bin" / "python3.9", "3.9")
    chosen = stand_in(tmp_path / "chosen" / "python", "3.9")
    environ = {"PATH": str(tmp_path / "bin"), PYTHON39_ENV: chosen}
    assert find_python39(environ) == chosen
    with pytest.raises(ValueError, match=PYTHON39_ENV):
        find_python39(dict(environ, **{PYTHON39_ENV: stand_in(tmp_path / "py311", "3.11")}))


def test_finding_python39_should_give_none_when_there_is_none(tmp_path):
    stand_in(tmp_path / "bin" / "python3", "3.11")
    assert find_python39({"PATH": str(tmp_path / "bin")}) is None
