"""Build (and cache) a Debian guest that boots systemd as init, with the project's ovmd .deb
installed, for end-to-end tests of what systemd and udev do with the package
(tests/e2e/guest_image.py builds the small busybox guest; this one is the distribution as a user
runs it).

Library API (stdlib only):

    image = build_systemd_image(cache_dir=DEFAULT_CACHE_DIR)   # -> SystemdImage
    image.kernel, image.initrd   # Debian's cloud kernel and the initramfs made for it in the tree
    image.disk       # raw ext4 image of the whole system: boot it with snapshot=on, or a copy
    image.cmdline    # kernel command line (root=/dev/vda, console on ttyS0)
    image.key        # the cache entry's name (hash of every input)
    image.build_seconds   # time this call spent building (0.0 when the cache answered)

``build_systemd_image`` raises ImageError (one line) when a prerequisite is missing or a step
fails. It needs root (chroot), debootstrap, tar, mkfs.ext4 and what packaging/build-deb.sh needs
(scripts/packages-test.txt).

Two cache levels under ``cache_dir`` (default /var/cache/ovmd-test-images, or
$OVMD_TEST_IMAGE_CACHE), both plain files: guest_image.py prunes the directories of that cache
that it does not know, never files.

* ``systemd-tree-<tree key>.tar``: ``debootstrap --variant=minbase`` of the host's release with
  TREE_PACKAGES (systemd, udev, python3, the cloud kernel, whose initramfs-tools hook builds an
  initramfs in the tree that carries the virtio drivers...). The key hashes the suite, the package
  list and TREE_RECIPE: a few minutes the first time, then reused.
* ``systemd-image-<key>.{vmlinuz,initrd,raw}``: the tree unpacked, the ovmd .deb (built now with
  packaging/build-deb.sh: a few seconds, and byte-for-byte reproducible) installed by ``dpkg -i``
  in a chroot, the guest set up as below, and ``mkfs.ext4 -d``. The key hashes the tree key, the
  .deb's bytes, this file and the guest-side files it installs (tests/e2e/guest/control.py,
  tests/e2e/guest_systemd/). The .raw file is renamed into place last: it marks a complete entry.

Concurrent builders are serialized by ``.systemd.lock`` (fcntl); entries appear by rename.

The guest, as a template VM that was never booted: empty /etc/machine-id (systemd's first boot),
root password locked, host name "template", /etc/network/interfaces configuring only ``lo`` (and
sourcing interfaces.d), an empty /etc/resolv.conf. ovmd.service is started the packaged way only:
udev's rule on the com.oracle.ovmd port. ssh.service stays enabled as the package leaves it (its
host keys were made in the tree; it starts in about a second). The test control program
(tests/e2e/guest_systemd/systemd_control.py, the protocol of guest_image.py's docstring on the
virtio-serial port org.ovmd.test.control) runs as ovmd-test-control.service in multi-user.target.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.packaging import apt_sources

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_CACHE_DIR = Path(os.environ.get("OVMD_TEST_IMAGE_CACHE", "/var/cache/ovmd-test-images"))
BUILD_DEB = REPO / "packaging" / "build-deb.sh"

# Guest-side files: the shared protocol code and the systemd guest's own program and unit.
GUEST_CONTROL = HERE / "guest" / "control.py"
GUEST_SYSTEMD_FILES = HERE / "guest_systemd"
GUEST_LIB = "/usr/local/lib/ovmd-test"
CONTROL_UNIT = "ovmd-test-control.service"

VARIANT = "minbase"
TREE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "iproute2",
    "ifupdown",
    "python3",
    "python3-click",
    "kmod",
    "initramfs-tools",
    "linux-image-cloud-amd64",
    "openssh-server",
    "passwd",
    # What template configuration drives in the guest: DHCP through ifupdown, and an NTP client.
    "isc-dhcp-client",
    "systemd-timesyncd",
    # QEMU's guest agent, the peer bench/vs_libvirt.py compares with through libvirt. Its unit is
    # started by udev only when the port org.qemu.guest_agent.0 exists (the tests never add it).
    "qemu-guest-agent",
)
# Bump when _build_tree changes what it makes from the same suite and packages.
TREE_RECIPE = "1"

# systemd.firstboot=off: with an empty machine-id, systemd-firstboot must never wait for answers
# on the console (it does not change ConditionFirstBoot=). rootfstype: no probing in the initramfs.
CMDLINE = (
    "console=ttyS0 root=/dev/vda rootfstype=ext4 rw net.ifnames=0 panic=-1 systemd.firstboot=off"
)
DISK_HEADROOM = 300 * 1024 * 1024

# Commands run in the chroot (and debootstrap itself) get this environment only: nothing of the
# caller's (a test's PYTHONPATH, locale...) leaks into maintainer scripts.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}

INTERFACES = """\
# Only the loopback here: template configuration writes the VM's own interfaces into
# /etc/network/interfaces.d at its first boot.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
"""
HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\ttemplate
::1\tlocalhost ip6-localhost ip6-loopback
"""
# Pass 0: no fsck at boot (slow under emulation); the journal is replayed at mount anyway.
FSTAB = "/dev/vda\t/\text4\tdefaults\t0\t0\n"


class ImageError(Exception):
    """A prerequisite of the image is missing or a build step failed (one-line message)."""


@dataclass(frozen=True)
class SystemdImage:
    kernel: str
    initrd: str
    disk: str
    cmdline: str
    key: str
    build_seconds: float
    tree_key: str = ""


def _run(argv, timeout, **kw):
    """Run a build step; ImageError with the tail of its output (on one line) if it fails."""
    try:
        return subprocess.run(
            [str(a) for a in argv],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            **kw,
        )
    except FileNotFoundError:
        raise ImageError("%s not found (see scripts/packages-test.txt)" % argv[0]) from None
    except subprocess.TimeoutExpired:
        raise ImageError(
            "%s took more than %d s" % (" ".join(map(str, argv[:3])), timeout)
        ) from None
    except subprocess.CalledProcessError as e:
        tail = [line.strip() for line in (e.stdout or "").strip().splitlines()[-4:]]
        raise ImageError(
            "%s failed (exit %d): %s"
            % (" ".join(map(str, argv[:3])), e.returncode, " | ".join(tail) or "no output")
        ) from None


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise ImageError("building the systemd guest needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "chroot", "tar", "mkfs.ext4", "dpkg-buildpackage", "mount"):
        if shutil.which(tool) is None:
            raise ImageError("%s is missing (see scripts/packages-test.txt)" % tool)


def _chroot_env() -> dict[str, str]:
    proxy = apt_sources.http_proxy()
    return dict(BASE_ENV, http_proxy=proxy) if proxy else dict(BASE_ENV)


def tree_key(suite: str) -> str:
    """Hash of what the debootstrapped tree is made from."""
    h = hashlib.sha256()
    h.update(("%s\0%s\0%s\0" % (suite, VARIANT, TREE_RECIPE)).encode())
    h.update(",".join(TREE_PACKAGES).encode())
    return h.hexdigest()[:20]


def _guest_files() -> list[tuple[str, Path]]:
    """(name, path) of the guest-side files this module installs."""
    files = [("guest/control.py", GUEST_CONTROL)]
    files += [
        ("guest_systemd/" + p.name, p)
        for p in sorted(GUEST_SYSTEMD_FILES.iterdir())
        if p.is_file() and not p.name.endswith(".pyc")
    ]
    return files


def image_key(tkey: str, deb: Path) -> str:
    """Hash of every input of the final image."""
    h = hashlib.sha256()
    h.update(tkey.encode() + b"\0")
    h.update(deb.read_bytes() + b"\0")
    h.update(Path(__file__).resolve().read_bytes() + b"\0")
    for name, p in _guest_files():
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` (deepest first)."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if (target + "/").startswith(prefix):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def _remove_work(work: str) -> None:
    """Remove a build directory, never through a mount (a failed debootstrap or chroot may leave
    /proc mounted in it: rmtree would then reach the host's /proc or worse)."""
    for target in _mounts_under(work):
        if subprocess.run(["umount", target], stderr=subprocess.DEVNULL, timeout=60).returncode:
            subprocess.run(["umount", "-l", target], stderr=subprocess.DEVNULL, timeout=60)
    if not _mounts_under(work):
        shutil.rmtree(work, ignore_errors=True)


def _one(pattern: str, what: str) -> str:
    found = glob.glob(pattern)
    if len(found) != 1:
        raise ImageError("the tree has %d %s (%s)" % (len(found), what, pattern))
    return found[0]


def _build_tree(cache_dir: Path, source: apt_sources.Source, tarball: Path) -> None:
    work = tempfile.mkdtemp(prefix="build-systemd-tree-", dir=cache_dir)
    try:
        root = os.path.join(work, "root")
        _run(
            [
                "debootstrap",
                "--variant=%s" % VARIANT,
                "--include=%s" % ",".join(TREE_PACKAGES),
                source.suite,
                root,
                source.uri,
            ],
            timeout=1800,
            env=_chroot_env(),
        )
        # The kernel's postinst made the initramfs in the tree (MODULES=most: virtio_blk and
        # virtio_pci included); without both, the guest cannot mount its root.
        _one(os.path.join(root, "boot", "vmlinuz-*"), "kernels")
        _one(os.path.join(root, "boot", "initrd.img-*"), "initramfs images")
        for deb in glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb")):
            os.unlink(deb)
        partial = str(tarball) + ".partial"
        _run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", root]
            + ["-cf", partial, "."],
            timeout=600,
        )
        os.rename(partial, tarball)
    finally:
        _remove_work(work)


def _build_deb(outdir: Path) -> Path:
    _run([BUILD_DEB, outdir], timeout=600, env=dict(os.environ, **BASE_ENV))
    debs = sorted(outdir.glob("ovmd_*.deb"))
    if len(debs) != 1:
        raise ImageError("%s made %d ovmd_*.deb files" % (BUILD_DEB.name, len(debs)))
    return debs[0]


def _write(root: str, path: str, text: str, mode: int = 0o644) -> None:
    target = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.lexists(target):
        os.unlink(target)  # may be a symlink into the host (resolv.conf) or a dangling one
    with open(target, "w") as f:
        f.write(text)
    os.chmod(target, mode)


def _lock_root_password(root: str) -> None:
    shadow = os.path.join(root, "etc/shadow")
    with open(shadow) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and not fields[1].startswith("!"):
            fields[1] = "!" + fields[1]
            lines[i] = ":".join(fields)
    with open(shadow, "w") as f:
        f.write("\n".join(lines) + "\n")


def _configure_guest(root: str) -> None:
    """Make the tree the never-booted template described in the module's docstring."""
    # Empty, not absent: systemd treats the boot as the first one (ConditionFirstBoot=) and writes
    # a new id; D-Bus reads the same file.
    _write(root, "/etc/machine-id", "", 0o444)
    dbus_id = os.path.join(root, "var/lib/dbus/machine-id")
    if os.path.lexists(dbus_id):
        os.unlink(dbus_id)
    os.makedirs(os.path.dirname(dbus_id), exist_ok=True)
    os.symlink("/etc/machine-id", dbus_id)
    _lock_root_password(root)
    _write(root, "/etc/hostname", "template\n")
    _write(root, "/etc/hosts", HOSTS)
    _write(root, "/etc/resolv.conf", "")
    _write(root, "/etc/fstab", FSTAB)
    _write(root, "/etc/network/interfaces", INTERFACES)
    os.makedirs(os.path.join(root, "etc/network/interfaces.d"), exist_ok=True)
    # The test control program and its unit, enabled as `systemctl enable` would.
    lib = os.path.join(root, GUEST_LIB.lstrip("/"))
    os.makedirs(lib, exist_ok=True)
    shutil.copy2(GUEST_CONTROL, os.path.join(lib, "control.py"))
    shutil.copy2(
        GUEST_SYSTEMD_FILES / "systemd_control.py", os.path.join(lib, "systemd_control.py")
    )
    unit = os.path.join(root, "etc/systemd/system", CONTROL_UNIT)
    shutil.copy2(GUEST_SYSTEMD_FILES / CONTROL_UNIT, unit)
    wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, CONTROL_UNIT)
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/" + CONTROL_UNIT, link)


def _install_deb(root: str, deb: Path) -> None:
    inside = "/tmp/" + deb.name
    shutil.copy2(deb, os.path.join(root, inside.lstrip("/")))
    # Offline: every dependency of the package is in the tree already. The postinst skips what
    # needs a running systemd (it tests /run/systemd/system, absent in a chroot).
    _run(["chroot", root, "dpkg", "-i", inside], timeout=600, env=BASE_ENV)
    os.unlink(os.path.join(root, inside.lstrip("/")))
    for path in ("lib/systemd/system/ovmd.service", "lib/udev/rules.d/90-ovmd.rules"):
        if not os.path.exists(os.path.join(root, path)):
            raise ImageError("the ovmd package installed no /%s" % path)


def _disk_size(root: str) -> int:
    used = int(_run(["du", "-s", "-x", "--block-size=1", root], timeout=300).stdout.split()[0])
    # ext4's own metadata (inode tables, journal) on top of the files, then room for tests.
    size = int(used * 1.15) + DISK_HEADROOM
    return (size + (1 << 20) - 1) & ~((1 << 20) - 1)


def _build_image(cache_dir: Path, key: str, tree_tar: Path, deb: Path) -> None:
    work = tempfile.mkdtemp(prefix="build-systemd-image-", dir=cache_dir)
    try:
        root = os.path.join(work, "root")
        os.mkdir(root)
        _run(
            ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", root]
            + ["-xf", tree_tar],
            timeout=600,
        )
        _install_deb(root, deb)
        _configure_guest(root)
        prefix = os.path.join(work, "systemd-image-%s" % key)
        shutil.copy2(_one(os.path.join(root, "boot", "vmlinuz-*"), "kernels"), prefix + ".vmlinuz")
        shutil.copy2(
            _one(os.path.join(root, "boot", "initrd.img-*"), "initramfs images"), prefix + ".initrd"
        )
        size = _disk_size(root)
        with open(prefix + ".raw", "wb") as f:
            f.truncate(size)
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", "ovmd-root", "-d", root, prefix + ".raw"],
            timeout=900,
        )
        # Booted only with snapshot=on or copied first (systemd_guest.py): never written to.
        os.chmod(prefix + ".raw", 0o444)
        for ext in (".vmlinuz", ".initrd", ".raw"):  # .raw last: it marks a complete entry
            os.rename(prefix + ext, cache_dir / ("systemd-image-%s%s" % (key, ext)))
    finally:
        _remove_work(work)


def _prune(cache_dir: Path, keep_image: str, keep_tree: str) -> None:
    """Drop images of other inputs unused for an hour (another test may be booting one now) and
    trees unused for a week."""
    now = time.time()
    for p in cache_dir.glob("systemd-image-*"):
        if (
            p.name.split(".")[0] != "systemd-image-%s" % keep_image
            and now - p.stat().st_mtime > 3600
        ):
            p.unlink(missing_ok=True)
    for p in cache_dir.glob("systemd-tree-*.tar"):
        if p.name != "systemd-tree-%s.tar" % keep_tree and now - p.stat().st_mtime > 7 * 86400:
            p.unlink(missing_ok=True)


def build_systemd_image(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> SystemdImage:
    """The systemd guest for the current sources: from the cache, or built now (module doc)."""
    cache_dir = Path(cache_dir)
    _check_prerequisites()
    try:
        source = apt_sources.debian_source()
    except LookupError as e:
        raise ImageError(str(e)) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tkey = tree_key(source.suite)
    tree_tar = cache_dir / ("systemd-tree-%s.tar" % tkey)
    with tempfile.TemporaryDirectory(prefix="ovmd-systemd-deb-") as debdir:
        deb = _build_deb(Path(debdir))
        key = image_key(tkey, deb)
        prefix = cache_dir / ("systemd-image-%s" % key)
        built = False
        with open(cache_dir / ".systemd.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run building: wait, then use its result
            if not tree_tar.exists():
                _build_tree(cache_dir, source, tree_tar)
                built = True
            if not Path(str(prefix) + ".raw").exists():
                _build_image(cache_dir, key, tree_tar, deb)
                built = True
            for p in (tree_tar, *(Path(str(prefix) + e) for e in (".vmlinuz", ".initrd", ".raw"))):
                os.utime(p)
            _prune(cache_dir, key, tkey)
    return SystemdImage(
        kernel=str(prefix) + ".vmlinuz",
        initrd=str(prefix) + ".initrd",
        disk=str(prefix) + ".raw",
        cmdline=CMDLINE,
        key=key,
        build_seconds=time.monotonic() - started if built else 0.0,
        tree_key=tkey,
    )


if __name__ == "__main__":
    img = build_systemd_image(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE_DIR)
    print(
        "%s\n%s\n%s\nkey %s (tree %s), built in %.1f s"
        % (img.kernel, img.initrd, img.disk, img.key, img.tree_key, img.build_seconds)
    )
