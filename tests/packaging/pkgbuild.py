"""Build the project's packages for the packaging tests (the scripts under packaging/)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from tests.support.processes import ROOT

PACKAGING = os.path.join(ROOT, "packaging")
VERSION = "0.1.0"


def require_tools(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip("missing %s (scripts/bootstrap.sh --test installs them)" % ", ".join(missing))


def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")


def command_output(*argv):
    """The stdout of a packaging tool that must succeed (dpkg-deb, rpm...)."""
    return subprocess.run(argv, capture_output=True, check=True, text=True, timeout=60).stdout


def _build(script, outdir, env=None):
    result = subprocess.run(
        [os.path.join(PACKAGING, script), str(outdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=dict(os.environ, **(env or {})),
    )
    assert result.returncode == 0, result.stdout[-4000:]


def build_debs(outdir):
    """{package name: path of its .deb}."""
    require_tools("dpkg-buildpackage", "dh", "dh_python3", "fakeroot")
    _build("build-deb.sh", outdir)
    debs = {
        os.path.basename(p).split("_")[0]: p for p in glob.glob(os.path.join(str(outdir), "*.deb"))
    }
    assert sorted(debs) == ["hostbridge", "hostbridge-cockpit", "ovmd"], debs
    return debs


def build_rpms(outdir, flavour=""):
    """{package name: path of its .rpm}; flavour "el9" keeps the spec's EL9 interpreter choices."""
    require_tools("rpmbuild", "rpm")
    _build("build-rpm.sh", outdir, {"RPM_FLAVOUR": flavour})
    rpms = {
        os.path.basename(p).rsplit("-", 2)[0]: p
        for p in glob.glob(os.path.join(str(outdir), "*.rpm"))
    }
    assert sorted(rpms) == ["hostbridge", "hostbridge-cockpit", "ovmd"], rpms
    return rpms


def project_scripts():
    """The wheel's commands as {command: "module:function"}: pyproject.toml's [project.scripts]
    and the plain scripts of [tool.setuptools] script-files (bin/ovmd)."""
    import re

    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)
    scripts = dict(data["project"]["scripts"])
    for path in data.get("tool", {}).get("setuptools", {}).get("script-files", []):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            found = re.search(r"^from ([\w.]+) import (\w+)$", f.read(), re.M)
        scripts[os.path.basename(path)] = "%s:%s" % found.groups()
    return scripts


def entry_point_scripts():
    """pyproject.toml's [project.scripts] alone: what the wheel's entry_points.txt declares."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]
