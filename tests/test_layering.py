"""The architecture, checked: which package may import which, and the layers inside each package.

Read from the source (ast), so an import inside a function counts as much as one at the top: a
lazy import is still a dependency. A new module must be given a place in LAYERS; the failure
message says so. CONTRIBUTING.md explains the layers.
"""

import ast
import os

import pytest

from tests.support.processes import ROOT

# Which of our packages each package may import (itself always).
ALLOWED = {
    "ovmproto": set(),  # pure: the wire protocol only
    "ovmsys": set(),  # plumbing: no protocol, no policy
    "guestagent": {"ovmproto", "ovmsys"},
    "hostbridge": {"ovmproto", "ovmsys"},  # never the guest's package, nor the guest ours
    # Template configuration, in the guest: over the agent's client; the agent never imports it.
    "templateconfig": {"ovmproto", "ovmsys", "guestagent"},
}

# Inside each package, from the bottom: a module may import modules of its own layer or lower ones.
LAYERS = {
    "ovmproto": [
        {
            "ovmproto",
            "ovmproto.errors",
            "ovmproto.errorcodes",
            "ovmproto.limits",
            "ovmproto.templatekeys",
        },
        {"ovmproto.compactjson", "ovmproto.jsonlib"},
        {"ovmproto.framing", "ovmproto.messages"},
        {"ovmproto.codec"},
        {"ovmproto.handshake"},
    ],
    "ovmsys": [
        {
            "ovmsys",
            "ovmsys.atomicfile",
            "ovmsys.ratelimit",
            "ovmsys.securedir",
            "ovmsys.unixsocket",
        },
        {"ovmsys.notify"},
    ],
    "guestagent": [
        {"guestagent", "guestagent.config", "guestagent.logsetup", "guestagent.output"},
        {
            "guestagent.cache",
            "guestagent.channel",
            "guestagent.loop",
            "guestagent.client",
            "guestagent.netlink",
        },
        {"guestagent.store", "guestagent.facts"},
        {"guestagent.service"},
        {"guestagent.hostlink", "guestagent.localserver", "guestagent.factwatch"},
        {"guestagent.daemon"},
        {"guestagent.cli"},
    ],
    "templateconfig": [
        {"templateconfig", "templateconfig.common", "templateconfig.log", "templateconfig.cliargs"},
        {"templateconfig.cli", "templateconfig.plugins", "templateconfig.agent"},
        {"templateconfig.runner", "templateconfig.builtin", "templateconfig.builtin.validate"},
        {"templateconfig.builtin.base"},
        {"templateconfig.builtin.passwords", "templateconfig.builtin.netconfig"},
        {
            "templateconfig.builtin.network",
            "templateconfig.builtin.datetime",
            "templateconfig.builtin.ssh",
            "templateconfig.builtin.user",
            "templateconfig.builtin.authentication",
            "templateconfig.builtin.system",
        },
        {"templateconfig.report"},
        {"templateconfig.master", "templateconfig.chkconfig", "templateconfig.firstboot"},
    ],
    "hostbridge": [
        {"hostbridge", "hostbridge.errors", "hostbridge.model", "hostbridge.humanize"},
        {"hostbridge.config", "hostbridge.tasks"},
        # transports, stores and the pure pieces of a guest's link
        {
            "hostbridge.backoff",
            "hostbridge.channels",
            "hostbridge.store",
            "hostbridge.pgstore",
            "hostbridge.poolkey",
            "hostbridge.pglisten",
            "hostbridge.forward",
            "hostbridge.groupcommit",
            "hostbridge.mirror",
            "hostbridge.facts",
            "hostbridge.throttle",
            "hostbridge.replies",
            "hostbridge.hello",
            "hostbridge.discovery",
            "hostbridge.lifecycle",
            "hostbridge.auth",
            "hostbridge.admission",
            "hostbridge.apiclient",
            "hostbridge.events",
        },
        {"hostbridge.session"},
        # the parts that use the link: they import the session, never the reverse
        {"hostbridge.delivery", "hostbridge.mirrorsync", "hostbridge.keepalive"},
        {"hostbridge.guest"},
        {"hostbridge.pool", "hostbridge.remote"},
        {"hostbridge.bridge"},
        {"hostbridge.metrics"},
        {"hostbridge.api"},
        {"hostbridge.daemon"},
        # the command lines, over the API's client
        {
            "hostbridge.render",
            "hostbridge.cli",
            "hostbridge.cli.commands",
            "hostbridge.cli.configure",
            "hostbridge.cli.credentials",
            "hostbridge.cli.manager",
            "hostbridge.cli.watching",
            "hostbridge.compat",
        },
    ],
}

# Imports that go up on purpose, each with its reason.
EXCEPTIONS = {
    # `python -m guestagent.daemon` is `ovmd --daemon`: it hands its command line to the CLI's one
    # parser, so the two spellings cannot drift apart.
    ("guestagent.daemon", "guestagent.cli"),
}


def _modules():
    """{module name: path} of every module in our packages."""
    found = {}
    for package in ALLOWED:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports_of(module):
    """The modules of ours that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package_of_file = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of_file.split(".")[
                    : len(package_of_file.split(".")) - node.level + 1
                ]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            subs = {"%s.%s" % (target, a.name) for a in node.names} & MODULES.keys()
            names.update(subs or {target})
    ours = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]  # pkg.mod.attr -> pkg.mod
        if name and name.split(".")[0] in ALLOWED:
            ours.add(name)
    ours.discard(module)
    return ours


def layer_of(module):
    for i, layer in enumerate(LAYERS[module.split(".")[0]]):
        if module in layer:
            return i
    return None


def test_every_module_should_have_a_place_in_the_layers():
    placed = set().union(*(set().union(*layers) for layers in LAYERS.values()))
    assert sorted(MODULES.keys() - placed) == [], "give these modules a layer in LAYERS"
    assert sorted(placed - MODULES.keys()) == [], "these modules no longer exist"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_should_import_only_what_its_package_and_layer_allow(module):
    package = module.split(".")[0]
    mine = layer_of(module)
    for dep in sorted(imports_of(module)):
        dep_package = dep.split(".")[0]
        if dep_package != package:
            assert dep_package in ALLOWED[package], "%s imports %s: %s may not import %s" % (
                module,
                dep,
                package,
                dep_package,
            )
            continue
        theirs = layer_of(dep)
        if (module, dep) in EXCEPTIONS or mine is None or theirs is None:
            continue  # unplaced modules fail the test above
        assert theirs <= mine, "%s (layer %d) imports %s, a higher layer (%d)" % (
            module,
            mine,
            dep,
            theirs,
        )


def test_the_check_should_see_relative_lazy_and_from_imports():
    # The session imports none of the parts that use it; the guest imports all of them.
    assert "hostbridge.delivery" not in imports_of("hostbridge.session")
    assert {"hostbridge.delivery", "hostbridge.mirrorsync", "hostbridge.keepalive"} <= imports_of(
        "hostbridge.guest"
    )
    assert "guestagent.cli" in imports_of("guestagent.daemon")  # lazy, inside main()
    assert "hostbridge.render" in imports_of("hostbridge.compat")  # from hostbridge import render
