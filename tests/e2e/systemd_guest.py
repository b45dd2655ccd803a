"""Boot the systemd guest (systemd_image.py) under QEMU (software emulation) and drive it.

    guest = boot_systemd(image, workdir)        # SystemdGuest (a qemu.QemuGuest): QEMU running
    try:
        ctl = guest.control()                   # qemu.GuestControl, after the guest answered
        r = ctl.run(["systemctl", "is-active", "ovmd"])
        guest.poweroff(ctl)                     # clean shutdown; waits for QEMU to exit
    finally:
        guest.kill()                            # by pid, always

The ports are those of qemu.boot: virtserialports com.oracle.ovmd (the agent's; a host bridge may
connect to ``guest.agent_socket``) and org.ovmd.test.control, their host sides unix sockets that
QEMU serves (server=on,wait=off). A virtio-net NIC on a restricted user network (no way out of
the host) when ``nic``, so the guest has an eth0 to configure.

The cached disk is never written: by default it is opened with snapshot=on (writes go to a
throwaway overlay). ``persistent=True`` boots ``workdir/disk.raw`` instead, copied from the cached
disk the first time: boot again with the same workdir and the guest finds what the previous boot
left on its disk (power it off cleanly first for everything to be on it, or at least sync). Each
boot logs its serial console to a new ``serial-N.log`` in workdir.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.e2e.qemu import GuestControl, GuestError, QemuGuest, launch, machine_argv, ports_argv
from tests.e2e.systemd_image import SystemdImage

# A full distribution under emulation on a shared 2-core machine: ~40 s when quiet, several times
# that when loaded.
BOOT_TIMEOUT = 300.0
SHUTDOWN_TIMEOUT = 120.0


class SystemdGuest(QemuGuest):
    """QemuGuest with the disk it booted and systemd's ways of stopping."""

    def __init__(
        self, proc, workdir, agent_socket, control_socket, serial_log, started, disk, tty_socket
    ):
        super().__init__(proc, workdir, agent_socket, control_socket, serial_log, started)
        self.disk = disk
        self.tty_socket = tty_socket  # the host side of ttyS1, when booted with one (else None)

    def control(self, timeout: float = BOOT_TIMEOUT) -> GuestControl:
        return super().control(timeout)

    def wait_exit(self, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """QEMU's exit status once the guest has shut down (GuestError after ``timeout``)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                "QEMU still runs %.0f s after the guest was told to stop" % timeout
            ) from None

    def poweroff(self, ctl: GuestControl, timeout: float = SHUTDOWN_TIMEOUT) -> int:
        """Shut the guest down through systemd (file systems unmounted) and wait for QEMU."""
        ctl.call("poweroff", timeout=60)
        return self.wait_exit(timeout)


def _next_boot_number(workdir: Path) -> int:
    return len(list(workdir.glob("serial-*.log"))) + 1


def _persistent_disk(image: SystemdImage, workdir: Path) -> str:
    disk = workdir / "disk.raw"
    if not disk.exists():
        partial = workdir / "disk.raw.partial"
        # Sparse: the image is mostly free space.
        subprocess.run(["cp", "--sparse=always", image.disk, str(partial)], check=True, timeout=300)
        os.chmod(partial, 0o644)
        os.rename(partial, disk)
    return str(disk)


def boot_systemd(
    image: SystemdImage,
    workdir: str | Path,
    memory: int = 1024,
    nic: bool = True,
    persistent: bool = False,
    extra_append: str = "",
    serial_channel: bool = False,
) -> SystemdGuest:
    """Start QEMU on ``image``; return once its sockets exist (then call ``control()``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    agent_socket = str(workdir / "agent.sock")
    control_socket = str(workdir / "control.sock")
    tty_socket = str(workdir / "tty.sock")
    n = _next_boot_number(workdir)
    serial_log = str(workdir / ("serial-%d.log" % n))
    for p in (agent_socket, control_socket, tty_socket):
        if os.path.exists(p):
            os.unlink(p)
    if persistent:
        disk = _persistent_disk(image, workdir)
        drive = "file=%s,if=none,id=disk0,format=raw" % disk
    else:
        disk = image.disk
        drive = "file=%s,if=none,id=disk0,format=raw,snapshot=on" % disk
    append = image.cmdline + (" " + extra_append if extra_append else "")
    argv = machine_argv(image, memory, serial_log, append) + [
        "-smp",
        "1",
        "-drive",
        drive,
        "-device",
        "virtio-blk-pci,drive=disk0",
        # Entropy for the guest's early boot (ssh, Python's hash seed) without waiting.
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]
    argv += ports_argv(agent_socket, control_socket)
    if serial_channel:
        # A second UART, the guest's /dev/ttyS1 (the console is ttyS0), its host side a unix
        # socket: a channel for an agent on a serial line (guest.tty_socket).
        argv += [
            "-chardev",
            "socket,id=ch2,path=%s,server=on,wait=off" % tty_socket,
            "-device",
            "isa-serial,chardev=ch2",
        ]
    if nic:
        # restrict=on: the guest reaches nothing beyond QEMU's own user network.
        argv += ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"]
    return launch(
        argv,
        workdir / ("qemu-%d.log" % n),
        lambda proc, started: SystemdGuest(
            proc,
            workdir,
            agent_socket,
            control_socket,
            serial_log,
            started,
            disk,
            tty_socket if serial_channel else None,
        ),
    )
