"""A fresh system of the host's own release (debootstrap minbase) in a chroot, for installing our
.debs as a new machine would.

The first use runs `debootstrap --variant=minbase SUITE` (about a minute) against the mirror and
suite the host's apt uses (apt_sources.py: from /etc/apt, or $OVMD_TEST_APT_MIRROR and
$OVMD_TEST_APT_SUITE), through apt's proxy if it has one, fetches the package lists and keeps the
result as a tarball under /var/cache/ovmd-test-chroot/; later uses only unpack it (a few seconds).
Downloaded .debs are kept in a shared apt archive directory there too, so python3 and friends are
fetched once.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import os
import shutil
import subprocess
import tempfile

from tests.packaging import apt_sources

CACHE_DIR = "/var/cache/ovmd-test-chroot"
ARCHIVES = os.path.join(CACHE_DIR, "apt-archives")
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


class ChrootError(Exception):
    pass


def missing_tools() -> list[str]:
    """The host commands this module needs that are absent (empty when all are there)."""
    return [t for t in ("debootstrap", "chroot", "mount", "umount", "tar") if not shutil.which(t)]


@functools.cache
def chroot_env() -> dict[str, str]:
    """The environment of commands in the chroot (and of debootstrap): apt there goes through the
    host's proxy, if any."""
    proxy = apt_sources.http_proxy()
    return dict(BASE_ENV, http_proxy=proxy) if proxy else dict(BASE_ENV)


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


def ensure_tarball() -> str:
    """Build the cached minbase tarball of the host's release unless it exists; return its path.
    Safe to race. LookupError when the host's apt sources name no release (see apt_sources)."""
    source = apt_sources.debian_source()
    tarball = os.path.join(CACHE_DIR, "%s-minbase.tar.gz" % source.suite)
    os.makedirs(ARCHIVES, exist_ok=True)
    with open(os.path.join(CACHE_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building it: wait for it
        if os.path.exists(tarball):
            return tarball
        work = tempfile.mkdtemp(prefix="build-", dir=CACHE_DIR)
        try:
            root = os.path.join(work, "root")
            debootstrap = ["debootstrap", "--variant=minbase", source.suite, root, source.uri]
            _run(debootstrap, timeout=900, env=dict(os.environ, **chroot_env()))
            _run(["chroot", root, "apt-get", "update", "-qq"], timeout=300, env=chroot_env())
            _run(["chroot", root, "apt-get", "clean"], timeout=60, env=chroot_env())
            partial = tarball + ".partial"
            _run(["tar", "-C", root, "-czf", partial, "."], timeout=300)
            os.rename(partial, tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tarball


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
            env=chroot_env(),
        )
        if check and result.returncode != 0:
            raise ChrootError(
                "in the chroot, %s exited %d:\n%s"
                % (" ".join(args), result.returncode, result.stdout[-3000:])
            )
        return result

    def popen(self, args, **kw):
        return subprocess.Popen(["chroot", self.root] + list(args), env=chroot_env(), **kw)

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
