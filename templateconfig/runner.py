"""Running one target: each enabled module in priority order, as its own process, with a timeout.

A module gets every key/value as a JSON object on its standard input and hands an object on (to an
unnamed temporary file given as ``--output FD``; see cli.py). A module that fails, refuses its
input or runs over its timeout is recorded as failed; its process group is killed on timeout; the
next module runs with what the failed one was given. So one module's bad key never undoes or
blocks another module's work, and the run's order is always the priorities'.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import MODULE_TIMEOUT
from .common import TemplateError
from .plugins import Plugin, Registry

# The directory holding this package: a module run with our interpreter imports templateconfig
# from there whatever its own sys.path would be.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ModuleResult:
    name: str
    priority: int
    status: str  # "ok", "failed" or "timeout"
    error: str = ""
    seconds: float = 0.0


def _command(path: str) -> list[str]:
    """How to start the script at ``path``: a Python script with this interpreter (modules of the
    original start with ``#!/usr/bin/env python``, which a Python 3 system may not have)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError as e:
        raise TemplateError("%s: cannot read it (%s)" % (path, e.strerror)) from None
    if first.startswith(b"#!") and b"python" in first:
        return [sys.executable, path]
    if not os.access(path, os.X_OK):
        raise TemplateError("%s: not executable" % path)
    return [path]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def call_module(path: str, args: list[str], data: bytes, timeout: float) -> bytes:
    """Run the module at ``path`` with ``args`` (plus ``--output FD``), ``data`` on its stdin;
    return what it wrote to FD (or, if nothing, to stdout). TemplateError on failure or timeout."""
    with tempfile.TemporaryFile() as out:
        fd = out.fileno()
        try:
            proc = subprocess.Popen(
                _command(path) + args + ["--output", str(fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(fd,),
                env=_env(),
                start_new_session=True,  # its own group: a timeout kills what it started too
                cwd="/",
            )
        except OSError as e:
            raise TemplateError("%s: cannot run it (%s)" % (path, e.strerror)) from None
        try:
            stdout, stderr = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            raise ModuleTimeout("killed after %gs without finishing" % timeout) from None
        if proc.returncode != 0:
            lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            why = lines[-1].strip()[:300] if lines else "exit status %d" % proc.returncode
            raise TemplateError(why)
        out.seek(0)
        result = out.read()
        return result if result.strip() else stdout


class ModuleTimeout(TemplateError):
    pass


def enumerate_module(plugin: Plugin, target: str, timeout: float = MODULE_TIMEOUT) -> list:
    raw = call_module(plugin.path, ["--enumerate", target], b"", timeout)
    try:
        params = json.loads(raw or b"[]")
    except ValueError:
        raise TemplateError("%s: --enumerate did not print JSON" % plugin.name) from None
    if not isinstance(params, list):
        raise TemplateError("%s: --enumerate did not print a list" % plugin.name)
    return params


def selected(registry: Registry, target: str, only: str | None = None) -> list[tuple[int, Plugin]]:
    """The modules a run of ``target`` runs, in order: the enabled ones, or with ``only`` that
    module alone (enabled or not, as long as it implements the target)."""
    if only is not None:
        plugin = registry.script(only)
        if target not in plugin.priorities:
            raise TemplateError("module %s does not implement %s" % (only, target))
        return [(plugin.priorities[target], plugin)]
    return [(priority, registry.script(name)) for priority, name in registry.enabled(target)]


def run_target(
    registry: Registry,
    target: str,
    params: dict[str, str],
    only: str | None = None,
    timeout: float = MODULE_TIMEOUT,
    on_result: Callable[[ModuleResult], None] | None = None,
) -> tuple[dict[str, str], list[ModuleResult]]:
    """Run ``target``; return the object the last module handed on, and each module's result."""
    results = []
    for priority, plugin in selected(registry, target, only):
        started = time.monotonic()
        try:
            raw = call_module(plugin.path, [target], json.dumps(params).encode("utf-8"), timeout)
            handed = json.loads(raw) if raw.strip() else params
            if not isinstance(handed, dict):
                raise TemplateError("handed on something other than a JSON object")
            params = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in handed.items()}
            result = ModuleResult(plugin.name, priority, "ok")
        except ModuleTimeout as e:
            result = ModuleResult(plugin.name, priority, "timeout", str(e))
        except (TemplateError, ValueError) as e:
            result = ModuleResult(plugin.name, priority, "failed", str(e) or "failed")
        result.seconds = time.monotonic() - started
        results.append(result)
        if on_result is not None:
            on_result(result)
    return params, results
