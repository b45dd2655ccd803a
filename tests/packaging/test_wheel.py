"""`python -m build --wheel` (the venv's build) makes one wheel with the five packages, the
bridge's OpenAPI document, the built-in template configuration modules and the commands."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile

import pytest

from tests.packaging.pkgbuild import ROOT, VERSION, entry_point_scripts, project_scripts

PACKAGES = ("ovmproto", "ovmsys", "guestagent", "templateconfig", "hostbridge")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: setuptools writes build/ and egg-info next to the sources it builds.
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        "tar -C %s --exclude=__pycache__ -cf - pyproject.toml README.md bin %s | tar -C %s -xf -"
        % (ROOT, " ".join(PACKAGES), src),
        shell=True,
        check=True,
        timeout=60,
    )
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), "."],
        cwd=str(src),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and "No module named build" in result.stdout:
        pytest.skip("the venv lacks `build` (pip install -e '.[dev]')")
    assert result.returncode == 0, result.stdout[-3000:]
    wheels = os.listdir(str(out))
    assert wheels == ["ovmd-%s-py3-none-any.whl" % VERSION]
    return os.path.join(str(out), wheels[0])


def test_the_wheel_should_hold_the_packages_the_openapi_document_and_the_modules(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert "%s/__init__.py" % package in names
        expected = {
            "%s/%s" % (package, f)
            for f in os.listdir(os.path.join(ROOT, package))
            if f.endswith(".py")
        }
        assert expected <= names, expected - names
    assert "hostbridge/openapi.json" in names
    for module in os.listdir(os.path.join(ROOT, "templateconfig", "scripts")):
        assert "templateconfig/scripts/%s" % module in names
    assert "templateconfig/builtin/network.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_the_wheel_should_carry_the_commands(wheel):
    with zipfile.ZipFile(wheel) as z:
        text = z.read("ovmd-%s.dist-info/entry_points.txt" % VERSION).decode()
        script = z.read("ovmd-%s.data/scripts/ovmd" % VERSION).decode()
    entry_points = configparser.ConfigParser()
    entry_points.read_string(text)
    assert dict(entry_points["console_scripts"]) == entry_point_scripts()
    # ovmd is a plain script (no generated wrapper importing re); pip fixes its #! on install.
    assert script.startswith("#!python\n") and "from guestagent.cli import main" in script
    assert set(project_scripts()) == {
        "ovmd",
        "hostbridge",
        "vmmessage",
        "ovm_vmmessage",
        "ovm-template-config",
        "ovm-chkconfig",
        "ovm-template-initial-config",
    }
