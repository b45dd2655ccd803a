"""Write ovmd-serial@.service, the agent's unit for a serial line, from systemd/ovmd.service.

    python3 packaging/serial_unit.py systemd/ovmd.service > ovmd-serial@.service

`systemctl enable --now ovmd-serial@ttyS1` then runs the agent on /dev/ttyS1 (QEMU's isa-serial;
or hvc1, a Xen console). The unit is made, not written by hand, so that it keeps exactly the
sandbox of ovmd.service: only what ties that unit to the virtio port changes (its device, the
channel, the device allowed), and an [Install] section is added, since a serial line is there at
every boot and no udev rule starts the agent on it. It conflicts with ovmd.service: both use
/run/ovmd and its socket.
"""

from __future__ import annotations

import sys

PORT_DEVICE = r"dev-virtio\x2dports-com.oracle.ovmd.device"

REPLACE = {
    "Description=": "Description=Oracle VM guest message agent (ovmd) on serial line /dev/%i",
    "BindsTo=": "BindsTo=dev-%i.device",
    "After=": "After=dev-%i.device\nConflicts=ovmd.service",
    "ExecStart=": "ExecStart=/usr/bin/ovmd --daemon --channel /dev/%i",
}
DROP = ("DeviceAllow=",)  # the port's two lines; the line's own below
HEADER = """\
# ovmd-serial@.service: the agent on a serial line, /dev/%i (e.g. ovmd-serial@ttyS1).
# GENERATED from ovmd.service by packaging/serial_unit.py: edit that file, not this one.
# Enable it with `systemctl enable --now ovmd-serial@ttyS1`; keep no getty on that line.
"""


def convert(text: str) -> str:
    out = [HEADER.rstrip("\n")]
    replaced: set[str] = set()
    seen_device_allow = False
    in_header = True
    for line in text.splitlines():
        if in_header and line.startswith("#"):
            continue  # ovmd.service's own header comment: about the virtio port
        in_header = False
        key = line.split("=", 1)[0] + "=" if "=" in line and not line.startswith("#") else ""
        if key in REPLACE:
            if key in ("BindsTo=", "After=") and PORT_DEVICE not in line:
                raise SystemExit("serial_unit: unexpected %s" % line)
            out.append(REPLACE[key])
            replaced.add(key)
        elif key in DROP:
            if not seen_device_allow:
                while out[-1].startswith("#"):
                    out.pop()  # the comment on the port's lines
                out.append("# The serial line (its path is resolved when the service starts).")
                out.append("DeviceAllow=/dev/%i rw")
                seen_device_allow = True
        else:
            out.append(line)
    missing = sorted(set(REPLACE) - replaced)
    if missing or not seen_device_allow:
        raise SystemExit("serial_unit: ovmd.service lacks %s" % (missing or "DeviceAllow="))
    out += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: serial_unit.py OVMD_SERVICE > ovmd-serial@.service\n")
        return 2
    with open(argv[1], encoding="utf-8") as f:
        sys.stdout.write(convert(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
