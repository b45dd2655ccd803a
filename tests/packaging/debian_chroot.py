"""A fresh Debian 12 (minbase) in a chroot, for installing our .debs as a new machine would.

The first use runs `debootstrap --variant=minbase bookworm` (about a minute) against the mirror apt
is configured with, fetches the package lists and keeps the result as a tarball under
/var/cache/ovmd-test-chroot/; later uses only unpack it (a few seconds). Downloaded .debs are kept in
a shared apt archive directory there too, so python3 and friends are fetched once.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import tempfile

CACHE_DIR = "/var/cache/ovmd-test-chroot"
TARBALL = os.path.join(CACHE_DIR, "bookworm-minbase.tar.gz")
ARCHIVES = os.path.join(CACHE_DIR, "apt-archives")
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


class ChrootError(Exception):
    pass


def missing_tools():
    """The host commands this module needs that are absent (empty when all are there)."""
    return [t for t in ("debootstrap", "chroot", "mount", "umount", "tar") if not shutil.which(t)]


def debian_mirror(etc_apt="/etc/apt"):
    """The Debian mirror apt is configured with for `bookworm` (main archive, not security)."""
    candidates = []
    for path in sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*.sources"))):
        with open(path, encoding="utf-8") as f:
            for stanza in re.split(r"\n\s*\n", f.read()):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if (
                    "deb" in fields.get("Types", "").split()
                    and SUITE in fields.get("Suites", "").split()
                ):
                    candidates += fields.get("URIs", "").split()
    legacy = [os.path.join(etc_apt, "sources.list")]
    legacy += sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*.list")))
    for path in legacy:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if m and m.group(2) == SUITE:
                candidates.append(m.group(1))
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _run(args, timeout, **kw):
    result = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kw,
    )
    if result.returncode != 0:
        raise ChrootError(
            "%s failed (exit %d):\n%s"
            % (" ".join(args[:4]), result.returncode, result.stdout[-3000:])
        )
    return result.stdout


def ensure_tarball():
    """Build the cached minbase tarball unless it exists; return its path. Safe to race."""
    os.makedirs(ARCHIVES, exist_ok=True)
    with open(os.path.join(CACHE_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building it: wait for it
        if os.path.exists(TARBALL):
            return TARBALL
        work = tempfile.mkdtemp(prefix="build-", dir=CACHE_DIR)
        try:
            root = os.path.join(work, "root")
            _run(["debootstrap", "--variant=minbase", SUITE, root, debian_mirror()], timeout=900)
            _run(["chroot", root, "apt-get", "update", "-qq"], timeout=300, env=ENV)
            _run(["chroot", root, "apt-get", "clean"], timeout=60, env=ENV)
            partial = TARBALL + ".partial"
            _run(["tar", "-C", root, "-czf", partial, "."], timeout=300)
            os.rename(partial, TARBALL)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return TARBALL


class Chroot:
    """A throwaway copy of the cached system: `with Chroot(tmpdir) as c: c.run([...])`."""

    def __init__(self, parent):
        self.root = os.path.join(str(parent), "root")
        self._mounts = []

    def __enter__(self):
        tarball = ensure_tarball()
        os.makedirs(self.root)
        try:
            _run(["tar", "-C", self.root, "-xzf", tarball], timeout=300)
            shutil.copy("/etc/resolv.conf", os.path.join(self.root, "etc", "resolv.conf"))
            self._mount(["-t", "proc", "proc"], "proc")
            self._share_archives(ARCHIVES, self.path("/var/cache/apt/archives"))
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self._cleanup()

    def mount_devpts(self):
        """A private devpts instance on /dev/pts, for programs that allocate ptys."""
        self._mount(
            ["-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts"], "dev/pts"
        )

    def _mount(self, args, where):
        target = os.path.join(self.root, where)
        os.makedirs(target, exist_ok=True)
        _run(["mount"] + args + [target], timeout=60)
        self._mounts.append(target)

    @staticmethod
    def _share_archives(src, dst):
        """Copy (hard-link where possible) the .debs of one archive directory into another.

        Copies rather than a bind mount: removing the chroot can then never reach the cache."""
        os.makedirs(dst, exist_ok=True)
        for deb in glob.glob(os.path.join(src, "*.deb")):
            target = os.path.join(dst, os.path.basename(deb))
            if os.path.exists(target):
                continue
            try:
                os.link(deb, target)
            except OSError:
                shutil.copy(deb, target)

    def _cleanup(self):
        for target in reversed(self._mounts):
            if subprocess.run(["umount", target], stderr=subprocess.DEVNULL, timeout=60).returncode:
                subprocess.run(["umount", "-l", target], stderr=subprocess.DEVNULL, timeout=60)
        self._mounts = []
        if os.path.isdir(self.root):
            self._share_archives(self.path("/var/cache/apt/archives"), ARCHIVES)
        if not any(os.path.ismount(self.path(m)) for m in ("/proc", "/dev/pts")):
            shutil.rmtree(self.root, ignore_errors=True)

    def path(self, inside):
        return os.path.join(self.root, inside.lstrip("/"))

    def run(self, args, timeout=120, check=True):
        """Run a command inside; return the CompletedProcess (output merged into stdout)."""
        result = subprocess.run(
            ["chroot", self.root] + list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=ENV,
        )
        if check and result.returncode != 0:
            raise ChrootError(
                "in the chroot, %s exited %d:\n%s"
                % (" ".join(args), result.returncode, result.stdout[-3000:])
            )
        return result

    def popen(self, args, **kw):
        return subprocess.Popen(["chroot", self.root] + list(args), env=ENV, **kw)

    def apt_install(self, debs):
        """apt-get install the given .debs (copied in) with their dependencies from the mirror."""
        names = []
        for deb in debs:
            shutil.copy(deb, self.path("/tmp"))
            names.append("/tmp/" + os.path.basename(deb))
        args = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + names
        result = self.run(args, timeout=300, check=False)
        if result.returncode != 0:
            # The cached package lists may be older than the mirror: refresh once and retry.
            self.run(["apt-get", "update", "-qq"], timeout=300)
            result = self.run(args, timeout=300)
        return result
