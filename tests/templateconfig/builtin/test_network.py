"""Module network: every key checked before anything is written, and the files each network
system reads (ifupdown on Debian, NetworkManager keyfiles on RHEL, systemd-networkd)."""

import configparser

import pytest

from templateconfig.builtin.base import System
from templateconfig.builtin.network import MODULE
from templateconfig.common import TemplateError
from tests.templateconfig.support import commands, system_root

P = "com.oracle.linux.network."
STATIC = {
    P + "hostname": "vm1.example.com",
    P + "ipaddr.0": "192.0.2.10",
    P + "netmask.0": "255.255.255.0",
    P + "gateway.0": "192.0.2.1",
    P + "dns-servers.0": "192.0.2.53, 192.0.2.54",
    P + "dns-search-domains.0": "example.com,lab.example.com",
}


def run(tmp_path, pairs, network="ifupdown", target="configure"):
    root = system_root(tmp_path, network)
    log = tmp_path / "commands"
    MODULE.run(target, dict(pairs), System(str(root), str(log)))
    return root, commands(log)


def test_ifupdown_should_get_an_interfaces_file_resolv_conf_hosts_and_an_ifup(tmp_path):
    root, cmds = run(tmp_path, STATIC)
    iface = (root / "etc/network/interfaces.d/ovm-eth0").read_text().splitlines()
    assert iface[1:] == [
        "auto eth0",
        "allow-hotplug eth0",
        "iface eth0 inet static",
        "    address 192.0.2.10/24",
        "    gateway 192.0.2.1",
    ]
    resolv = (root / "etc/resolv.conf").read_text().splitlines()[1:]
    assert resolv == [
        "search example.com lab.example.com",
        "nameserver 192.0.2.53",
        "nameserver 192.0.2.54",
    ]
    assert (root / "etc/hostname").read_text() == "vm1.example.com\n"
    hosts = (root / "etc/hosts").read_text()
    assert "192.0.2.10 vm1.example.com vm1" in hosts and "127.0.1.1" not in hosts
    assert cmds == [["ifdown", "--force", "eth0"], ["ifup", "eth0"]]


def test_rhel_networkmanager_should_get_a_private_keyfile_it_can_read(tmp_path):
    root, cmds = run(tmp_path, STATIC, network="nm")
    path = root / "etc/NetworkManager/system-connections/ovm-eth0.nmconnection"
    assert path.stat().st_mode & 0o777 == 0o600
    kf = configparser.ConfigParser()
    kf.read_string(path.read_text())
    assert dict(kf["connection"]) == {
        "id": "ovm-eth0",
        "type": "ethernet",
        "interface-name": "eth0",
        "autoconnect": "true",
        "autoconnect-priority": "100",
    }
    assert kf["ipv4"]["method"] == "manual"
    assert kf["ipv4"]["address1"] == "192.0.2.10/24,192.0.2.1"
    assert kf["ipv4"]["dns"] == "192.0.2.53;192.0.2.54;"
    assert kf["ipv4"]["dns-search"] == "example.com;lab.example.com;"
    assert not (root / "etc/resolv.conf").exists()  # NetworkManager writes it
    assert cmds == [["nmcli", "connection", "reload"], ["nmcli", "connection", "up", "ovm-eth0"]]


def test_networkd_should_get_a_network_file_matched_by_mac_when_one_is_given(tmp_path):
    pairs = dict(STATIC, **{P + "mac.0": "52:54:00:AA:BB:CC", P + "device.0": "ens3"})
    root, cmds = run(tmp_path, pairs, network="networkd")
    text = (root / "etc/systemd/network/10-ovm-ens3.network").read_text().splitlines()
    assert text[1:] == [
        "[Match]",
        "MACAddress=52:54:00:aa:bb:cc",
        "",
        "[Network]",
        "Address=192.0.2.10/24",
        "Gateway=192.0.2.1",
        "DNS=192.0.2.53",
        "DNS=192.0.2.54",
        "Domains=example.com lab.example.com",
    ]
    assert cmds == [["networkctl", "reload"], ["networkctl", "reconfigure", "ens3"]]


def test_dhcp_should_be_the_default_without_an_address_and_dns_keys_work_without_the_index(
    tmp_path,
):
    pairs = {P + "device.1": "eth1", P + "dns-servers": "192.0.2.99"}
    root, _ = run(tmp_path, pairs)
    assert "iface eth1 inet dhcp" in (root / "etc/network/interfaces.d/ovm-eth1").read_text()
    assert "nameserver 192.0.2.99" in (root / "etc/resolv.conf").read_text()


@pytest.mark.parametrize(
    "change, key, why",
    [
        ({P + "ipaddr.0": "192.0.2.300"}, P + "ipaddr.0", "not an IPv4 address"),
        ({P + "netmask.0": "255.0.255.0"}, P + "netmask.0", "not a netmask"),
        ({P + "hostname": "bad_name!.example"}, P + "hostname", "not a valid host name"),
        ({P + "dns-servers.0": "192.0.2.1,nope"}, P + "dns-servers.0", "not an IP address"),
        ({P + "bootproto.0": "carrier-pigeon"}, P + "bootproto.0", "dhcp or static"),
        ({P + "netmask.0": ""}, P + "netmask.0", "required with a static address"),
        ({P + "mac.0": "52:54:00"}, P + "mac.0", "not a MAC address"),
    ],
)
def test_a_bad_key_should_be_refused_by_name_before_anything_is_written(tmp_path, change, key, why):
    root = system_root(tmp_path)
    hosts = (root / "etc/hosts").read_text()
    with pytest.raises(TemplateError) as e:
        MODULE.run("configure", dict(STATIC, **change), System(str(root), str(tmp_path / "c")))
    assert str(e.value).startswith("%s: %s" % (key, why))
    for value in change.values():
        assert not value or value not in str(e.value)
    assert not (root / "etc/hostname").exists()
    assert not (root / "etc/resolv.conf").exists()
    assert (root / "etc/hosts").read_text() == hosts
    assert list((root / "etc/network/interfaces.d").iterdir()) == []
    assert commands(tmp_path / "c") == []


def test_unconfigure_should_remove_exactly_what_configure_wrote(tmp_path):
    root, _ = run(tmp_path, STATIC)
    (root / "etc/network/interfaces.d/lo-by-admin").write_text("auto lo\n")
    MODULE.run("unconfigure", {}, System(str(root), str(tmp_path / "c2")))
    assert [p.name for p in (root / "etc/network/interfaces.d").iterdir()] == ["lo-by-admin"]
    assert "ovm-template-config" not in (root / "etc/hosts").read_text()


def test_dns_keys_should_win_over_dhcps_on_ifupdown_and_the_hook_go_when_unneeded(tmp_path):
    hook = "etc/dhcp/dhclient-enter-hooks.d/ovm-template-config"
    pairs = {P + "bootproto.0": "dhcp", P + "dns-servers.0": "192.0.2.53"}
    root, _ = run(tmp_path, pairs)
    assert "make_resolv_conf() { :; }" in (root / hook).read_text()
    assert "nameserver 192.0.2.53" in (root / "etc/resolv.conf").read_text()
    # Without DNS keys, the DHCP server's DNS is used again.
    MODULE.run("configure", {P + "bootproto.0": "dhcp"}, System(str(root), str(tmp_path / "c2")))
    assert not (root / hook).exists()
    MODULE.run("configure", pairs, System(str(root), str(tmp_path / "c3")))
    MODULE.run("unconfigure", {}, System(str(root), str(tmp_path / "c4")))
    assert not (root / hook).exists()
