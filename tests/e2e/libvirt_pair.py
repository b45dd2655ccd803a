"""Two libvirtds on this one machine, so that a test can live-migrate a domain between them.

    with running_pair(workdir) as (a, b):        # two LibvirtHost, started, distinct host UUIDs
        a.create(domain_xml(name, ...))          # transient domain on A (tests/e2e/libvirt_daemon)
        a.channel_socket(name, "com.oracle.ovmd")   # where a channel's socket is, seen from here
        seconds = migrate(a, b, name)            # `virsh migrate --live`, memory over loopback TCP
        b.qemu_pid(name)
    # on the way out, for each host: its domains destroyed, its libvirtd stopped, any QEMU or other
    # process left in its namespace killed by pid. The work directory is the caller's to remove.

Why two daemons can share a machine (docs/migration.md has the whole story): each libvirtd runs,
under a small subreaper of ours (_REAPER says why), in its own mount namespace (`unshare --mount
--propagation private`) in which directories of its own are bind-mounted over /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, and a qemu.conf of its own over
/etc/libvirt/qemu.conf; its libvirtd.conf (`--config`) gives it a distinct host_uuid, which is what
libvirt compares to refuse a "migration to the same host". Nothing on the machine changes and the
machine's libvirtd, if one runs, is not touched: its sockets are not ours and ours are not at its
paths. A client reaches a host through ``qemu+unix:///system?socket=<workdir>/run/libvirt-sock``
(LibvirtHost.uri). The bind mounts are the host's own directories seen from inside, so a path
libvirt reports (a channel's socket, a pid file) is found here under the host's work directory
(LibvirtHost.outside).

qemu.conf: QEMU probed and run as root (why: tests/e2e/libvirt_daemon.py's docstring);
``stdio_handler = "file"``: QEMU's output goes to a file of libvirtd's, so no virtlogd is needed
(its socket would have to be in each namespace too); ``cgroup_controllers = [ ]``: the cgroup
hierarchy is the machine's, shared by both daemons, and libvirt names a domain's cgroup
machine/qemu-<id>-<name>: the source's and the destination's often have the same id and always
the same name, so they shared one cgroup, and the source, unable to remove a cgroup the
destination's QEMU was in, retried for 2 s before it reported the domain stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.e2e.libvirt_daemon import (
    QEMU_CONF,
    START_TIMEOUT,
    STOP_TIMEOUT,
    VIRSH_TIMEOUT,
    LibvirtError,
    _alive,
    _Daemon,
    _kill_pid,
    _mount_namespace_works,
    _session_lock,
    _wait_gone,
    run_virsh,
)
from tests.support.processes import accepts

MIGRATE_TIMEOUT = 180.0  # `virsh migrate` of a 512 MiB TCG guest over loopback: ~3 s idle
CAPS_CACHE = "/var/cache/libvirt/qemu/capabilities"

# The host's directories, bind-mounted over libvirt's system paths inside its namespace.
MOUNTS = (
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

_START_SCRIPT = """
set -e
W="$1"
mount --bind "$W/run" /run/libvirt
mount --bind "$W/lib" /var/lib/libvirt
mount --bind "$W/cache" /var/cache/libvirt
mount --bind "$W/log" /var/log/libvirt
mount --bind "$W/qemu.conf" /etc/libvirt/qemu.conf
shift
exec "$@" libvirtd --config "$W/libvirtd.conf" -p "$W/libvirtd.pid"
"""

# libvirtd daemonizes each QEMU (a double fork): a QEMU that exits is reaped by the nearest
# subreaper, else by PID 1, and libvirt waits for it to be reaped (kill(pid, 0) still succeeds on a
# zombie) before it reports the domain stopped. PID 1 here reaps orphans only every second or so:
# a migration's STOPPED_MIGRATED came ~1.3 s after the source QEMU had exited, a delay a real
# host's init does not add. So libvirtd runs under this subreaper, which reaps at once, forwards
# SIGTERM and SIGINT to libvirtd and exits with it.
_REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
def forward(sig, _frame):
    try:
        os.kill(child, sig)
    except ProcessLookupError:
        pass
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


class LibvirtHost:
    """One private libvirtd ("host A"): started by start(), everything of it stopped by stop()."""

    def __init__(self, name: str, workdir: str | Path) -> None:
        self.name = name
        self.workdir = Path(workdir)
        self.host_uuid = str(uuid.uuid4())
        self.socket = str(self.workdir / "run" / "libvirt-sock")
        self.uri = "qemu+unix:///system?socket=" + self.socket
        self.libvirtd: _Daemon | None = None
        self.mount_ns: str | None = None  # the namespace's id (readlink of /proc/PID/ns/mnt)
        self.start_seconds = 0.0
        self._qemu_pids: set[int] = set()  # every QEMU seen here, killed at stop if still alive

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> LibvirtHost:
        started = time.monotonic()
        for sub, _ in MOUNTS:
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        # libvirt revalidates a copied capabilities cache (and probes again if it is stale): a
        # valid one spares the first connection the probe of QEMU (seconds under load).
        if os.path.isdir(CAPS_CACHE):
            shutil.copytree(
                CAPS_CACHE, self.workdir / "cache" / "qemu" / "capabilities", dirs_exist_ok=True
            )
        (self.workdir / "libvirtd.conf").write_text(
            'host_uuid = "%s"\nlog_outputs = "3:file:%s"\n'
            % (self.host_uuid, self.workdir / "log" / "libvirtd.log")
        )
        try:
            stock = Path(QEMU_CONF).read_text()
        except OSError:
            stock = ""
        (self.workdir / "qemu.conf").write_text(
            stock + '\n# tests/e2e/libvirt_pair.py\nuser = "root"\ngroup = "root"\n'
            'stdio_handler = "file"\ncgroup_controllers = [ ]\n'
        )
        self.libvirtd = _Daemon(
            "libvirtd",
            self.workdir,
            # unshare and sh exec: our child's pid is the subreaper's, libvirtd's parent.
            lambda _pidfile: [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                _START_SCRIPT,
                "sh",
                str(self.workdir),
                sys.executable,
                "-c",
                _REAPER,
            ],
        )
        self._wait_answers(timeout)
        self._note_namespace()
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_answers(self, timeout: float) -> None:
        assert self.libvirtd is not None
        deadline = time.monotonic() + timeout
        while not (
            accepts(self.socket) and self.virsh("version", check=False, timeout=30).returncode == 0
        ):
            if not self.libvirtd.running():
                raise LibvirtError(
                    "libvirtd of host %s exited with status %s: %s"
                    % (self.name, self.libvirtd.proc.returncode, self.libvirtd.log_tail().strip())
                )
            if time.monotonic() > deadline:
                raise LibvirtError(
                    "libvirtd of host %s not ready after %.0f s: %s"
                    % (self.name, timeout, self.libvirtd.log_tail().strip())
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Destroy every domain of this libvirtd (all are ours: nobody else knows its socket),
        stop it, then kill by pid any QEMU, or any process in its mount namespace, still there."""
        errors: list[str] = []
        self._qemu_pids |= self._pidfile_pids()
        if self.mount_ns is None and self.libvirtd is not None and self.libvirtd.running():
            self._note_namespace()  # start() failed half-way
        if self.libvirtd is not None and self.libvirtd.running():
            try:
                names = self.virsh("list", "--name", check=False, timeout=30).stdout.split()
                for name in names:
                    r = self.virsh("destroy", name, check=False, timeout=60)
                    if r.returncode != 0:
                        errors.append("virsh destroy %s: %s" % (name, r.stderr.strip()))
            except subprocess.TimeoutExpired as e:
                errors.append(str(e))
        for pid in sorted(self._qemu_pids):
            if not _wait_gone(pid, 5.0) and _is_qemu(pid):
                _kill_pid(pid)
                errors.append("QEMU pid %d of host %s outlived destroy: killed" % (pid, self.name))
        if self.libvirtd is not None:
            try:
                self.libvirtd.stop()
            except subprocess.TimeoutExpired as e:
                errors.append(str(e))
        # The namespace ends with its last process: anything left in it was started by our
        # libvirtd (a helper, a QEMU it lost track of).
        for pid in self.namespace_pids():
            _kill_pid(pid, STOP_TIMEOUT)
            errors.append("pid %d was left in host %s's namespace: killed" % (pid, self.name))
        self.libvirtd = None
        if errors:
            raise LibvirtError("; ".join(errors))

    def _note_namespace(self) -> None:
        assert self.libvirtd is not None
        try:
            ns = os.readlink("/proc/%d/ns/mnt" % self.libvirtd.pid)
        except OSError:
            return
        if ns != os.readlink("/proc/self/ns/mnt"):  # not yet unshared: not ours to sweep
            self.mount_ns = ns

    def namespace_pids(self) -> list[int]:
        """Pids of the processes still in this host's mount namespace (ours)."""
        if self.mount_ns is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink("/proc/%s/ns/mnt" % entry) == self.mount_ns:
                    pids.append(int(entry))
            except OSError:
                continue
        return [p for p in pids if _alive(p)]

    # -- paths -------------------------------------------------------------------------------

    def outside(self, path: str) -> str:
        """A path libvirt reports (inside the namespace) as seen from here."""
        for sub, inside in MOUNTS:
            if path == inside or path.startswith(inside + "/"):
                return str(self.workdir / sub) + path[len(inside) :]
        return path

    def _pidfile_pids(self) -> set[int]:
        pids = set()
        for f in (self.workdir / "run" / "qemu").glob("*.pid"):
            try:
                pids.add(int(f.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    # -- virsh -------------------------------------------------------------------------------

    def virsh(
        self, *args: str, check: bool = True, timeout: float = VIRSH_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run_virsh(self.uri, args, check, timeout, "host %s: " % self.name)

    def create(self, xml: str) -> int:
        """Start a transient domain from ``xml``; its domain id."""
        m = re.search(r"<name>([^<]+)</name>", xml)
        assert m is not None, "no <name> in the domain XML"
        name = m.group(1)
        path = self.workdir / ("%s.xml" % name)
        path.write_text(xml)
        self.virsh("create", str(path))
        self.qemu_pid(name)
        dom_id = self.domid(name)
        if dom_id is None:
            raise LibvirtError("host %s: %s does not run after virsh create" % (self.name, name))
        return dom_id

    def domid(self, name: str) -> int | None:
        r = self.virsh("domid", name, check=False)
        out = r.stdout.strip()
        return int(out) if r.returncode == 0 and out.isdigit() else None

    def domains(self) -> list[str]:
        """Names of the running domains."""
        return self.virsh("list", "--name").stdout.split()

    def qemu_pid(self, name: str) -> int | None:
        """The domain's QEMU pid (remembered: stop() kills it if libvirt could not)."""
        try:
            pid = int((self.workdir / "run" / "qemu" / (name + ".pid")).read_text().strip())
        except (OSError, ValueError):
            return None
        self._qemu_pids.add(pid)
        return pid

    def channel_socket(self, name: str, target: str) -> str:
        """The host side (a unix socket QEMU serves) of the domain's virtio channel ``target``,
        as seen from here; libvirt chooses it when the XML gives no path."""
        xml = self.virsh("dumpxml", name).stdout
        for chan in re.findall(r"<channel type='unix'>(.*?)</channel>", xml, re.S):
            path = re.search(r"<source mode='bind' path='([^']+)'", chan)
            if path and re.search(r"<target type='virtio' name='%s'" % re.escape(target), chan):
                return self.outside(path.group(1))
        raise LibvirtError("host %s: %s has no unix channel %s" % (self.name, name, target))

    def jobinfo(self, name: str) -> dict[str, str]:
        """`virsh domjobinfo --completed`: the last finished job's figures (the incoming
        migration's, on a destination), as {field: value with its unit}."""
        out = self.virsh("domjobinfo", name, "--completed").stdout
        info = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = " ".join(value.split())
        return info


def _is_qemu(pid: int) -> bool:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"qemu-system" in f.read().split(b"\0", 1)[0]
    except OSError:
        return False


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the destination QEMU listens on it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(src: LibvirtHost, dst: LibvirtHost, name: str, p2p: bool = False) -> float:
    """`virsh migrate --live` of ``name`` from ``src`` to ``dst``: the memory goes over TCP to
    127.0.0.1 (--migrateuri; libvirt would otherwise use the host name's address); the seconds
    virsh took. The domain is transient: it is gone from ``src`` once migrated."""
    args = ["migrate", "--live"]
    if p2p:
        args.append("--p2p")  # src's libvirtd connects to dst's itself (dst.uri is valid there)
    args += [name, dst.uri, "--migrateuri", "tcp://127.0.0.1:%d" % free_loopback_port()]
    started = time.monotonic()
    src.virsh(*args, timeout=MIGRATE_TIMEOUT)
    took = time.monotonic() - started
    dst.qemu_pid(name)
    return took


def preflight() -> str | None:
    """Why a pair cannot run here at all (libvirt or QEMU not installed), else None."""
    for tool in ("virsh", "libvirtd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return "%s is not installed (scripts/packages-test.txt lists it)" % tool
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed in this environment"
    return None


@contextmanager
def running_pair(workdir):
    """Hosts A and B (LibvirtHost), started under workdir/a and workdir/b; stopped on the way out
    whatever happens. Serialized with the other libvirt test sessions (libvirt_daemon's lock):
    two emulated guests at once already load a 2-core machine."""
    if not _mount_namespace_works():
        raise LibvirtError("`unshare --mount` does not work here: two libvirtds cannot coexist")
    with _session_lock(), ExitStack() as stack:
        hosts = []
        for name in ("a", "b"):
            host = LibvirtHost(name.upper(), Path(workdir) / name)
            stack.callback(host.stop)
            hosts.append(host.start())
        yield hosts[0], hosts[1]
