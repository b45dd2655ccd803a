"""apt_sources: the host's mirror, suite and proxy for the chroot, read from sample apt files."""

import pytest

from tests.packaging.apt_sources import (
    MIRROR_ENV,
    PROXY_ENV,
    SUITE_ENV,
    Source,
    debian_source,
    host_codename,
    host_sources,
    http_proxy,
    parse_deb822,
    parse_one_line,
    proxy_from_apt_config,
    release_source,
)

SOURCES_LIST = """\
# deb http://old.example/debian buster main
deb [arch=amd64 signed-by=/etc/k.gpg] http://mirror.example/debian/ bookworm main contrib
deb-src http://mirror.example/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
"""

DEB822 = """\
Types: deb deb-src
# a comment inside a stanza
URIs: http://deb.example/debian
Suites: trixie trixie-updates
Components: main
  non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://off.example/debian
Suites: trixie
Components: main
Enabled: no

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\nID=debian\n'


@pytest.fixture
def etc(tmp_path):
    """An /etc with both kinds of apt source files and an os-release."""
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True)
    (tmp_path / "apt" / "sources.list").write_text(SOURCES_LIST)
    (tmp_path / "apt" / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "apt" / "sources.list.d" / "old.list.disabled").write_text("deb http://x/ y main\n")
    (tmp_path / "os-release").write_text(OS_RELEASE)
    return tmp_path


def test_one_line_sources_should_give_deb_lines_without_their_options():
    assert parse_one_line(SOURCES_LIST) == [
        Source("http://mirror.example/debian", "bookworm", ("main", "contrib")),
        Source("http://security.debian.org/debian-security", "bookworm-security", ("main",)),
    ]


def test_deb822_sources_should_give_each_uri_and_suite_of_enabled_deb_stanzas():
    assert parse_deb822(DEB822) == [
        Source("http://deb.example/debian", "trixie", ("main", "non-free-firmware")),
        Source("http://deb.example/debian", "trixie-updates", ("main", "non-free-firmware")),
        Source("https://deb.nodesource.com/node_20.x", "nodistro", ("main",)),
    ]


def test_the_host_sources_should_come_in_apts_order_and_skip_other_files(etc):
    suites = [s.suite for s in host_sources(str(etc / "apt"))]
    assert suites == ["bookworm", "bookworm-security", "trixie", "trixie-updates", "nodistro"]


def test_the_release_should_be_the_hosts_codename_else_the_first_plain_suite(etc):
    sources = host_sources(str(etc / "apt"))
    assert host_codename(str(etc / "os-release")) == "trixie"
    assert release_source(sources, "trixie").uri == "http://deb.example/debian"
    assert release_source(sources, None).suite == "bookworm"
    assert release_source(parse_one_line(SOURCES_LIST)[1:], None) is None  # security only


def test_the_chroot_source_should_follow_the_host_unless_the_environment_says(etc):
    files = {"etc_apt": str(etc / "apt"), "os_release": str(etc / "os-release")}
    assert debian_source({}, **files) == Source(
        "http://deb.example/debian", "trixie", ("main", "non-free-firmware")
    )
    assert debian_source({SUITE_ENV: "bookworm"}, **files).uri == "http://mirror.example/debian"
    chosen = debian_source({MIRROR_ENV: "http://local/debian/", SUITE_ENV: "sid"}, **files)
    assert (chosen.uri, chosen.suite) == ("http://local/debian", "sid")
    nothing = {"etc_apt": str(etc / "none"), "os_release": str(etc / "none")}
    with pytest.raises(LookupError, match=MIRROR_ENV):
        debian_source({}, **nothing)
    assert debian_source({MIRROR_ENV: "http://m/debian", SUITE_ENV: "x"}, **nothing).suite == "x"


def test_the_proxy_should_be_the_variable_else_apts_else_http_proxy():
    dump = 'APT "";\nAcquire::http::Proxy "http://cache.example:3142/";\nAcquire::Retries "3";\n'
    env = {"http_proxy": "http://env.example:3128"}
    assert proxy_from_apt_config(dump) == "http://cache.example:3142/"
    assert proxy_from_apt_config('Acquire::http::Proxy "DIRECT";\n') is None
    assert http_proxy(env, dump) == "http://cache.example:3142/"
    assert http_proxy(env, "") == "http://env.example:3128"
    assert http_proxy({}, "") is None
    assert http_proxy(dict(env, **{PROXY_ENV: "http://chosen:1"}), dump) == "http://chosen:1"
    assert http_proxy(dict(env, **{PROXY_ENV: ""}), dump) is None
