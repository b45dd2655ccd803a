"""Modules on disk: their plugin headers, and which targets each is enabled for.

A module is an executable in SCRIPTS_DIR whose header declares its name, the targets it
implements with a priority each, and a description:

    ### BEGIN PLUGIN INFO
    # name: network
    # configure: 30
    # cleanup: 30
    # description: Network configuration: host name, interfaces,
    #   DNS.
    ### END PLUGIN INFO

Enabling a module for a target (`ovm-chkconfig --add NAME`, or `--target T NAME on`) makes a link
``TEMPLATE_DIR/<target>.d/<priority><name>`` to the script, as SysV rc links do; a run lists that
directory, so the enabled set and the order are both on disk where an operator can see them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import SCRIPTS_DIR, TARGETS, TEMPLATE_DIR
from .common import TemplateError

BEGIN = "### BEGIN PLUGIN INFO"
END = "### END PLUGIN INFO"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")  # a letter first: links are NNname
_LINK = re.compile(r"^(\d{1,3})(.+)$")


@dataclass
class Plugin:
    name: str
    path: str
    priorities: dict[str, int] = field(default_factory=dict)  # target -> priority
    description: str = ""


def parse_header(text: str, path: str = "") -> Plugin:
    """The plugin header of a script's text; TemplateError (one line) when it is missing or bad."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == END)
    except StopIteration:
        raise TemplateError("%s: no plugin header (%s ... %s)" % (path, BEGIN, END)) from None
    fields: dict[str, str] = {}
    last = None
    for raw in lines[start + 1 : end]:
        if not raw.startswith("#"):
            raise TemplateError("%s: a header line does not start with #" % path)
        body = raw[1:]
        m = re.match(r"^ ([A-Za-z][A-Za-z0-9_-]*):\s*(.*)$", body)
        if m and not body.startswith("   "):
            last = m.group(1).lower()
            fields[last] = m.group(2).strip()
        elif last == "description" and body.strip():
            fields[last] += " " + body.strip()
        elif body.strip():
            raise TemplateError("%s: cannot read header line %r" % (path, raw[:60]))
    name = fields.pop("name", "")
    if not _NAME.match(name):
        raise TemplateError("%s: the header's name is missing or not a plain name" % path)
    plugin = Plugin(name=name, path=path, description=fields.pop("description", ""))
    for key, value in fields.items():
        if key not in TARGETS:
            continue  # fields a newer header may carry
        if not value.isdigit() or int(value) > 999:
            raise TemplateError("%s: priority of %s is not a number 0-999" % (path, key))
        plugin.priorities[key] = int(value)
    return plugin


class Registry:
    """The modules under ``template_dir`` (SCRIPTS_DIR and the <target>.d link directories)."""

    def __init__(self, template_dir: str = TEMPLATE_DIR, scripts_dir: str | None = None) -> None:
        self.template_dir = template_dir
        self.scripts_dir = scripts_dir or (
            SCRIPTS_DIR if template_dir == TEMPLATE_DIR else os.path.join(template_dir, "scripts")
        )

    def script(self, name: str) -> Plugin:
        if not _NAME.match(name):
            raise TemplateError("%s: not a module name" % name)
        path = os.path.join(self.scripts_dir, name)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except FileNotFoundError:
            raise TemplateError("no module %s in %s" % (name, self.scripts_dir)) from None
        plugin = parse_header(text, path)
        if plugin.name != name:
            raise TemplateError("%s: its header names it %s" % (path, plugin.name))
        return plugin

    def installed(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.scripts_dir))
        except FileNotFoundError:
            return []
        return [n for n in names if _NAME.match(n) and not n.endswith((".rpmnew", ".dpkg-new"))]

    def _target_dir(self, target: str) -> str:
        return os.path.join(self.template_dir, target + ".d")

    def _links(self, target: str) -> list[tuple[int, str, str]]:
        try:
            links = os.listdir(self._target_dir(target))
        except FileNotFoundError:
            return []
        out = []
        for link in links:
            m = _LINK.match(link)
            if m and _NAME.match(m.group(2)):
                out.append((int(m.group(1)), m.group(2), link))
        return sorted(out)

    def enabled(self, target: str) -> list[tuple[int, str]]:
        """(priority, name) of the modules enabled for ``target``, in run order."""
        return [(priority, name) for priority, name, _ in self._links(target)]

    def _unlink(self, target: str, name: str) -> None:
        for _, enabled, link in self._links(target):
            if enabled == name:
                os.unlink(os.path.join(self._target_dir(target), link))

    def set_enabled(self, plugin: Plugin, target: str, on: bool) -> None:
        if on and target not in plugin.priorities:
            raise TemplateError("module %s does not implement %s" % (plugin.name, target))
        self._unlink(target, plugin.name)
        directory = self._target_dir(target)
        if on:
            os.makedirs(directory, exist_ok=True)
            link = "%02d%s" % (plugin.priorities[target], plugin.name)
            os.symlink(os.path.join("..", "scripts", plugin.name), os.path.join(directory, link))

    def add(self, name: str) -> Plugin:
        """Enable ``name`` for every target its header declares."""
        plugin = self.script(name)
        for target in plugin.priorities:
            self.set_enabled(plugin, target, True)
        return plugin

    def delete(self, name: str) -> None:
        """Disable ``name`` everywhere (its script may already be gone)."""
        for target in TARGETS:
            self._unlink(target, name)
