"""Find libvirt guests' ovmd channels and follow them as VMs start, stop and restart.

libvirt binds each running domain's channel at
    <channel dir>/domain-<id>-<first 20 characters of the name>/com.oracle.ovmd
and removes the directory when the domain stops; the id changes at every start. We rescan the
directories every couple of seconds (cheap: one listdir per directory) rather than watch them.

The directory carries only 20 characters of the name. The full name comes from libvirt when it is
at hand: libvirt-python if importable, else `virsh domname <id>` when virsh answers within 2 s,
else the directory's truncated name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHANNEL_NAME = "com.oracle.ovmd"
_DOMAIN_DIR = re.compile(r"^domain-(\d+)-(.+)$")
NAME_PREFIX = 20
VIRSH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Found:
    dom_id: int
    short_name: str  # the directory's (first 20 characters)
    path: str  # the channel socket
    # The socket's identity (device, inode, change time): QEMU binds a new socket at every boot,
    # even under a directory name seen before (ids start again at 1 when libvirtd restarts).
    ident: tuple[int, ...] = field(default=(), compare=False)


# What a name is remembered under: the channel socket's boot, not the (id, short name) alone.
_Key = tuple[int, str, tuple[int, ...]]


def scan(dirs: Iterable[str]) -> list[Found]:
    """Every `domain-<id>-<name>/com.oracle.ovmd` socket under ``dirs``, in a stable order."""
    found = []
    for base in dirs:
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue  # absent or unreadable: libvirt not installed, or not in that mode
        for entry in names:
            m = _DOMAIN_DIR.match(entry)
            if not m:
                continue
            path = os.path.join(base, entry, CHANNEL_NAME)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISSOCK(st.st_mode):
                continue
            found.append(
                Found(int(m.group(1)), m.group(2), path, (st.st_dev, st.st_ino, st.st_ctime_ns))
            )
    return found


class NameResolver:
    """Full domain names by id; remembers answers per channel socket (per boot).

    Never per (id, short name) alone: after a libvirtd restart another VM whose name shares the
    first 20 characters can get the same id, hence the same directory name, and would be taken
    for the VM resolved before (and receive its messages)."""

    def __init__(self, uri: str = "qemu:///system") -> None:
        self.uri = uri
        self._cache: dict[_Key, str] = {}  # _key(found) -> name
        self._virsh = shutil.which("virsh")
        try:
            import libvirt  # optional: python3-libvirt
        except ImportError:
            libvirt = None
        self._libvirt = libvirt

    @staticmethod
    def _key(found: Found) -> _Key:
        return (found.dom_id, found.short_name, found.ident)

    def retain(self, founds: Iterable[Found]) -> None:
        """Forget the answers for channels that are gone (keeps the cache to the running VMs)."""
        keep = {self._key(f) for f in founds}
        for key in [k for k in self._cache if k not in keep]:
            del self._cache[key]

    async def resolve(self, found: Found) -> str:
        key = self._key(found)
        name = self._cache.get(key)
        if name is None:
            name = await self._lookup(found) or found.short_name
            if len(found.short_name) < NAME_PREFIX or name != found.short_name:
                self._cache[key] = name  # a short name is complete; a resolved one is final
        return name

    async def _query(self, dom_id: int) -> str | None:
        name = None
        if self._libvirt is not None:
            name = await asyncio.to_thread(self._lookup_libvirt, dom_id)
        if name is None and self._virsh is not None:
            name = await self._lookup_virsh(self._virsh, dom_id)
        return name

    async def _lookup(self, found: Found) -> str | None:
        name = await self._query(found.dom_id)
        if name is not None and not name.startswith(found.short_name):
            log.warning(
                "libvirt names domain %d %r, which does not match its channel directory "
                "%r; using the directory's",
                found.dom_id,
                name,
                found.short_name,
            )
            return None
        return name

    def _lookup_libvirt(self, dom_id: int) -> str | None:
        try:
            conn = self._libvirt.openReadOnly(self.uri)
            try:
                name: str = conn.lookupByID(dom_id).name()
                return name
            finally:
                conn.close()
        except Exception as e:  # noqa: BLE001 - libvirtError, or a broken binding: use the directory
            log.debug("libvirt lookup of domain %d failed: %s", dom_id, e)
            return None

    async def _lookup_virsh(self, virsh: str, dom_id: int) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                virsh,
                "-c",
                self.uri,
                "domname",
                str(dom_id),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as e:
            log.debug("cannot run virsh: %s", e)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), VIRSH_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.debug("virsh domname %d did not answer within %.0f s", dom_id, VIRSH_TIMEOUT)
            return None
        name = out.decode("utf-8", "replace").strip()
        return name if proc.returncode == 0 and name else None


class Discovery:
    """Rescan every ``interval`` seconds; call on_found(name, path) / on_lost(name) on changes."""

    def __init__(
        self,
        dirs: Iterable[str],
        on_found: Callable[[str, str], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
        interval: float = 2.0,
        resolver: NameResolver | None = None,
    ) -> None:
        self.dirs = list(dirs)
        self.on_found = on_found
        self.on_lost = on_lost
        self.interval = interval
        self.resolver = resolver or NameResolver()
        self.current: dict[str, str] = {}  # name -> channel path

    async def scan_once(self) -> None:
        best: dict[str, Found] = {}
        founds = scan(self.dirs)
        self.resolver.retain(founds)
        for found in founds:
            name = await self.resolver.resolve(found)
            # Two ids with one name: a restart raced libvirt's cleanup; the higher id is newer.
            if name not in best or found.dom_id > best[name].dom_id:
                best[name] = found
        now = {name: found.path for name, found in best.items()}
        for name in [n for n in self.current if n not in now]:
            del self.current[name]
            log.info("VM %r stopped (its channel is gone)", name)
            await self.on_lost(name)
        for name, path in now.items():
            if self.current.get(name) != path:
                self.current[name] = path
                log.info("VM %r found at %s", name, path)
                await self.on_found(name, path)

    async def run(self) -> None:
        while True:
            try:
                await self.scan_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a dead discovery task would fail silently
                log.warning("discovery scan failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.interval)
