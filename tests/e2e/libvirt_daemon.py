"""A real libvirtd for end-to-end tests: start it (and virtlogd) as plain processes, run transient
domains, tear everything down by pid.

    with running_libvirt(workdir) as lv:     # a Libvirt; uses a libvirtd that already runs
        xml = domain_xml(name, kernel, initrd, cmdline,
                         channels=[("com.oracle.ovmd", None), ("org.x.ctl", "/tmp/x/ctl.sock")])
        dom_id = lv.create(xml)              # transient (`virsh create`): gone once destroyed
        lv.destroy(name)
    # on the way out, in this order: our domains destroyed, then libvirtd, then virtlogd, each
    # by its pid and only if this module started it.

No systemd is needed: `virtlogd` must run before a domain starts, and `libvirtd` serves
`qemu:///system` on /run/libvirt/libvirt-sock. Both are started in the foreground (not `-d`) as our
children, in their own session (a Ctrl-C on the test must not kill libvirtd before it has destroyed
the domains: QEMU outlives a killed libvirtd), with pidfiles in the work directory. One libvirtd
serves the whole machine: when one already answers we use it and never stop it, nor the virtlogd
beside it.

Why libvirtd runs in a private mount namespace with its own qemu.conf (`user = "root"`): on these
machines /dev/kvm exists but is root-only (0600, no udev). libvirt probes QEMU's capabilities as its
unprivileged `libvirt-qemu` user, the probe reports KVM, and then every capability lookup finds
"KVM was enabled when probing ..., but it is not available now", declares the cache invalid and
probes again (about 2 s a probe, many lookups a start): `virsh create` took ~52 s and the first
connection ~12 s. As root the check passes and the cache holds: 0.6 s and 0.3 s. The domains run
as root anyway (static DAC seclabel +0:+0, see domain_xml). The bind mount is visible to libvirtd
and its QEMUs only; nothing on the machine changes. Where `unshare` cannot make a mount namespace,
libvirtd runs with the stock configuration (slow but working).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from tests.support.processes import accepts

URI = "qemu:///system"
RUN_DIR = "/run/libvirt"
LIBVIRTD_SOCKET = RUN_DIR + "/libvirt-sock"
VIRTLOGD_SOCKET = RUN_DIR + "/virtlogd-sock"
QEMU_PID_DIR = RUN_DIR + "/qemu"  # <name>.pid for each running domain
CHANNEL_TARGET_DIR = "/var/lib/libvirt/qemu/channel/target"
QEMU_CONF = "/etc/libvirt/qemu.conf"

START_TIMEOUT = 90.0  # libvirtd's first start probes QEMU: ~8 s idle, much more on a loaded machine
VIRSH_TIMEOUT = 180.0  # `virsh create` against a stock libvirtd here: ~52 s (see the docstring)
STOP_TIMEOUT = 20.0
LOCK_TIMEOUT = 300.0  # another session of these tests (a few minutes at most) may hold the lock
SESSION_LOCK = os.path.join(
    "/run/lock" if os.path.isdir("/run/lock") else "/tmp", "ovmd-e2e-libvirt.lock"
)


class LibvirtError(Exception):
    """libvirtd would not start, or a virsh command failed (one line, with virsh's message)."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: PID 1 reaps orphans only eventually)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, timeout):
            return


def _mount_namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    return r.returncode == 0


class _Daemon:
    """One daemon we started: our child, in its own session, with a pidfile and a log file."""

    def __init__(self, name: str, workdir: Path, argv_for_pidfile):
        self.name = name
        self.pidfile = workdir / (name + ".pid")
        self.log_path = workdir / (name + ".log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv_for_pidfile(str(self.pidfile)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM by pid (our child's, which the pidfile also holds: neither daemonizes), SIGKILL
        after STOP_TIMEOUT; reaped."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)


def run_virsh(
    uri: str, args, check: bool = True, timeout: float = VIRSH_TIMEOUT, who: str = ""
) -> subprocess.CompletedProcess[str]:
    """`virsh -c URI ARGS`; LibvirtError (one line, ``who`` first) when it fails and ``check``."""
    r = subprocess.run(
        ["virsh", "-q", "-c", uri, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise LibvirtError(
            "%svirsh %s failed (exit %d): %s"
            % (who, " ".join(args[:2]), r.returncode, (r.stderr or r.stdout).strip())
        )
    return r


class Libvirt:
    """libvirtd for ``qemu:///system``: ours (started by start()) or the machine's."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.libvirtd: _Daemon | None = None  # None: not ours
        self.virtlogd: _Daemon | None = None
        self.private_qemu_conf = False
        self.start_seconds = 0.0
        self._domains: dict[str, int | None] = {}  # name -> QEMU pid, for the domains we created

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Libvirt:
        started = time.monotonic()
        for tool in ("virsh", "libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                raise LibvirtError(
                    "%s not found (libvirt-daemon-system and libvirt-clients are in "
                    "scripts/packages-test.txt)" % tool
                )
        if accepts(LIBVIRTD_SOCKET):
            self._wait_answers(timeout)  # the machine's: use it, never stop it
            self.start_seconds = time.monotonic() - started
            return self
        if not accepts(VIRTLOGD_SOCKET):
            self.virtlogd = _Daemon(
                "virtlogd", self.workdir, lambda pidfile: ["virtlogd", "-p", pidfile]
            )
            self._wait(lambda: accepts(VIRTLOGD_SOCKET), self.virtlogd, timeout, "virtlogd")
        self.libvirtd = self._start_libvirtd()
        self._wait_answers(timeout)
        self.start_seconds = time.monotonic() - started
        return self

    def _start_libvirtd(self) -> _Daemon:
        if not _mount_namespace_works():
            return _Daemon("libvirtd", self.workdir, lambda pidfile: ["libvirtd", "-p", pidfile])
        conf = self.workdir / "qemu.conf"
        try:
            stock = Path(QEMU_CONF).read_text()
        except OSError:
            stock = ""
        conf.write_text(
            stock + "\n# tests/e2e/libvirt.py: probe and run QEMU as root (see its "
            'docstring)\nuser = "root"\ngroup = "root"\n'
        )
        self.private_qemu_conf = True
        # unshare and sh exec: our child's pid is libvirtd's.
        script = 'mount --bind "$1" "$2" && exec libvirtd -p "$3"'
        return _Daemon(
            "libvirtd",
            self.workdir,
            lambda pidfile: [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                str(conf),
                QEMU_CONF,
                pidfile,
            ],
        )

    def _wait(self, cond, daemon: _Daemon, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if not daemon.running():
                raise LibvirtError(
                    "%s exited with status %s: %s"
                    % (what, daemon.proc.returncode, daemon.log_tail().strip())
                )
            if time.monotonic() > deadline:
                raise LibvirtError(
                    "%s not ready after %.0f s: %s" % (what, timeout, daemon.log_tail().strip())
                )
            time.sleep(0.1)

    def _wait_answers(self, timeout: float) -> None:
        def answers():
            return self.virsh("version", check=False, timeout=30).returncode == 0

        if self.libvirtd is not None:
            self._wait(answers, self.libvirtd, timeout, "libvirtd")
            return
        deadline = time.monotonic() + timeout
        while not answers():
            if time.monotonic() > deadline:
                raise LibvirtError(
                    "the running libvirtd does not answer `virsh -c %s version`" % URI
                )
            time.sleep(0.2)

    def restart_libvirtd(self, timeout: float = START_TIMEOUT) -> None:
        """Stop our libvirtd and start it again (domain ids start again at 1 when none runs).
        Only for a libvirtd we started: the machine's is not ours to restart."""
        if self.libvirtd is None:
            raise LibvirtError("libvirtd is not ours: not restarting it")
        for name in list(self._domains):
            self.destroy(name)  # QEMU would outlive libvirtd
        self.libvirtd.stop()
        self.libvirtd = self._start_libvirtd()
        self._wait_answers(timeout)

    def stop(self) -> None:
        """Destroy our domains, then stop libvirtd, then virtlogd (only those we started)."""
        errors = []
        for name in list(self._domains):
            try:
                self.destroy(name)
            except (LibvirtError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        for daemon in (self.libvirtd, self.virtlogd):
            if daemon is not None:
                try:
                    daemon.stop()
                except (LibvirtError, subprocess.TimeoutExpired) as e:
                    errors.append(str(e))
        # A QEMU that survived all that (destroy failed, libvirtd gone) is still ours: by pid.
        for name, pid in list(self._domains.items()):
            if pid is not None and _alive(pid):
                _kill_pid(pid)
                errors.append("QEMU of %s (pid %d) outlived libvirtd: killed" % (name, pid))
            self._domains.pop(name, None)
        self.libvirtd = self.virtlogd = None
        if errors:
            raise LibvirtError("; ".join(errors))

    # -- virsh -------------------------------------------------------------------------------

    def virsh(self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT):
        return run_virsh(URI, args, check, timeout)

    def create(self, xml: str) -> int:
        """Start a transient domain from ``xml``; its domain id (virsh returns once it runs)."""
        name = re.search(r"<name>([^<]+)</name>", xml).group(1)
        path = self.workdir / ("%s.xml" % name)
        path.write_text(xml)
        self._domains[name] = None  # ours from now on, even if the start fails half-way
        self.virsh("create", str(path))
        self._domains[name] = self.qemu_pid(name)
        return self.domid(name)

    def destroy(self, name: str) -> None:
        """Stop a domain we created (pulls the plug); fine if it is already gone."""
        pid = self._domains.get(name)
        r = self.virsh("destroy", name, check=False)
        if r.returncode != 0 and self.domid(name) is not None:
            raise LibvirtError("virsh destroy %s failed: %s" % (name, r.stderr.strip()))
        if pid is not None and not _wait_gone(pid, STOP_TIMEOUT):
            raise LibvirtError("QEMU of %s (pid %d) still runs after destroy" % (name, pid))
        self._domains[name] = None

    def suspend(self, name: str) -> None:
        """Pause a running domain (`virsh suspend`: its vCPUs stop; QEMU and its channels stay)."""
        self.virsh("suspend", name)

    def resume(self, name: str) -> None:
        """Let a paused domain run again (`virsh resume`)."""
        self.virsh("resume", name)

    def domstate(self, name: str) -> str | None:
        """`virsh domstate NAME --reason`, e.g. "paused (user)"; None when libvirt has no such
        domain."""
        r = self.virsh("domstate", name, "--reason", check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    def domid(self, name: str) -> int | None:
        """The running domain's id, None when it does not run."""
        r = self.virsh("domid", name, check=False)
        out = r.stdout.strip()
        return int(out) if r.returncode == 0 and out.isdigit() else None

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int(Path(QEMU_PID_DIR, name + ".pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def channel_state(self, name: str, target: str) -> str | None:
        """``connected``/``disconnected`` for the virtio channel ``target`` in the live XML:
        whether a guest program has the port open (QEMU's VSERPORT_CHANGE, as libvirt saw it)."""
        xml = self.virsh("dumpxml", name).stdout
        m = re.search(
            r"<target type='virtio' name='%s'(?: state='(\w+)')?" % re.escape(target), xml
        )
        return m.group(1) if m else None


@contextmanager
def _session_lock(timeout: float = LOCK_TIMEOUT):
    """One libvirt test session on the machine at a time (see running_libvirt)."""
    with open(SESSION_LOCK, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LibvirtError(
                        "another libvirt test session held %s for %.0f s" % (SESSION_LOCK, timeout)
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def running_libvirt(workdir):
    """A Libvirt, started; stopped on the way out whatever happens.

    Sessions of these tests are serialized machine-wide (two test runs at once happen: several
    people share a machine): otherwise both may start a libvirtd at the same moment, or the first
    to finish stops the libvirtd the other's domains run under, and each run's discovering bridge
    would connect to the other's guests (QEMU serves one client per channel).
    """
    with _session_lock():
        lv = Libvirt(workdir)
        try:
            lv.start()
            yield lv
        finally:
            lv.stop()


def channel_dir(dom_id: int, name: str) -> str:
    """Where libvirt binds a domain's channels when the XML gives no path."""
    return os.path.join(CHANNEL_TARGET_DIR, "domain-%d-%s" % (dom_id, name[:20]))


def domain_xml(
    name: str,
    kernel: str,
    initrd: str,
    cmdline: str,
    channels=(),
    serial_log: str | None = None,
    memory_mib: int = 512,
) -> str:
    """A transient domain under software emulation with direct kernel boot.

    ``channels``: (target name, host socket path or None) pairs; None lets libvirt choose the
    path (CHANNEL_TARGET_DIR/domain-<id>-<first 20 chars of the name>/<target name>).
    The static DAC seclabel runs QEMU as root and relabels nothing: the kernel, initrd and
    sockets live in private temp and cache directories that libvirt-qemu cannot read.
    Power off, reboot and crash all end the domain: the guest's init powers off, panic=-1 reboots.
    """
    devs = []
    for target, path in channels:
        source = "" if path is None else "<source mode='bind' path=%s/>" % quoteattr(path)
        devs.append(
            "<channel type='unix'>%s<target type='virtio' name=%s/></channel>"
            % (source, quoteattr(target))
        )
    if serial_log is not None:
        devs.append(
            "<serial type='file'><source path=%s/><target port='0'/></serial>"
            % quoteattr(serial_log)
        )
    return """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <cpu mode='maximum'/>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
    {devices}
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
""".format(
        name=escape(name),
        mem=int(memory_mib),
        kernel=escape(kernel),
        initrd=escape(initrd),
        cmdline=escape(cmdline),
        devices="\n    ".join(devs),
    )
