"""Build (and cache) a tiny Linux guest that runs the project's guest agent, for end-to-end tests.

Library API (stdlib only; import it like the other test helpers: ``from guest_image import ...``):

    image = build_image(cache_dir=DEFAULT_CACHE_DIR)   # -> Image; builds once, then cached
    image.kernel      # path of the kernel (Debian's cloud kernel, bzImage)
    image.initrd      # path of the initramfs (newc cpio, gzip)
    image.cmdline     # the kernel command line to boot it with (console on ttyS0)
    image.key         # hash of every input; the cache entry's name
    image.size        # bytes of kernel + initrd
    image.build_seconds   # seconds this call spent building (0.0 when the cache answered)

``build_image`` raises ImageError (one line) when a prerequisite is missing: qemu-system-x86,
busybox-static and the kernel package are listed in scripts/packages-test.txt; the kernel is
fetched with ``apt-get download`` (the package that linux-image-cloud-amd64 depends on) and only
unpacked. The cache entry is ``<cache_dir>/<key>/`` where key hashes the project's sources
(ovmproto/, ovmsys/, guestagent/, templateconfig/, hostbridge/, pyproject.toml, README.md), this
file, tests/e2e/guest/, the kernel package name, busybox and /usr/bin/python3.11; change any of
them and the next call rebuilds.
Concurrent callers are serialized by a lock file; an entry appears atomically (rename).

What the guest holds: static busybox; Debian's /usr/bin/python3.11 with the shared libraries it and
its extension modules need and its standard library (minus tests, tkinter, idlelib, the build
config...), compiled to .pyc; the project installed from a WHEEL built from the repo (``pip install
--target /usr/lib/python3/dist-packages --no-deps``) plus click, without orjson (the codec falls
back to the standard library, as on a distro-installed guest); /usr/bin/ovmd; the virtio modules.

Boot (tests/e2e/guest/init): loads virtio_ring, virtio, virtio_pci_modern_dev,
virtio_pci_legacy_dev, virtio_pci, virtio_console; mounts /proc /sys /dev /run /tmp; makes
/dev/virtio-ports/NAME links from /sys/class/virtio-ports/*/name; then runs the control program
(tests/e2e/guest/control.py) which starts ``ovmd --daemon -d 1`` (cache in /run/ovmd, agent log on
the serial console) unless the kernel command line holds ``ovmd_test.agent=off``. When the control
program exits the guest powers off.

Guest control protocol, on the virtio-serial port ``org.ovmd.test.control`` (CONTROL_PORT; QEMU's
host side a unix socket). JSON lines, UTF-8, one request per line, answered in order:

    -> {"id": 1, "op": "ping"}
    <- {"id": 1, "ok": true, "agent_pid": 123 | null, "uptime": 4.2}
    -> {"id": 2, "op": "run", "argv": ["ovmd", "-g", "foo"], "timeout": 30}
    <- {"id": 2, "ok": true, "rc": 0, "stdout": "<base64>", "stderr": "<base64>"}
    -> {"id": 3, "op": "agent_start", "args": ["--max-keys", "10"]}   # args optional
    <- {"id": 3, "ok": true, "pid": 456}         # after the agent's socket accepts connections
    -> {"id": 4, "op": "agent_kill", "signal": 9}   # default SIGKILL; waits for it to exit
    <- {"id": 4, "ok": true, "pid": 456, "status": -9}
    -> {"id": 5, "op": "agent_stat"}     # the agent's CPU from /proc/PID/stat
    <- {"id": 5, "ok": true, "pid": 456, "utime": 12, "stime": 3, "clk_tck": 100,
        "ctxt": [voluntary, involuntary]}
    -> {"id": 6, "op": "poweroff"}
    <- {"id": 6, "ok": true}             # then the guest powers off
    on failure: {"id": N, "ok": false, "error": "one line"}

Guest-side writes while no host is connected are dropped by QEMU and host writes are held until the
guest opens the port, so a host client connects as soon as QEMU listens and repeats ``ping`` with
fresh ids until one is answered (qemu.GuestControl does this), ignoring replies to other ids.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GUEST_FILES = HERE / "guest"
DEFAULT_CACHE_DIR = Path(os.environ.get("OVMD_TEST_IMAGE_CACHE", "/var/cache/ovmd-test-images"))

AGENT_PORT = "com.oracle.ovmd"
CONTROL_PORT = "org.ovmd.test.control"
CMDLINE = "console=ttyS0 quiet panic=-1"

GUEST_PYTHON = "/usr/bin/python3.11"
GUEST_STDLIB = "/usr/lib/python3.11"
BUSYBOX = "/bin/busybox"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# In load order; any that the kernel has built in is simply absent from the package.
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)

# Parts of the standard library the guest never imports: kept out to keep the image small.
_STDLIB_SKIP_DIRS = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "venv",
    "sqlite3",
    "curses",
    "dbm",
}
_STDLIB_SKIP_PREFIX = ("config-3",)
_DYNLOAD_SKIP = re.compile(
    r"^(_test|_xx|xxlimited|_curses|_dbm|readline|nis|ossaudiodev|_ssl|"
    r"_hashlib|_sqlite3|_tkinter|_ctypes_test|audioop)"
)
_SOURCE_DIRS = ("ovmproto", "ovmsys", "guestagent", "templateconfig", "hostbridge")
_SOURCE_FILES = (
    "pyproject.toml",
    "README.md",
    "bin/ovmd",
    "bin/vmmessage",
    "bin/ovm-template-config",
    "bin/ovm-chkconfig",
    "bin/ovm-template-initial-config",
)


class ImageError(Exception):
    """A prerequisite of the image is missing or a build step failed (one-line message)."""


@dataclass(frozen=True)
class Image:
    kernel: str
    initrd: str
    key: str
    size: int
    build_seconds: float
    cmdline: str = CMDLINE


def _run(argv, **kw):
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise ImageError("%s not found (see scripts/packages-test.txt)" % argv[0]) from None
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ImageError(
            "%s failed (exit %d): %s" % (" ".join(map(str, argv[:3])), e.returncode, tail[0])
        ) from None


def kernel_package():
    """The versioned kernel package behind linux-image-cloud-amd64, e.g. linux-image-6.1.0-56-..."""

    def depends():
        try:
            out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
        except ImageError:
            return None
        return re.search(r"Depends:\s*(linux-image-\S+)", out)

    m = depends()
    if not m:
        # A fresh machine whose package lists were never fetched: fetch them once.
        _run(["apt-get", "update", "-qq"])
        m = depends()
    if not m:
        raise ImageError(
            "apt-cache depends %s names no linux-image package (apt-get update?)"
            % KERNEL_META_PACKAGE
        )
    return m.group(1)


def _inputs():
    """(name, path) of every file the image is made from, names independent of where they are."""
    files = [(f, REPO / f) for f in _SOURCE_FILES if (REPO / f).exists()]
    for d in _SOURCE_DIRS:
        files += [
            (os.path.relpath(p, REPO), p)
            for p in (REPO / d).rglob("*")
            if p.is_file()
            and "__pycache__" not in p.parts
            and p.suffix in (".py", ".json", ".typed")
        ]
    files.append(("builder", Path(__file__).resolve()))
    files += [
        ("guest/" + os.path.relpath(p, GUEST_FILES), p)
        for p in GUEST_FILES.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    return sorted(files)


def input_key(kpkg):
    """Hash of every input of the image: rebuild when any changes."""
    h = hashlib.sha256()
    for name, p in _inputs():
        h.update(name.encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    h.update(kpkg.encode() + b"\0")
    for p in (GUEST_PYTHON, BUSYBOX):
        st = os.stat(p)
        h.update(("%s %d %d\0" % (p, st.st_size, int(st.st_mtime))).encode())
    return h.hexdigest()[:20]


def _fetch_kernel(cache_dir, kpkg):
    """Unpack the kernel package once into <cache_dir>/kernel/<kpkg>/; return that directory."""
    dest = cache_dir / "kernel" / kpkg
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        # apt-get download drops privileges to _apt where it can: let it write here.
        os.chmod(tmp, 0o777)
        _run(["apt-get", "download", "-q", kpkg], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ImageError("apt-get download %s gave %d .deb files" % (kpkg, len(debs)))
        unpacked = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(unpacked, dest)
    (dest / ".complete").touch()
    return dest


def _ldd(path):
    """Absolute paths of the shared libraries ``path`` needs (including the loader)."""
    out = subprocess.run(
        ["ldd", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s", line)
        if m:
            libs.append(m.group(1))
    return libs


def _copy(src, root, dest=None):
    """Copy a file into the image at the same path (or ``dest``), resolving symlinks."""
    target = root / (dest or str(src)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), target)
    return target


def _copy_stdlib(root):
    src = Path(GUEST_STDLIB)
    libs = set(_ldd(GUEST_PYTHON))
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [
            d
            for d in dirnames
            if d not in _STDLIB_SKIP_DIRS and not d.startswith(_STDLIB_SKIP_PREFIX)
        ]
        rel = Path(dirpath).relative_to(src)
        for name in filenames:
            p = Path(dirpath) / name
            if rel.parts[:1] == ("lib-dynload",):
                if _DYNLOAD_SKIP.match(name):
                    continue
                libs.update(_ldd(p))
            elif not name.endswith(".py"):
                continue
            _copy(p, root)
    for lib in sorted(libs):
        _copy(lib, root)
    # Debian's python finds its prefix from the binary's location: /usr/bin -> /usr/lib/python3.11.
    _copy(GUEST_PYTHON, root)
    os.symlink("python3.11", root / "usr/bin/python3")


def _build_wheel(work):
    # From a copy of the sources: building in the repo would write build/ and *.egg-info there,
    # under the feet of whoever else works in it.
    src = work / "src"
    src.mkdir()
    for name in _SOURCE_FILES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    for name in _SOURCE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = work / "wheel"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)], cwd=work)
    wheels = list(out.glob("ovmd-*.whl"))
    if len(wheels) != 1:
        raise ImageError("python -m build gave %d ovmd wheels" % len(wheels))
    return wheels[0]


def _install_project(root, work):
    wheel = _build_wheel(work)
    site = root / "usr/lib/python3/dist-packages"
    # The host's click version, from the index or pip's cache (a pure-Python wheel).
    click = "click==%s" % importlib.metadata.version("click")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            "--python-version",
            "3.11",
            "--only-binary=:all:",
            str(wheel),
            click,
        ]
    )
    shutil.rmtree(site / "bin", ignore_errors=True)  # scripts with the host's shebang
    # What a distribution's package installs: the console script, for the guest's interpreter.
    script = root / "usr/bin/ovmd"
    script.write_text(
        "#!/usr/bin/python3.11\nimport sys\nfrom guestagent.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return wheel.name


def _install_busybox(root):
    _copy(BUSYBOX, root, "/bin/busybox")
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc",
        "lib/modules",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.symlink("busybox", root / "bin/sh")


def _install_modules(root, kdir):
    mods = list((kdir / "lib/modules").glob("*/kernel"))
    if len(mods) != 1:
        raise ImageError("kernel package has %d module trees" % len(mods))
    found = {p.name[:-3]: p for p in mods[0].rglob("*.ko")}
    order = []
    for name in VIRTIO_MODULES:
        if name in found:
            _copy(found[name], root, "/lib/modules/%s.ko" % name)
            order.append(name)
    (root / "lib/modules/load-order").write_text("\n".join(order) + "\n")
    kernels = list((kdir / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError("kernel package has %d vmlinuz files" % len(kernels))
    return kernels[0]


def _install_guest_files(root):
    init = root / "init"
    shutil.copy2(GUEST_FILES / "init", init)
    init.chmod(0o755)
    ctl = root / "usr/lib/ovmd-test/control.py"
    ctl.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST_FILES / "control.py", ctl)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\novmd:x:100:\n")


def _compile(root):
    # Byte-compile with the guest's own interpreter (same magic number); unchecked-hash pycs are
    # trusted without a stat of the source: nothing in the image changes after the build.
    _run(
        [
            GUEST_PYTHON,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            str(root / "usr/lib/python3.11"),
            str(root / "usr/lib/python3/dist-packages"),
            str(root / "usr/lib/ovmd-test"),
        ]
    )


def _write_cpio(root, out_path):
    """A newc cpio of ``root``, gzip'ed (cpio from busybox: no host package needed)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for n in sorted(dirnames + filenames):
            names.append(n if rel == "." else os.path.join(rel, n))
    listing = ("\n".join(names) + "\n").encode()
    proc = subprocess.run(
        [BUSYBOX, "cpio", "-o", "-H", "newc"],
        input=listing,
        cwd=root,
        capture_output=True,
    )
    if proc.returncode != 0:
        raise ImageError("busybox cpio failed: %s" % proc.stderr.decode(errors="replace").strip())
    with gzip.open(out_path, "wb", compresslevel=6) as f:
        f.write(proc.stdout)


def _build(cache_dir, key, kpkg):
    kdir = _fetch_kernel(cache_dir, kpkg)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        _install_busybox(root)
        _copy_stdlib(root)
        _install_project(root, work)
        vmlinuz = _install_modules(root, kdir)
        _install_guest_files(root)
        _compile(root)
        entry = work / "entry"
        entry.mkdir()
        shutil.copy2(vmlinuz, entry / "vmlinuz")
        _write_cpio(root, entry / "initrd.gz")
        (entry / "inputs").write_text("kernel %s\nkey %s\n" % (kpkg, key))
        os.rename(entry, cache_dir / key)


def _prune(cache_dir, keep):
    """Drop entries of other inputs unused for an hour (another test may be booting one now)."""
    for p in cache_dir.iterdir():
        if p.name in (keep, "kernel", ".lock") or p.name.startswith("build-"):
            continue
        try:
            if p.is_dir() and time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def build_image(cache_dir=DEFAULT_CACHE_DIR):
    """The guest image for the current sources: from the cache, or built now (see module doc)."""
    cache_dir = Path(cache_dir)
    for tool in (GUEST_PYTHON, BUSYBOX):
        if not os.access(tool, os.X_OK):
            raise ImageError("%s is missing (see scripts/packages-test.txt)" % tool)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kpkg = kernel_package()
    key = input_key(kpkg)
    entry = cache_dir / key
    started = time.monotonic()
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "initrd.gz").exists():
            _build(cache_dir, key, kpkg)
            built = time.monotonic() - started
        else:
            built = 0.0
            os.utime(entry)
        _prune(cache_dir, key)
    kernel, initrd = entry / "vmlinuz", entry / "initrd.gz"
    return Image(
        kernel=str(kernel),
        initrd=str(initrd),
        key=key,
        size=kernel.stat().st_size + initrd.stat().st_size,
        build_seconds=built,
    )


if __name__ == "__main__":
    img = build_image(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_CACHE_DIR)
    print(
        "%s\n%s\nkey %s, %.1f MB, built in %.1f s"
        % (img.kernel, img.initrd, img.key, img.size / 1e6, img.build_seconds)
    )
