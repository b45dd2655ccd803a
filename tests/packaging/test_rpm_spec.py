"""packaging/rpm/ovmd.spec built with rpmbuild (Debian's rpm package) by packaging/build-rpm.sh:
two noarch RPMs with the right files, requirements and scriptlets."""

from __future__ import annotations

import pytest

from tests.packaging.pkgbuild import build_rpms, command_output


@pytest.fixture(scope="module")
def rpms(tmp_path_factory):
    return build_rpms(tmp_path_factory.mktemp("rpms"))


@pytest.fixture(scope="module")
def el9_rpms(tmp_path_factory):
    return build_rpms(tmp_path_factory.mktemp("rpms-el9"), flavour="el9")


def rpm_query(path, *args):
    return command_output("rpm", "-qp", *args, path)


def files(path):
    return set(rpm_query(path, "-l").split())


def requires(path):
    return {line.strip() for line in rpm_query(path, "--requires").splitlines()}


def test_the_guest_rpm_should_hold_the_agent_its_unit_and_udev_rule(rpms):
    listed = files(rpms["ovmd"])
    assert {
        "/usr/bin/ovmd",
        "/usr/lib/systemd/system/ovmd.service",
        "/usr/lib/udev/rules.d/90-ovmd.rules",
        "/usr/lib/ovmd/ovmproto/framing.py",
        "/usr/lib/ovmd/ovmsys/notify.py",
        "/usr/lib/ovmd/guestagent/daemon.py",
        "/usr/share/man/man1/ovmd.1",
        # template configuration
        "/usr/sbin/ovm-template-config",
        "/usr/sbin/ovm-chkconfig",
        "/usr/sbin/ovm-template-initial-config",
        "/usr/lib/ovmd/templateconfig/cli.py",
        "/usr/lib/systemd/system/ovm-template-initial-config.service",
        "/usr/lib/systemd/system/ovmd-serial@.service",
        "/etc/template.d/scripts/network",
        "/etc/sysconfig/ovm-template-initial-config",
        "/usr/share/man/man8/ovm-template-config.8",
    } <= listed
    assert not [p for p in listed if "hostbridge" in p]
    etc = {p for p in listed if p.startswith("/etc/")}
    assert {p for p in etc if not p.startswith(("/etc/template.d", "/etc/sysconfig/"))} == set()
    # The modules are the operator's to edit, as the original's were: kept on upgrade.
    assert set(rpm_query(rpms["ovmd"], "-c").split()) == {
        p for p in etc if p.startswith(("/etc/template.d/scripts/", "/etc/sysconfig/"))
    }


def test_the_host_rpm_should_hold_the_bridge_its_commands_unit_and_config(rpms):
    listed = files(rpms["hostbridge"])
    assert {
        "/usr/bin/hostbridge",
        "/usr/bin/vmmessage",
        "/usr/bin/ovm_vmmessage",
        "/usr/lib/systemd/system/hostbridge.service",
        "/etc/hostbridge/hostbridge.toml",
        "/usr/lib/sysusers.d/hostbridge.conf",
        "/usr/lib/hostbridge/ovmproto/framing.py",
        "/usr/lib/hostbridge/ovmsys/notify.py",
        "/usr/lib/hostbridge/hostbridge/openapi.json",
        "/usr/share/bash-completion/completions/vmmessage",
    } <= listed
    assert not [p for p in listed if "guestagent" in p or "ovmd.service" in p]
    assert rpm_query(rpms["hostbridge"], "-c").split() == ["/etc/hostbridge/hostbridge.toml"]


def test_the_two_rpms_should_share_no_file(rpms):
    shared = files(rpms["ovmd"]) & files(rpms["hostbridge"])
    assert {p for p in shared if not p.startswith("/usr/share/")} == set()


def test_the_rpms_should_require_their_python_and_modules_only(rpms):
    guest, host = requires(rpms["ovmd"]), requires(rpms["hostbridge"])
    assert {"python(abi) >= 3.9", "python3-click"} <= guest
    assert not [r for r in guest if "aiohttp" in r or "orjson" in r]
    assert {"python(abi) >= 3.11", "python3-click", "python3-aiohttp", "shadow-utils"} <= host
    assert "python3-prometheus_client" in host
    assert not [r for r in host if "orjson" in r]


def test_the_host_rpm_should_recommend_libvirt_python_for_the_run_states(rpms):
    # Without it the bridge works and every run state is "unknown": recommended, not required.
    recommends = rpm_query(rpms["hostbridge"], "--recommends").split()
    assert recommends == ["python3-libvirt"]
    assert not [r for r in requires(rpms["hostbridge"]) if "libvirt" in r]


def test_the_el9_build_should_run_the_bridge_on_python_3_11(el9_rpms):
    host = requires(el9_rpms["hostbridge"])
    assert {"/usr/bin/python3.11", "python3.11-click", "python3.11-aiohttp"} <= host
    assert "python3.11-prometheus_client" in host
    guest = requires(el9_rpms["ovmd"])
    assert "/usr/bin/python3" in guest and "python3-click" in guest
    # Compiled by the interpreter that runs each package (3.11 here for both: the build host's).
    assert [p for p in files(el9_rpms["hostbridge"]) if p.endswith(".cpython-311.pyc")]


def test_the_scriptlets_should_create_the_group_and_never_start_the_agent(rpms):
    host = rpm_query(rpms["hostbridge"], "--scripts")
    assert "groupadd -r hostbridge" in host
    assert "systemctl preset hostbridge.service" in host
    guest = rpm_query(rpms["ovmd"], "--scripts")
    assert "try-restart ovmd.service" in guest
    assert not [w for w in ("systemctl enable", "systemctl start", "preset ovmd") if w in guest]
    # The first boot's unit by its preset (enabled, never started); the modules enabled.
    assert "systemctl preset ovm-template-initial-config.service" in guest
    assert "ovm-chkconfig --add" in guest


def test_the_cockpit_rpm_should_hold_the_page_and_require_cockpit_and_the_bridge(rpms):
    page = {"manifest.json", "index.html", "hostbridge.js", "hostbridge.css"}
    listed = files(rpms["hostbridge-cockpit"])
    assert {"/usr/share/cockpit/hostbridge/" + f for f in page} <= listed
    assert not [p for p in listed if p.startswith(("/usr/bin", "/usr/lib", "/etc"))]
    assert not listed & (files(rpms["hostbridge"]) | files(rpms["ovmd"]))
    host = requires(rpms["hostbridge-cockpit"])
    assert "cockpit-bridge" in host
    assert [r for r in host if r.startswith("hostbridge = 0.1.0")]
