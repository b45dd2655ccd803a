"""The guest side (ovmproto, ovmsys, guestagent) must run on Python 3.9: guests carry older
interpreters.

vermin checks the syntax and standard library features everywhere. Where a real 3.9 exists (pyenv
has one on the development machines; a fresh machine may not), every file is also byte-compiled
with it, and every module imported with it, which catches what vermin cannot see: annotations
like ``int | None`` evaluated when a function is defined, keyword arguments 3.9 does not know.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("ovmproto", "ovmsys", "guestagent")
PYENV_PY39 = "/root/.pyenv/versions/3.9.18/bin/python3.9"


def python39():
    if os.access(PYENV_PY39, os.X_OK):
        return PYENV_PY39
    return shutil.which("python3.9")


needs_py39 = pytest.mark.skipif(
    python39() is None,
    reason="no Python 3.9 interpreter here (%s or python3.9 on PATH); vermin still ran"
    % PYENV_PY39,
)


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


@needs_py39
def test_every_file_should_byte_compile_with_python_39(tmp_path):
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(tmp_path))  # keep 3.9's .pyc out of the tree
    result = subprocess.run(
        [python39(), "-m", "py_compile"] + source_files(),
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


@needs_py39
def test_every_module_should_import_with_python_39(tmp_path):
    py = python39()
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
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONPYCACHEPREFIX=str(tmp_path / "pyc")
    )
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
