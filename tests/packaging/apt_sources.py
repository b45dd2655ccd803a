"""Where this host's apt gets Debian from: the mirror and suite for a fresh chroot of the same
release (debian_chroot.py), and the proxy apt goes through.

Read from the host: /etc/apt/sources.list and sources.list.d/*.list (one-line format),
sources.list.d/*.sources (deb822), /etc/os-release for the release's codename, `apt-config dump`
for Acquire::http::Proxy, else $http_proxy. Each can be overridden: OVMD_TEST_APT_MIRROR,
OVMD_TEST_APT_SUITE, OVMD_TEST_APT_PROXY (empty: no proxy).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

MIRROR_ENV = "OVMD_TEST_APT_MIRROR"
SUITE_ENV = "OVMD_TEST_APT_SUITE"
PROXY_ENV = "OVMD_TEST_APT_PROXY"


@dataclass(frozen=True)
class Source:
    """One repository apt fetches binary packages from."""

    uri: str
    suite: str
    components: tuple[str, ...] = ()


def parse_one_line(text: str) -> list[Source]:
    """The `deb` lines of a sources.list (deb-src, comments and options are left out)."""
    sources = []
    for line in text.splitlines():
        m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)(.*)$", line.strip())
        if m:
            sources.append(Source(m.group(1).rstrip("/"), m.group(2), tuple(m.group(3).split())))
    return sources


def parse_deb822(text: str) -> list[Source]:
    """The enabled `deb` sources of a .sources file: stanzas of fields separated by blank lines,
    comment lines anywhere, indented lines continuing a field."""
    sources = []
    stanzas: list[dict[str, str]] = [{}]
    field = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            stanzas.append({})
            field = None
        elif line[0] in " \t" and field is not None:
            stanzas[-1][field] += " " + line.strip()
        elif ":" in line:
            field, _, value = line.partition(":")
            field = field.strip().lower()
            stanzas[-1][field] = value.strip()
    for fields in stanzas:
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                sources.append(Source(uri.rstrip("/"), suite, components))
    return sources


def host_sources(etc_apt: str = "/etc/apt") -> list[Source]:
    """Every `deb` source of the host, in apt's order."""
    sources = []
    lists = [os.path.join(etc_apt, "sources.list")]
    lists += sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*.list")))
    for path in lists + sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*.sources"))):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        sources += parse_deb822(text) if path.endswith(".sources") else parse_one_line(text)
    return sources


def host_codename(os_release: str = "/etc/os-release") -> str | None:
    """VERSION_CODENAME of the host's release (e.g. bookworm), if it says."""
    try:
        with open(os_release, encoding="utf-8") as f:
            m = re.search(r"^VERSION_CODENAME=\"?([^\"\n]*)\"?$", f.read(), re.M)
    except OSError:
        return None
    return (m.group(1) or None) if m else None


def release_source(sources: list[Source], codename: str | None = None) -> Source | None:
    """The source of a release's own archive: not -security, -updates or -backports (a suite
    without "-" or "/"), with component main; the one for ``codename`` if there is one."""
    releases = [
        s
        for s in sources
        if re.fullmatch(r"[\w.]+", s.suite) and "main" in s.components and "security" not in s.uri
    ]
    for source in releases:
        if source.suite == codename:
            return source
    return releases[0] if releases else None


def debian_source(
    environ: Mapping[str, str] = os.environ,
    etc_apt: str = "/etc/apt",
    os_release: str = "/etc/os-release",
) -> Source:
    """The mirror and suite for a chroot of the host's release; LookupError if neither the host
    nor the environment names one."""
    codename = environ.get(SUITE_ENV) or host_codename(os_release)
    found = release_source(host_sources(etc_apt), codename)
    mirror = environ.get(MIRROR_ENV) or (found.uri if found else None)
    suite = environ.get(SUITE_ENV) or (found.suite if found else codename)
    if not (mirror and suite):
        raise LookupError(
            "no release archive (a suite with component main) in the apt sources under %s; "
            "set %s and %s" % (etc_apt, MIRROR_ENV, SUITE_ENV)
        )
    return Source(mirror.rstrip("/"), suite, found.components if found else ("main",))


def proxy_from_apt_config(dump: str) -> str | None:
    """Acquire::http::Proxy in `apt-config dump` output, unless it says DIRECT (or is empty)."""
    m = re.search(r'^Acquire::http::Proxy\s+"([^"]*)";', dump, re.M)
    if m is None or m.group(1).strip().lower() in ("", "direct", "false"):
        return None
    return m.group(1).strip()


def apt_config_dump() -> str:
    """`apt-config dump`'s output (empty without apt)."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        return ""
    r = subprocess.run([apt_config, "dump"], capture_output=True, text=True, timeout=60)
    return r.stdout if r.returncode == 0 else ""


def http_proxy(environ: Mapping[str, str] = os.environ, dump: str | None = None) -> str | None:
    """The proxy for http downloads: $OVMD_TEST_APT_PROXY (empty: none), else apt's
    Acquire::http::Proxy (in ``dump``, by default apt-config's), else $http_proxy; None for a
    direct connection."""
    if PROXY_ENV in environ:
        return environ[PROXY_ENV] or None
    found = proxy_from_apt_config(apt_config_dump() if dump is None else dump)
    return found or environ.get("http_proxy") or environ.get("HTTP_PROXY") or None
