"""Module `datetime`: time zone, NTP, the hardware clock's zone, and the clock itself.

Keys (the original's; hidden from --console-input, as there):
    com.oracle.linux.datetime.timezone     e.g. Europe/Paris (a zone in /usr/share/zoneinfo)
    com.oracle.linux.datetime.ntp          True or False
    com.oracle.linux.datetime.ntp-servers  servers, comma-separated
    com.oracle.linux.datetime.utc          the hardware clock keeps UTC: True or False
    com.oracle.linux.datetime.datetime     year-month-day-hour-minute-second, e.g. 2011-4-7-9-2-42;
                                           set only when NTP is not turned on

NTP goes to what the system has: systemd-timesyncd (a drop-in), else chrony (its sources
directory on Debian, a marked block of /etc/chrony.conf on RHEL).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time

from ..common import TemplateError
from . import validate
from .base import Module, Pairs, Param, System, boolean, value

P = "com.oracle.linux.datetime."
ZONEINFO = "/usr/share/zoneinfo"
TIMESYNCD_DROPIN = "/etc/systemd/timesyncd.conf.d/50-ovm-template-config.conf"
CHRONY_SOURCES = "/etc/chrony/sources.d/ovm-template-config.sources"
CHRONY_BEGIN = "# BEGIN ovm-template-config datetime"
CHRONY_END = "# END ovm-template-config datetime"
_ZONE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$")


def params(target: str) -> list[Param]:
    if target not in ("configure", "reconfigure"):
        return []
    return [
        Param(P + "datetime", "Date and time: year-month-day-hour-minute-second", hidden=True),
        Param(P + "timezone", "Time zone, e.g. America/New_York", hidden=True),
        Param(P + "utc", "Hardware clock in UTC: True or False", hidden=True),
        Param(P + "ntp", "Use NTP: True or False", hidden=True),
        Param(P + "ntp-servers", "NTP servers, comma-separated", hidden=True),
    ]


def configure(pairs: Pairs, system: System) -> None:
    # Every key first.
    zone = value(pairs, P + "timezone")
    if zone and (not _ZONE.match(zone) or not os.path.isfile(system.path(ZONEINFO + "/" + zone))):
        raise TemplateError("%s: not a time zone in %s" % (P + "timezone", ZONEINFO))
    ntp = boolean(pairs, P + "ntp")
    utc = boolean(pairs, P + "utc")
    servers = [validate.hostname(P + "ntp-servers", s) if not _is_ip(s) else s
               for s in validate.comma_list(value(pairs, P + "ntp-servers"))]  # fmt: skip
    when = _datetime(value(pairs, P + "datetime")) if value(pairs, P + "datetime") else None
    client = _ntp_client(system) if (ntp or servers) else None
    if ntp and client is None:
        raise TemplateError(
            "%s: no NTP client installed (systemd-timesyncd or chrony)" % (P + "ntp")
        )
    # Then the changes.
    if zone:
        link = system.path("/etc/localtime")
        tmp = link + ".ovm-new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(ZONEINFO + "/" + zone, tmp)
        os.replace(tmp, link)
        if system.exists("/etc/timezone") or system.exists("/etc/debian_version"):
            system.write("/etc/timezone", zone + "\n")
    if utc is not None:
        _adjtime(system, utc)
    if servers and client is not None:
        client_servers(system, client, servers)
    if ntp is not None and client is not None:
        unit = {"timesyncd": "systemd-timesyncd.service", "chrony": _chrony_unit(system)}[client]
        action = ["enable", "--now"] if ntp else ["disable", "--now"]
        system.run(["systemctl", *action, unit], check=False)
    if when is not None and not ntp:
        if system.root == "/" and not system.command_log:
            time.clock_settime(time.CLOCK_REALTIME, when.timestamp())
        else:
            system.run(["date", "-s", when.isoformat()])


def _is_ip(text: str) -> bool:
    try:
        validate.ip_any("", text)
        return True
    except TemplateError:
        return False


def _datetime(text: str) -> _dt.datetime:
    parts = text.split("-")
    try:
        if len(parts) != 6:
            raise ValueError
        y, mo, d, h, mi, sec = (int(p) for p in parts)
        return _dt.datetime(y, mo, d, h, mi, sec)  # local time, as the original took it
    except ValueError:
        raise TemplateError(
            "%s: not year-month-day-hour-minute-second" % (P + "datetime")
        ) from None


def _ntp_client(system: System) -> str | None:
    if system.exists("/lib/systemd/systemd-timesyncd") or system.exists(
        "/usr/lib/systemd/systemd-timesyncd"
    ):
        return "timesyncd"
    if system.has_command("chronyd"):
        return "chrony"
    return None


def _chrony_unit(system: System) -> str:
    return "chrony.service" if system.exists("/etc/chrony/chrony.conf") else "chronyd.service"


def client_servers(system: System, client: str, servers: list[str]) -> None:
    if client == "timesyncd":
        system.write(TIMESYNCD_DROPIN, "[Time]\nNTP=%s\n" % " ".join(servers))
        system.run(["systemctl", "try-restart", "systemd-timesyncd.service"], check=False)
        return
    lines = ["server %s iburst" % s for s in servers]
    if system.exists("/etc/chrony/sources.d"):
        system.write(CHRONY_SOURCES, "\n".join(lines) + "\n")
        system.run(["chronyc", "reload", "sources"], check=False)
        return
    conf = system.read("/etc/chrony.conf")
    kept, inside = [], False
    for line in conf.splitlines():
        if line.strip() == CHRONY_BEGIN:
            inside = True
        elif line.strip() == CHRONY_END:
            inside = False
        elif not inside:
            # The distribution's own pool/server lines would still be used: comment them out.
            kept.append("#" + line if re.match(r"^\s*(pool|server)\s", line) else line)
    text = "\n".join(kept).rstrip("\n") + "\n" + "\n".join([CHRONY_BEGIN, *lines, CHRONY_END])
    system.write("/etc/chrony.conf", text + "\n")
    system.run(["systemctl", "try-restart", _chrony_unit(system)], check=False)


def _adjtime(system: System, utc: bool) -> None:
    lines = (system.read("/etc/adjtime") or "0.0 0 0.0\n0\n").splitlines()
    while len(lines) < 3:
        lines.append("0")
    lines[2] = "UTC" if utc else "LOCAL"
    system.write("/etc/adjtime", "\n".join(lines[:3]) + "\n")


MODULE = Module(params, {"configure": configure, "reconfigure": configure})

if __name__ == "__main__":
    MODULE.main()
