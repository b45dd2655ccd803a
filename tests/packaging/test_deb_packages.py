"""The .debs built by packaging/build-deb.sh: lintian-clean, the right dependencies, files that do
not collide, launchers that match the wheel's console scripts, units installed the intended way."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.packaging.pkgbuild import (
    PACKAGING,
    build_debs,
    command_output,
    project_scripts,
    require_tools,
)

GUEST_COMMANDS = {"ovmd"}
# Template configuration's commands, for root: in /usr/sbin of the guest package.
GUEST_ADMIN_COMMANDS = {"ovm-template-config", "ovm-chkconfig", "ovm-template-initial-config"}
HOST_COMMANDS = {"hostbridge", "vmmessage", "ovm_vmmessage"}


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    return build_debs(tmp_path_factory.mktemp("debs"))


def dpkg_deb(*args):
    return command_output("dpkg-deb", *args)


def files_of(deb):
    """The regular files and links a .deb installs (directories left out), as absolute paths."""
    paths = set()
    for line in dpkg_deb("--contents", deb).splitlines():
        mode, path = line.split()[0], line.split()[5]
        if not mode.startswith("d"):
            paths.add(path[1:])  # "./usr/bin/ovmd" -> "/usr/bin/ovmd"
    return paths


def maintainer_script(deb, name, tmp_path):
    out = tmp_path / os.path.basename(deb)
    subprocess.run(["dpkg-deb", "--control", deb, str(out)], check=True, timeout=60)
    path = out / name
    return path.read_text(encoding="utf-8") if path.exists() else ""


def test_lintian_should_report_no_error_and_no_warning(debs):
    require_tools("lintian")
    result = subprocess.run(
        ["lintian", "--fail-on", "none", "--suppress-tags", "running-with-root-privileges"]
        + sorted(debs.values()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    complaints = [line for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert complaints == [], result.stdout
    # An override would hide a complaint: each must be justified, and today there is none.
    assert not [
        p for p in os.listdir(os.path.join(PACKAGING, "debian")) if p.endswith("lintian-overrides")
    ]


def depends(deb):
    text = dpkg_deb("--field", deb, "Depends")
    return [d.strip() for d in text.strip().split(",")]


def test_the_guest_package_should_need_only_python_3_9_and_click(debs):
    deps = depends(debs["ovmd"])
    assert "python3 (>= 3.9)" in deps
    assert "python3-click" in deps
    assert not [d for d in deps if "aiohttp" in d or "orjson" in d or "hostbridge" in d], deps


def test_the_host_package_should_need_python_3_11_click_and_aiohttp(debs):
    deps = depends(debs["hostbridge"])
    for wanted in (
        "python3 (>= 3.11)",
        "python3-click",
        "python3-aiohttp",
        "python3-prometheus-client",
    ):
        assert wanted in deps
    assert not [d for d in deps if "orjson" in d or d.startswith("ovmd")], deps


def test_the_host_package_should_recommend_libvirt_python_for_the_run_states(debs):
    # Without it the bridge works and every run state is "unknown": recommended, not required.
    assert dpkg_deb("--field", debs["hostbridge"], "Recommends").strip().split(", ") == [
        "python3-libvirt"
    ]
    assert not [d for d in depends(debs["hostbridge"]) if "libvirt" in d]


def test_the_two_packages_should_share_no_file_so_both_can_be_installed(debs):
    guest, host = files_of(debs["ovmd"]), files_of(debs["hostbridge"])
    shared = {p for p in guest & host if not p.startswith("/usr/share/doc/")}
    assert shared == set()
    assert not [p for p in guest | host if "__pycache__" in p or p.endswith(".pyc")]


def test_each_package_should_carry_its_own_protocol_code_and_commands(debs):
    guest, host = files_of(debs["ovmd"]), files_of(debs["hostbridge"])
    assert {"/usr/bin/" + c for c in GUEST_COMMANDS} == {
        p for p in guest if p.startswith("/usr/bin/")
    }
    assert {"/usr/bin/" + c for c in HOST_COMMANDS} == {
        p for p in host if p.startswith("/usr/bin/")
    }
    assert {"/usr/sbin/" + c for c in GUEST_ADMIN_COMMANDS} == {
        p for p in guest if p.startswith("/usr/sbin/")
    }
    assert not [p for p in host if p.startswith("/usr/sbin/")]
    assert "/usr/lib/ovmd/templateconfig/cli.py" in guest
    assert "/etc/template.d/scripts/network" in guest
    assert "/lib/systemd/system/ovm-template-initial-config.service" in guest
    assert "/lib/systemd/system/ovmd-serial@.service" in guest
    for module in ("ovmproto/framing", "ovmproto/codec", "ovmproto/jsonlib", "ovmsys/notify"):
        assert "/usr/lib/ovmd/%s.py" % module in guest
        assert "/usr/lib/hostbridge/%s.py" % module in host
    assert "/usr/lib/ovmd/guestagent/daemon.py" in guest
    assert not [p for p in guest if "/hostbridge/" in p]
    assert "/usr/lib/hostbridge/hostbridge/openapi.json" in host
    assert not [p for p in host if "/guestagent/" in p]
    assert "/lib/systemd/system/ovmd.service" in guest
    assert "/lib/udev/rules.d/90-ovmd.rules" in guest
    assert "/lib/systemd/system/hostbridge.service" in host
    assert "/etc/hostbridge/hostbridge.toml" in host
    assert "/usr/share/bash-completion/completions/vmmessage" in host


def test_the_configuration_files_should_be_conffiles(debs, tmp_path):
    conffiles = maintainer_script(debs["hostbridge"], "conffiles", tmp_path)
    assert conffiles.split() == ["/etc/hostbridge/hostbridge.toml"]
    guest = maintainer_script(debs["ovmd"], "conffiles", tmp_path).split()
    modules = ["network", "datetime", "ssh", "user", "authentication", "system"]
    assert sorted(guest) == sorted(
        ["/etc/sysconfig/ovm-template-initial-config"]
        + ["/etc/template.d/scripts/" + m for m in modules]
    )


def test_the_launchers_should_run_what_the_wheel_console_scripts_run():
    for command, target in project_scripts().items():
        module, function = target.split(":")
        with open(os.path.join(PACKAGING, "bin", command), encoding="utf-8") as f:
            text = f.read()
        guest = GUEST_COMMANDS | GUEST_ADMIN_COMMANDS
        private = "/usr/lib/ovmd" if command in guest else "/usr/lib/hostbridge"
        assert text.startswith("#!/usr/bin/python3 -I\n"), command
        assert 'sys.path.insert(0, "%s")' % private in text, command
        assert "from %s import %s" % (module, function) in text, command
        assert "sys.exit(%s())" % function in text, command
    assert set(project_scripts()) == GUEST_COMMANDS | GUEST_ADMIN_COMMANDS | HOST_COMMANDS


def test_the_bridge_unit_should_be_enabled_and_the_agent_unit_left_to_udev(debs, tmp_path):
    host = maintainer_script(debs["hostbridge"], "postinst", tmp_path)
    assert "deb-systemd-helper enable 'hostbridge.service'" in host
    assert "groupadd --system hostbridge" in host
    guest = maintainer_script(debs["ovmd"], "postinst", tmp_path)
    # Never enabled nor started by the package: udev starts it when the port appears.
    assert "deb-systemd-helper enable 'ovmd.service'" not in guest
    # The first boot's unit is enabled (it does nothing until an image is sealed), never started.
    assert "deb-systemd-helper enable 'ovm-template-initial-config.service'" in guest
    assert "/usr/sbin/ovm-chkconfig --add" in guest
    assert "deb-systemd-invoke $_dh_action" not in guest
    assert "udevadm trigger --action=add --subsystem-match=virtio-ports" in guest


COCKPIT_PAGE = {
    "/usr/share/cockpit/hostbridge/" + f
    for f in ("manifest.json", "index.html", "hostbridge.js", "hostbridge.css")
}


def test_the_cockpit_package_should_hold_the_page_alone_and_need_cockpit_and_the_bridge(debs):
    page = files_of(debs["hostbridge-cockpit"])
    assert {p for p in page if not p.startswith("/usr/share/doc/")} == COCKPIT_PAGE
    assert "/usr/share/doc/hostbridge-cockpit/cockpit.md.gz" in page  # dh_compress
    assert dpkg_deb("--field", debs["hostbridge-cockpit"], "Architecture").strip() == "all"
    deps = depends(debs["hostbridge-cockpit"])
    assert "cockpit-bridge" in deps and "hostbridge" in deps
    others = files_of(debs["ovmd"]) | files_of(debs["hostbridge"])
    assert {p for p in page & others if not p.startswith("/usr/share/doc/")} == set()
