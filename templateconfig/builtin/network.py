"""Module `network`: host name, /etc/hosts entries, each interface (static or DHCP), gateway, DNS.

Keys (the original's, N the interface's index from 0): com.oracle.linux.network.hostname,
.host.N, .device.N, .mac.N, .onboot.N, .bootproto.N, .ipaddr.N, .netmask.N, .gateway.N, and the
DNS keys .dns-servers.0 and .dns-search-domains.0 (also taken without the .0, which they carry
although they are not per interface). Every key is checked before any file is written.

The interface files go to what the system runs (netconfig.py): NetworkManager keyfiles,
systemd-networkd .network files, or ifupdown's interfaces.d. Their names start with ``ovm-`` (or
contain it), so a later run replaces them and `unconfigure`/`cleanup` remove exactly them.
"""

from __future__ import annotations

import os
import socket

from ..common import TemplateError
from . import netconfig, validate
from .base import Module, Pairs, Param, System, boolean, value

P = "com.oracle.linux.network."
MAX_INTERFACES = 16
HOSTS_BEGIN = "# BEGIN ovm-template-config network"
HOSTS_END = "# END ovm-template-config network"


def params(target: str) -> list[Param]:
    if target not in ("configure", "reconfigure"):
        return []
    out = [
        Param(P + "hostname", "Host name (fully qualified)"),
        Param(P + "host.0", "An /etc/hosts line: IP FQDN [alias...]"),
        Param(P + "device.0", "Interface of the first NIC (default eth0)"),
        Param(P + "mac.0", "MAC address of the first NIC (finds its interface)"),
        Param(P + "onboot.0", "Bring it up at boot: yes or no"),
        Param(P + "bootproto.0", "dhcp or static"),
        Param(P + "ipaddr.0", "IPv4 address (static)"),
        Param(P + "netmask.0", "Netmask, e.g. 255.255.255.0 (static)"),
        Param(P + "gateway.0", "Default gateway (static)"),
        Param(P + "dns-servers.0", "DNS servers, comma-separated"),
        Param(P + "dns-search-domains.0", "DNS search domains, comma-separated"),
    ]
    return out


def _indexed(pairs: Pairs, field: str, n: int) -> str:
    return value(pairs, "%s%s.%d" % (P, field, n))


def _dns(pairs: Pairs, field: str) -> tuple[str, str]:
    for key in (P + field + ".0", P + field):
        if value(pairs, key):
            return key, value(pairs, key)
    return P + field + ".0", ""


def _find_by_mac(system: System, address: str) -> str | None:
    base = system.path("/sys/class/net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    for name in names:
        if system.read("/sys/class/net/%s/address" % name).strip().lower() == address:
            return name
    return None


def plan(pairs: Pairs, system: System) -> netconfig.Plan:
    """Every key checked and turned into what to write; TemplateError before anything is done."""
    result = netconfig.Plan()
    if value(pairs, P + "hostname"):
        result.hostname = validate.hostname(P + "hostname", value(pairs, P + "hostname"))
    for n in range(MAX_INTERFACES):
        key = "%shost.%d" % (P, n)
        if value(pairs, key):
            fields = value(pairs, key).split()
            if len(fields) < 2:
                raise TemplateError("%s: expected IP FQDN [alias...]" % key)
            ip = validate.ip_any(key, fields[0])
            names = [validate.hostname(key, f) for f in fields[1:]]
            result.hosts.append("%s %s" % (ip, " ".join(names)))
    for n in range(MAX_INTERFACES):
        keys = {f: "%s%s.%d" % (P, f, n) for f in netconfig.FIELDS}
        given = {f: _indexed(pairs, f, n) for f in netconfig.FIELDS}
        if not any(given.values()):
            continue
        iface = netconfig.Interface(index=n)
        if given["mac"]:
            iface.mac = validate.mac(keys["mac"], given["mac"])
        if given["device"]:
            iface.device = validate.device(keys["device"], given["device"])
        elif iface.mac:
            found = _find_by_mac(system, iface.mac)
            if found is None:
                raise TemplateError("%s: no interface has this MAC address" % keys["mac"])
            iface.device = found
        else:
            iface.device = "eth%d" % n
        onboot = boolean(pairs, keys["onboot"])
        iface.onboot = True if onboot is None else onboot
        proto = given["bootproto"].lower() or ("static" if given["ipaddr"] else "dhcp")
        if proto not in ("dhcp", "static", "none"):
            raise TemplateError("%s: dhcp or static" % keys["bootproto"])
        iface.bootproto = "static" if proto == "none" else proto
        if iface.bootproto == "static":
            if not given["ipaddr"]:
                raise TemplateError("%s: required with a static address" % keys["ipaddr"])
            if not given["netmask"]:
                raise TemplateError("%s: required with a static address" % keys["netmask"])
            iface.address = str(validate.ipv4(keys["ipaddr"], given["ipaddr"]))
            iface.prefix = validate.netmask(keys["netmask"], given["netmask"])
            if given["gateway"]:
                iface.gateway = str(validate.ipv4(keys["gateway"], given["gateway"]))
        elif given["ipaddr"] or given["netmask"] or given["gateway"]:
            raise TemplateError("%s: an address with bootproto dhcp" % keys["ipaddr"])
        if any(i.device == iface.device for i in result.interfaces):
            raise TemplateError("%s: %s is configured twice" % (keys["device"], iface.device))
        result.interfaces.append(iface)
    key, text = _dns(pairs, "dns-servers")
    if text:
        result.dns = [validate.ip_any(key, s) for s in validate.comma_list(text)]
    key, text = _dns(pairs, "dns-search-domains")
    if text:
        result.search = validate.domains(key, text)
    return result


def _hosts(system: System, plan_: netconfig.Plan) -> None:
    lines = list(plan_.hosts)
    if plan_.hostname:
        short = plan_.hostname.split(".")[0]
        names = plan_.hostname if short == plan_.hostname else "%s %s" % (plan_.hostname, short)
        static = next((i.address for i in plan_.interfaces if i.address), None)
        lines.insert(0, "%s %s" % (static or "127.0.1.1", names))
    text = system.read("/etc/hosts", "127.0.0.1 localhost\n")
    kept = _without_block(text, drop_debian_line=bool(plan_.hostname))
    if lines:
        kept = kept.rstrip("\n") + "\n" + "\n".join([HOSTS_BEGIN, *lines, HOSTS_END]) + "\n"
    if kept != text:
        system.write("/etc/hosts", kept)


def _without_block(text: str, drop_debian_line: bool = False) -> str:
    out, inside = [], False
    for line in text.splitlines():
        if line.strip() == HOSTS_BEGIN:
            inside = True
        elif line.strip() == HOSTS_END:
            inside = False
        elif not inside and not (drop_debian_line and _is_debian_hostname_line(line)):
            out.append(line)
    return "\n".join(out) + "\n"


def _is_debian_hostname_line(line: str) -> bool:
    # Debian's installer maps the host name to 127.0.1.1; ours replaces it, never doubles it.
    return line.split()[:1] == ["127.0.1.1"]


def configure(pairs: Pairs, system: System) -> None:
    p = plan(pairs, system)
    if not (p.hostname or p.hosts or p.interfaces or p.dns or p.search):
        return
    backend = netconfig.backend(system) if (p.interfaces or p.dns or p.search) else None
    if p.hostname:
        system.write("/etc/hostname", p.hostname + "\n")
        if system.root == "/" and not system.command_log:
            try:
                socket.sethostname(p.hostname)
            except OSError as e:
                raise TemplateError("%s: cannot set it (%s)" % (P + "hostname", e.strerror)) from e
    _hosts(system, p)
    if backend is not None:
        backend.apply(p)


def unconfigure(pairs: Pairs, system: System) -> None:
    """Remove every interface file and /etc/hosts entry this module wrote (nothing is brought
    down: the files take effect at the next boot, as the template's own did)."""
    for b in netconfig.BACKENDS:
        b(system).remove_all()
    text = system.read("/etc/hosts")
    if HOSTS_BEGIN in text:
        system.write("/etc/hosts", _without_block(text))


MODULE = Module(
    params,
    {
        "configure": configure,
        "reconfigure": configure,
        "unconfigure": unconfigure,
        "cleanup": unconfigure,
    },
)

if __name__ == "__main__":
    MODULE.main()
