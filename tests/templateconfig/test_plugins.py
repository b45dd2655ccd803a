"""Plugin headers and ovm-chkconfig: enabling modules per target, as the original's tool did."""

import pytest

from templateconfig.common import TemplateError
from templateconfig.plugins import parse_header
from tests.templateconfig.support import chkconfig, plugin, template_dir

HEADER = """#!/usr/bin/python3
### BEGIN PLUGIN INFO
# name: example
# configure: 60
# cleanup: 40
# description: Example module that does
#   several things.
### END PLUGIN INFO
"""


def test_a_header_should_give_name_targets_priorities_and_the_whole_description():
    p = parse_header(HEADER, "/x/example")
    assert (p.name, p.priorities) == ("example", {"configure": 60, "cleanup": 40})
    assert p.description == "Example module that does several things."


@pytest.mark.parametrize(
    "text, why",
    [
        ("#!/bin/sh\necho hi\n", "no plugin header"),
        (HEADER.replace("# name: example\n", ""), "name is missing"),
        (HEADER.replace("configure: 60", "configure: soon"), "priority of configure"),
        (HEADER.replace("# name: example", "# name: ../etc"), "not a plain name"),
    ],
)
def test_a_bad_header_should_be_refused_in_one_line(text, why):
    with pytest.raises(TemplateError, match=why):
        parse_header(text, "/x/example")


def test_add_should_enable_every_declared_target_and_list_should_show_it(tmp_path):
    d = template_dir(tmp_path, builtin=("network", "authentication"))
    listing = chkconfig(d, "--list")
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in listing.stdout.splitlines()}
    # configure unconfigure reconfigure cleanup suspend resume migrate shutdown
    assert rows["network"] == ["on:30", "on:30", "on:30", "on:30", "off", "off", "off", "off"]
    assert rows["authentication"] == ["on:90", "off", "on:90"] + ["off"] * 5
    links = sorted(p.name for p in (d / "configure.d").iterdir())
    assert links == ["30network", "90authentication"]


def test_on_and_off_should_switch_single_targets_and_del_every_one(tmp_path):
    d = template_dir(tmp_path, builtin=("network",))
    assert chkconfig(d, "--target=cleanup,unconfigure", "network", "off").returncode == 0
    row = chkconfig(d, "--list", "network").stdout.splitlines()[1].split()
    assert row[1:5] == ["on:30", "off", "on:30", "off"]
    assert chkconfig(d, "--del", "network").returncode == 0
    assert chkconfig(d, "--list", "network").stdout.splitlines()[1].split()[1:] == ["off"] * 8


def test_a_target_the_module_does_not_implement_should_be_refused(tmp_path):
    d = template_dir(tmp_path, builtin=("authentication",))
    done = chkconfig(d, "--target=cleanup", "authentication", "on")
    assert (done.returncode, done.stderr) == (
        1,
        "ovm-chkconfig: module authentication does not implement cleanup\n",
    )


@pytest.mark.parametrize(
    "args, code",
    [((), 2), (("--add",), 2), (("network", "maybe"), 2), (("--add", "nosuch"), 1)],
)
def test_bad_use_should_be_one_line_and_a_documented_status(tmp_path, args, code):
    d = template_dir(tmp_path, builtin=())
    done = chkconfig(d, *args)
    assert done.returncode == code
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ovm-chkconfig: ")


def test_a_module_in_the_originals_style_should_register(tmp_path):
    text = plugin("satellite", {"configure": 95, "cleanup": 10}, "print('hi')\n")
    d = template_dir(tmp_path, builtin=(), extra={"satellite": text})
    assert chkconfig(d, "--add", "satellite").returncode == 0
    assert [p.name for p in (d / "cleanup.d").iterdir()] == ["10satellite"]
