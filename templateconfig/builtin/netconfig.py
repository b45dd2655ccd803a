"""Where interface settings go: NetworkManager, systemd-networkd or ifupdown, whichever the system
runs (detected in that order), and DNS where that system's resolver reads it.

- NetworkManager (running: a process named NetworkManager): a keyfile per interface,
  /etc/NetworkManager/system-connections/ovm-DEV.nmconnection (0600), then
  `nmcli connection reload` and `nmcli connection up ovm-DEV`. NetworkManager writes
  resolv.conf from the keyfile's DNS.
- systemd-networkd (running: a process named systemd-networkd):
  /etc/systemd/network/10-ovm-DEV.network, then `networkctl reload` and
  `networkctl reconfigure DEV`. DNS goes in the .network file and, unless
  resolv.conf is systemd-resolved's, into /etc/resolv.conf too.
- ifupdown (/sbin/ifup present): /etc/network/interfaces.d/ovm-DEV, then `ifdown --force DEV` and
  `ifup DEV`; DNS into /etc/resolv.conf (or a systemd-resolved drop-in when resolv.conf is its).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..common import TemplateError
from .base import System

FIELDS = ("device", "mac", "onboot", "bootproto", "ipaddr", "netmask", "gateway")
RESOLVED_DROPIN = "/etc/systemd/resolved.conf.d/50-ovm-template-config.conf"
HEADER = "# Written by ovm-template-config (module network); a later run replaces it.\n"


@dataclass
class Interface:
    index: int
    device: str = ""
    mac: str = ""
    onboot: bool = True
    bootproto: str = "dhcp"
    address: str = ""
    prefix: int = 0
    gateway: str = ""


@dataclass
class Plan:
    hostname: str = ""
    hosts: list[str] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)


class Backend:
    name = ""
    directory = ""

    def __init__(self, system: System) -> None:
        self.system = system

    def file(self, device: str) -> str:
        raise NotImplementedError

    def ours(self, name: str) -> bool:
        return "ovm-" in name

    def remove_all(self) -> None:
        try:
            names = os.listdir(self.system.path(self.directory))
        except OSError:
            return
        for name in names:
            if self.ours(name):
                self.system.remove(os.path.join(self.directory, name))

    def apply(self, plan: Plan) -> None:
        for iface in plan.interfaces:
            self.system.write(self.file(iface.device), self.render(iface, plan), self.mode)
        self.dns(plan)
        for iface in plan.interfaces:
            self.activate(iface)

    mode = 0o644

    def render(self, iface: Interface, plan: Plan) -> str:
        raise NotImplementedError

    def activate(self, iface: Interface) -> None:
        raise NotImplementedError

    def dns(self, plan: Plan) -> None:
        write_resolver(self.system, plan)


def write_resolver(system: System, plan: Plan) -> None:
    """DNS for a system whose network configuration does not hand it to the resolver."""
    if not (plan.dns or plan.search):
        return
    target = os.path.realpath(system.path("/etc/resolv.conf"))
    if "/run/systemd/resolve/" in target:
        text = HEADER + "[Resolve]\n"
        if plan.dns:
            text += "DNS=%s\n" % " ".join(plan.dns)
        if plan.search:
            text += "Domains=%s\n" % " ".join(plan.search)
        system.write(RESOLVED_DROPIN, text)
        system.run(["systemctl", "try-restart", "systemd-resolved.service"], check=False)
        return
    text = HEADER
    if plan.search:
        text += "search %s\n" % " ".join(plan.search)
    for server in plan.dns[:3]:  # the C library reads three
        text += "nameserver %s\n" % server
    system.write("/etc/resolv.conf", text)


class NetworkManager(Backend):
    name = "NetworkManager"
    directory = "/etc/NetworkManager/system-connections"
    mode = 0o600  # NetworkManager ignores a keyfile others can read

    def file(self, device: str) -> str:
        return "%s/ovm-%s.nmconnection" % (self.directory, device)

    def render(self, iface: Interface, plan: Plan) -> str:
        lines = [
            HEADER.rstrip("\n"),
            "[connection]",
            "id=ovm-%s" % iface.device,
            "type=ethernet",
            "interface-name=%s" % iface.device,
            "autoconnect=%s" % ("true" if iface.onboot else "false"),
            "autoconnect-priority=100",
            "",
            "[ethernet]",
        ]
        if iface.mac:
            lines.append("mac-address=%s" % iface.mac.upper())
        lines += ["", "[ipv4]"]
        if iface.bootproto == "static":
            lines.append("method=manual")
            addr = "%s/%d" % (iface.address, iface.prefix)
            lines.append("address1=%s%s" % (addr, "," + iface.gateway if iface.gateway else ""))
        else:
            lines.append("method=auto")
        if plan.dns:
            lines.append("dns=%s;" % ";".join(d for d in plan.dns if ":" not in d))
            if iface.bootproto != "static":
                lines.append("ignore-auto-dns=true")
        if plan.search:
            lines.append("dns-search=%s;" % ";".join(plan.search))
        lines += ["", "[ipv6]", "method=auto", ""]
        return "\n".join(lines)

    def dns(self, plan: Plan) -> None:
        if plan.interfaces or not (plan.dns or plan.search):
            return  # NetworkManager writes resolv.conf from the keyfiles
        raise TemplateError(
            "com.oracle.linux.network.dns-servers.0: with NetworkManager, DNS goes with an "
            "interface (give its device.N or ipaddr.N too)"
        )

    def activate(self, iface: Interface) -> None:
        self.system.run(["nmcli", "connection", "reload"])
        if iface.onboot:
            self.system.run(["nmcli", "connection", "up", "ovm-%s" % iface.device])


class Networkd(Backend):
    name = "systemd-networkd"
    directory = "/etc/systemd/network"

    def file(self, device: str) -> str:
        return "%s/10-ovm-%s.network" % (self.directory, device)

    def render(self, iface: Interface, plan: Plan) -> str:
        lines = [HEADER.rstrip("\n"), "[Match]"]
        lines.append("MACAddress=%s" % iface.mac if iface.mac else "Name=%s" % iface.device)
        if not iface.onboot:
            lines += ["", "[Link]", "ActivationPolicy=manual"]
        lines += ["", "[Network]"]
        if iface.bootproto == "static":
            lines.append("Address=%s/%d" % (iface.address, iface.prefix))
            if iface.gateway:
                lines.append("Gateway=%s" % iface.gateway)
        else:
            lines.append("DHCP=ipv4")
        lines += ["DNS=%s" % d for d in plan.dns]
        if plan.search:
            lines.append("Domains=%s" % " ".join(plan.search))
        return "\n".join(lines) + "\n"

    def activate(self, iface: Interface) -> None:
        self.system.run(["networkctl", "reload"])
        self.system.run(["networkctl", "reconfigure", iface.device])


class Ifupdown(Backend):
    name = "ifupdown"
    directory = "/etc/network/interfaces.d"
    # dhclient rewrites resolv.conf with the DHCP server's DNS at every lease: given DNS keys
    # win, as NetworkManager's ignore-auto-dns makes them, through this hook.
    DHCLIENT_HOOK = "/etc/dhcp/dhclient-enter-hooks.d/ovm-template-config"

    def file(self, device: str) -> str:
        return "%s/ovm-%s" % (self.directory, device)

    def dns(self, plan: Plan) -> None:
        super().dns(plan)
        if plan.dns and any(i.bootproto == "dhcp" for i in plan.interfaces):
            self.system.write(
                self.DHCLIENT_HOOK,
                HEADER
                + "# The DNS servers given to the VM win over the DHCP server's.\n"
                + "make_resolv_conf() { :; }\n",
            )
        else:
            self.system.remove(self.DHCLIENT_HOOK)

    def remove_all(self) -> None:
        super().remove_all()
        self.system.remove(self.DHCLIENT_HOOK)

    def render(self, iface: Interface, plan: Plan) -> str:
        lines = [HEADER.rstrip("\n")]
        if iface.onboot:
            lines.append("auto %s" % iface.device)
        lines.append("allow-hotplug %s" % iface.device)
        if iface.bootproto == "static":
            lines.append("iface %s inet static" % iface.device)
            lines.append("    address %s/%d" % (iface.address, iface.prefix))
            if iface.gateway:
                lines.append("    gateway %s" % iface.gateway)
        else:
            lines.append("iface %s inet dhcp" % iface.device)
        if iface.mac:
            lines.append("    hwaddress ether %s" % iface.mac)
        return "\n".join(lines) + "\n"

    def activate(self, iface: Interface) -> None:
        self.system.run(["ifdown", "--force", iface.device], check=False)
        if iface.onboot:
            self.system.run(["ifup", iface.device])


BACKENDS = (NetworkManager, Networkd, Ifupdown)


def backend(system: System) -> Backend:
    """The system's network configuration: the running one, else the one installed."""
    if system.running("NetworkManager") and system.has_command("nmcli"):
        return NetworkManager(system)
    if system.running("systemd-networkd") and system.has_command("networkctl"):
        return Networkd(system)
    if system.has_command("ifup"):
        return Ifupdown(system)
    if system.has_command("nmcli"):
        return NetworkManager(system)
    if system.has_command("networkctl"):
        return Networkd(system)
    raise TemplateError(
        "com.oracle.linux.network: no network configuration system found "
        "(NetworkManager, systemd-networkd or ifupdown)"
    )
