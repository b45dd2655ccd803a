"""Checks of the values modules take. Each raises TemplateError naming the key, never the value."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import struct

from ovmproto.templatekeys import CRYPT_PREFIX

from ..common import TemplateError

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_DEVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_B64 = r"[./0-9A-Za-z]"
# Hash formats a modern crypt(3) (libxcrypt: Debian 12, RHEL 9) verifies, given as "{crypt}HASH".
CRYPT_FORMATS = {
    "yescrypt ($y$)": re.compile(r"^\$y\$%s+\$%s+\$%s{43}$" % (_B64, _B64, _B64)),
    "gost-yescrypt ($gy$)": re.compile(r"^\$gy\$%s+\$%s+\$%s{43}$" % (_B64, _B64, _B64)),
    "scrypt ($7$)": re.compile(r"^\$7\$%s{11,}\$%s+\$%s{43}$" % (_B64, _B64, _B64)),
    "bcrypt ($2b$)": re.compile(r"^\$2[aby]\$\d\d\$%s{53}$" % _B64),
    "sha512crypt ($6$)": re.compile(r"^\$6\$(rounds=\d{4,9}\$)?%s{1,16}\$%s{86}$" % (_B64, _B64)),
    "sha256crypt ($5$)": re.compile(r"^\$5\$(rounds=\d{4,9}\$)?%s{1,16}\$%s{43}$" % (_B64, _B64)),
}

SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def hostname(key: str, text: str) -> str:
    name = text.rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
        raise TemplateError("%s: not a valid host name (letters, digits, '-', dots)" % key)
    return name


def ipv4(key: str, text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise TemplateError("%s: not an IPv4 address" % key) from None


def ip_any(key: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise TemplateError("%s: not an IP address" % key) from None


def netmask(key: str, text: str) -> int:
    """A dotted netmask (255.255.255.0) or a prefix length (24, /24); the prefix length."""
    t = text.lstrip("/")
    if t.isdigit():
        if 0 < int(t) <= 32:
            return int(t)
        raise TemplateError("%s: prefix length not in 1-32" % key)
    try:
        return ipaddress.IPv4Network("0.0.0.0/%s" % t).prefixlen
    except ValueError:
        raise TemplateError("%s: not a netmask (e.g. 255.255.255.0 or 24)" % key) from None


def device(key: str, text: str) -> str:
    if not _DEVICE.match(text) or text in (".", ".."):
        raise TemplateError("%s: not a network interface name" % key)
    return text


def mac(key: str, text: str) -> str:
    if not _MAC.match(text):
        raise TemplateError("%s: not a MAC address (xx:xx:xx:xx:xx:xx)" % key)
    return text.lower()


def comma_list(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"[,\s]+", text) if p.strip()]


def domains(key: str, text: str) -> list[str]:
    return [hostname(key, d) for d in comma_list(text)]


def user_name(key: str, text: str) -> str:
    if not _USER.match(text):
        raise TemplateError("%s: not a user name (a-z, 0-9, '_', '-'; up to 32)" % key)
    return text


def password(key: str, text: str) -> tuple[str, bool]:
    """(the password or hash, whether it is a hash). A hash is given as {crypt}HASH."""
    if text[: len(CRYPT_PREFIX)].lower() == CRYPT_PREFIX:
        h = text[len(CRYPT_PREFIX) :]
        if not any(rx.match(h) for rx in CRYPT_FORMATS.values()):
            raise TemplateError(
                "%s: a {crypt} hash in an unknown format (known: %s)"
                % (key, ", ".join(CRYPT_FORMATS))
            )
        return h, True
    if not text:
        raise TemplateError("%s: empty" % key)
    if "\n" in text or "\r" in text or "\0" in text:
        raise TemplateError("%s: a password may not hold a line break or NUL" % key)
    return text, False


def ssh_keys(key: str, text: str) -> list[str]:
    """The public keys in ``text`` (one a line; blank lines and # comments skipped), each checked:
    a known type, then base64 whose own type field is the same type."""
    keys = []
    for n, line in enumerate(text.replace("\r", "").split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        at = next((i for i, f in enumerate(fields) if f in SSH_KEY_TYPES), None)
        if at is None or at + 1 >= len(fields):
            raise TemplateError("%s: line %d is not an ssh public key of a known type" % (key, n))
        kind = fields[at]
        try:
            blob = base64.b64decode(fields[at + 1], validate=True)
            (length,) = struct.unpack(">I", blob[:4])
            inner = blob[4 : 4 + length].decode("ascii")
        except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
            raise TemplateError("%s: line %d: the key's data is not valid" % (key, n)) from None
        if inner != kind or len(blob) < 4 + length + 4:
            raise TemplateError("%s: line %d: the key's data is not a %s key" % (key, n, kind))
        keys.append(line)
    if not keys:
        raise TemplateError("%s: no ssh public key" % key)
    return keys
