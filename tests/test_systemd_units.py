"""systemd/ovmd.service and systemd/90-ovmd.rules: checked by systemd's own tools where they exist
(systemd-analyze verify and security; udevadm verify, which systemd 252 lacks), and for the
settings the agent relies on.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.support.processes import ROOT, script

UNIT = os.path.join(ROOT, "systemd", "ovmd.service")
RULES = os.path.join(ROOT, "systemd", "90-ovmd.rules")
PORT_NAME = "com.oracle.ovmd"
EXPOSURE_LIMIT = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def unit_settings(path=UNIT):
    """{section: {key: [values, in order]}} of a unit file (keys may repeat)."""
    with open(path, encoding="utf-8") as f:
        return parse_unit(f.read())


def parse_unit(text):
    """unit_settings() of a unit's text."""
    sections = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, "not key=value: %r" % line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def runnable_copy(tmp_path, text=None, unit=UNIT):
    """A copy of ``unit`` (or ``text``, its edited content) whose ExecStart runs this venv's
    command instead of /usr/bin's: verify needs the binary to exist."""
    if text is None:
        with open(unit, encoding="utf-8") as f:
            text = f.read()
    name = os.path.basename(unit)
    command = os.path.splitext(name)[0]  # ovmd.service runs ovmd
    installed = "ExecStart=/usr/bin/%s " % command
    assert installed in text
    text = text.replace(installed, "ExecStart=%s " % script(command))
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def analyze(*args):
    return subprocess.run(
        [SYSTEMD_ANALYZE] + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


def verify_lines(path, word):
    """What `systemd-analyze verify --man=no` says of the unit at ``path``, in lines naming
    ``word`` (a missing man page or binary of the machine aside: --man=no, "not found")."""
    result = analyze("verify", "--man=no", str(path))
    complaints = [
        line for line in result.stdout.splitlines() if word in line and "not found" not in line
    ]
    return complaints, result.stdout


def verify_complaints(tmp_path, unit, text=None, *args):
    """What `systemd-analyze verify` (with ``args``) says about a runnable copy of ``unit``
    (``text``: its edited content): its exit status and its lines that name the unit's command."""
    result = analyze("verify", *args, runnable_copy(tmp_path, text, unit))
    command = os.path.splitext(os.path.basename(unit))[0]
    return result.returncode, [line for line in result.stdout.splitlines() if command in line]


def broken_copy_complaints(tmp_path, unit, setting, *args):
    """verify_complaints for ``unit`` with ``setting`` (NAME=VALUE) given a bad value and followed
    by a misspelt setting: proof that a clean verify means something."""
    with open(unit, encoding="utf-8") as f:
        text = f.read()
    assert setting in text
    broken = text.replace(setting, setting.split("=")[0] + "=soon\nProtectSysstem=strict")
    _, complaints = verify_complaints(tmp_path, unit, broken, *args)
    assert any(line.endswith(": soon") for line in complaints), complaints
    assert any("ProtectSysstem" in line for line in complaints), complaints


@needs_analyze
def test_the_unit_should_pass_systemd_analyze_verify_without_a_warning(tmp_path):
    assert verify_complaints(tmp_path, UNIT) == (0, [])


@needs_analyze
def test_verify_should_catch_a_broken_copy_so_the_check_above_can_fail(tmp_path):
    broken_copy_complaints(tmp_path, UNIT, "RestartSec=1")


def exposure(path):
    result = analyze("security", "--offline=yes", path)
    if "--offline" in result.stdout and "unrecognized option" in result.stdout:
        pytest.skip("this systemd-analyze has no security --offline")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    return float(match.group(1))


@needs_analyze
def test_the_sandbox_should_keep_the_exposure_score_within_its_limit(tmp_path):
    score = exposure(runnable_copy(tmp_path))
    assert score <= EXPOSURE_LIMIT, "exposure %.1f, the limit is %.1f" % (score, EXPOSURE_LIMIT)


def test_the_unit_should_run_the_installed_daemon_as_a_notify_service():
    service = unit_settings()["Service"]
    assert service["ExecStart"] == ["/usr/bin/ovmd --daemon"]
    expected = {
        "Type": "notify",
        "Restart": "on-failure",
        "RestartSec": "1",
        "WatchdogSec": "30",
        "RuntimeDirectory": "ovmd",
        "RuntimeDirectoryMode": "0755",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "IPAddressDeny": "any",
        "DevicePolicy": "closed",
        "RestrictAddressFamilies": "AF_UNIX AF_NETLINK",
        "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {k: service.get(k, [None])[-1] for k in expected} == expected
    assert service["SystemCallFilter"][0] == "@system-service"
    assert "/dev/virtio-ports/%s rw" % PORT_NAME in service["DeviceAllow"]
    # Root, but with one capability at most (CAP_CHOWN, for the socket's group).
    assert service["CapabilityBoundingSet"][-1] in ("", "CAP_CHOWN")


def rule_lines(path=RULES):
    """The rules file's rules, continuation lines joined, comments dropped."""
    rules, pending = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            rules.append(pending + line)
            pending = ""
    assert not pending, "the rules file ends inside a continued line"
    return rules


_RULE_TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')
_MATCH_KEYS = {"ACTION", "KERNEL", "SUBSYSTEM", "ATTR", "ENV", "TAG", "DRIVER"}
_ASSIGN_KEYS = {"TAG", "ENV", "SYMLINK", "OWNER", "GROUP", "MODE", "RUN"}


def parse_rule(line):
    """[(key, attribute, operator, value)] of one rule; assert it is well-formed udev syntax."""
    tokens, pos = [], 0
    while pos < len(line):
        m = _RULE_TOKEN.match(line, pos)
        assert m, "cannot parse the rule at %r" % line[pos : pos + 40]
        key, attr, op, value, sep = m.groups()
        if op in ("==", "!="):
            assert key in _MATCH_KEYS, "%s cannot be matched" % key
        else:
            assert key in _ASSIGN_KEYS, "%s cannot be assigned" % key
        tokens.append((key, attr, op, value))
        pos = m.end()
        if not sep:
            assert line[pos:].strip() == ""
            break
    return tokens


def test_the_udev_rule_should_pass_udevadm_verify_when_this_systemd_has_it():
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed")
    probe = subprocess.run(
        [udevadm, "verify", "--help"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip("this udevadm has no verify (systemd < 254)")
    result = subprocess.run(
        [udevadm, "verify", RULES],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout


def test_the_udev_rule_should_start_the_agent_for_the_port_and_name_its_device():
    rules = rule_lines()
    assert len(rules) == 1
    tokens = parse_rule(rules[0])
    assert ("SUBSYSTEM", None, "==", "virtio-ports") in tokens
    assert ("ATTR", "name", "==", PORT_NAME) in tokens
    assert ("TAG", None, "+=", "systemd") in tokens
    wants = [v for k, a, op, v in tokens if (k, a, op) == ("ENV", "SYSTEMD_WANTS", "+=")]
    assert wants == ["ovmd.service"]
    assert os.path.exists(os.path.join(ROOT, "systemd", wants[0]))
    links = [v for k, a, op, v in tokens if k == "SYMLINK"]
    assert links == ["virtio-ports/" + PORT_NAME]


def test_the_unit_should_bind_to_the_device_the_udev_rule_names():
    link = next(v for k, a, op, v in parse_rule(rule_lines()[0]) if k == "SYMLINK")
    escape = shutil.which("systemd-escape")
    if escape is None:
        pytest.skip("systemd-escape is not installed")
    device = subprocess.run(
        [escape, "-p", "--suffix=device", "/dev/" + link],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    unit = unit_settings()["Unit"]
    assert unit["BindsTo"] == [device]
    assert unit["After"] == [device]


def test_the_daemon_should_look_for_the_port_where_udev_puts_it():
    from guestagent import channel

    link = next(v for k, a, op, v in parse_rule(rule_lines()[0]) if k == "SYMLINK")
    assert channel.DEFAULT_PATH == "/dev/" + link


# -- systemd/hostbridge.service (the host) ---------------------------------------------------------

BRIDGE_UNIT = os.path.join(ROOT, "systemd", "hostbridge.service")
BRIDGE_EXEC = "/usr/bin/hostbridge --config /etc/hostbridge/hostbridge.toml"


@needs_analyze
def test_the_bridge_unit_should_pass_systemd_analyze_verify_without_a_warning(tmp_path):
    # --man=no: Documentation=man:hostbridge(8) is installed by the packages, not on this machine.
    assert verify_complaints(tmp_path, BRIDGE_UNIT, None, "--man=no") == (0, [])


@needs_analyze
def test_verify_should_catch_a_broken_copy_of_the_bridge_unit(tmp_path):
    broken_copy_complaints(tmp_path, BRIDGE_UNIT, "RestartSec=2", "--man=no")


@needs_analyze
def test_the_bridge_sandbox_should_keep_the_exposure_score_within_its_limit(tmp_path):
    score = exposure(runnable_copy(tmp_path, unit=BRIDGE_UNIT))
    assert score <= EXPOSURE_LIMIT, "exposure %.1f, the limit is %.1f" % (score, EXPOSURE_LIMIT)


@needs_analyze
def test_the_exposure_check_should_notice_a_bridge_unit_without_its_sandbox(tmp_path):
    with open(BRIDGE_UNIT, encoding="utf-8") as f:
        text = f.read()
    bare = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(
            (
                "Protect",
                "Private",
                "Restrict",
                "SystemCall",
                "Capability",
                "NoNewPrivileges",
                "IPAddress",
            )
        )
    )
    assert exposure(runnable_copy(tmp_path, bare, BRIDGE_UNIT)) > EXPOSURE_LIMIT


def test_the_bridge_unit_should_run_the_installed_daemon_as_a_notify_service():
    service = unit_settings(BRIDGE_UNIT)["Service"]
    assert service["ExecStart"] == [BRIDGE_EXEC]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "StateDirectory": "hostbridge",
        "RuntimeDirectory": "hostbridge",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "SystemCallArchitectures": "native",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictSUIDSGID": "yes",
    }
    assert {k: service.get(k, [None])[-1] for k in expected} == expected
    assert service["SystemCallFilter"][0] == "@system-service"
    # Root for libvirt's 0750 channel directories and the socket's group, nothing more.
    assert set(service["CapabilityBoundingSet"][-1].split()) <= {"CAP_DAC_OVERRIDE", "CAP_CHOWN"}
    assert unit_settings(BRIDGE_UNIT)["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_bridge_unit_should_have_a_watchdog_only_if_the_daemon_feeds_it():
    """WatchdogSec= makes systemd kill a daemon that does not send WATCHDOG=1."""
    sends = False
    for name in os.listdir(os.path.join(ROOT, "hostbridge")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "hostbridge", name), encoding="utf-8") as f:
                sends = sends or "WATCHDOG=1" in f.read()
    service = unit_settings(BRIDGE_UNIT)["Service"]
    assert ("WatchdogSec" in service) == sends


def test_the_bridge_should_use_the_socket_group_and_paths_the_unit_prepares():
    from hostbridge import config

    shipped = config.load_file(os.path.join(ROOT, "packaging", "hostbridge.toml"))
    assert shipped.api_group == "hostbridge"
    service = unit_settings(BRIDGE_UNIT)["Service"]
    run_dir = "/run/" + service["RuntimeDirectory"][-1] + "/"
    state_dir = "/var/lib/" + service["StateDirectory"][-1] + "/"
    assert shipped.api_socket.startswith(run_dir)
    assert shipped.db.startswith(state_dir)


def test_the_bridge_unit_should_give_it_descriptors_for_thousands_of_guests():
    # The default soft limit (1,024) let a thousand half-open TLS clients take the descriptors
    # the bridge needs for its guests; the daemon cannot raise it itself (setrlimit is filtered).
    service = unit_settings(BRIDGE_UNIT)["Service"]
    assert service["LimitNOFILE"] == ["8192"]
    assert "~@resources @privileged" in service["SystemCallFilter"]


# -- systemd/ovm-template-initial-config.service (the guest's first boot) -------------------------

FIRST_BOOT_UNIT = os.path.join(ROOT, "systemd", "ovm-template-initial-config.service")


def test_the_first_boot_unit_should_run_once_after_the_agent_and_before_ssh():
    s = unit_settings(FIRST_BOOT_UNIT)
    assert s["Service"]["Type"] == ["oneshot"]
    assert s["Service"]["ExecStart"] == ["/usr/sbin/ovm-template-initial-config"]
    assert s["Service"]["RemainAfterExit"] == ["yes"]
    assert "ovmd.service" in s["Unit"]["After"] and s["Unit"]["Wants"] == ["ovmd.service"]
    before = " ".join(s["Unit"]["Before"]).split()
    assert {"ssh.service", "sshd.service"} <= set(before)
    assert s["Install"]["WantedBy"] == ["multi-user.target"]


@needs_analyze
def test_systemd_should_accept_the_first_boot_unit(tmp_path):
    with open(FIRST_BOOT_UNIT, encoding="utf-8") as f:
        text = f.read()
    text = text.replace(
        "ExecStart=/usr/sbin/ovm-template-initial-config",
        "ExecStart=%s" % script("ovm-template-initial-config"),
    )
    path = tmp_path / "ovm-template-initial-config.service"
    path.write_text(text, encoding="utf-8")
    # The man page it names is installed by the package, not on this machine: --man=no.
    complaints, said = verify_lines(path, "ovm-template-initial-config")
    assert complaints == [], said


# -- ovmd-serial@.service, made from ovmd.service (packaging/serial_unit.py) ----------------------


def serial_unit_text():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "packaging", "serial_unit.py"), UNIT],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_the_serial_unit_should_keep_ovmd_services_sandbox_and_change_only_the_line():
    serial = parse_unit(serial_unit_text())
    port = unit_settings(UNIT)
    assert serial["Unit"]["BindsTo"] == ["dev-%i.device"]
    assert serial["Unit"]["After"] == ["dev-%i.device"]
    assert serial["Unit"]["Conflicts"] == ["ovmd.service"]
    assert serial["Service"]["ExecStart"] == ["/usr/bin/ovmd --daemon --channel /dev/%i"]
    assert serial["Service"]["DeviceAllow"] == ["/dev/%i rw"]
    assert serial["Install"]["WantedBy"] == ["multi-user.target"]
    same = {k: v for k, v in port["Service"].items() if k not in ("ExecStart", "DeviceAllow")}
    assert {k: serial["Service"][k] for k in same} == same


@needs_analyze
def test_systemd_should_accept_the_serial_unit(tmp_path):
    text = serial_unit_text().replace("ExecStart=/usr/bin/ovmd ", "ExecStart=%s " % script("ovmd"))
    path = tmp_path / "ovmd-serial@.service"
    path.write_text(text, encoding="utf-8")
    instance = tmp_path / "ovmd-serial@ttyS1.service"
    os.symlink(path, instance)
    complaints, said = verify_lines(instance, "ovmd-serial")
    assert complaints == [], said
