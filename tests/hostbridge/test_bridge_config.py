"""hostbridge.config: the TOML file's settings, their checks, and an obsolete setting."""

import pytest

from hostbridge.config import Config, ConfigError, load_file


def write(tmp_path, text):
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return str(p)


def test_the_audit_should_keep_10000_rows_per_vm_unless_the_file_says_otherwise(tmp_path):
    assert Config().limits.audit_rows == 10000
    config = load_file(write(tmp_path, "[limits]\naudit_rows = 3\n"))
    assert config.limits.audit_rows == 3
    config.check()


@pytest.mark.parametrize("value", ["0", "-5"])
def test_an_audit_limit_below_one_row_should_be_refused_in_one_line(tmp_path, value):
    config = load_file(write(tmp_path, "[limits]\naudit_rows = %s\n" % value))
    with pytest.raises(ConfigError) as e:
        config.check()
    assert "audit_rows" in str(e.value) and "\n" not in str(e.value)


def test_queued_messages_should_not_expire_unless_the_file_says_so(tmp_path):
    assert Config().limits.message_expiry == 0
    config = load_file(write(tmp_path, "[limits]\nmessage_expiry = 86400\n"))
    assert config.limits.message_expiry == 86400.0
    config.check()


@pytest.mark.parametrize("value", ["0.5", "-1", "1e12", "nan"])
def test_a_message_expiry_outside_its_range_should_be_refused_in_one_line(tmp_path, value):
    config = load_file(write(tmp_path, "[limits]\nmessage_expiry = %s\n" % value))
    with pytest.raises(ConfigError) as e:
        config.check()
    assert "message_expiry" in str(e.value) and "from 1 to" in str(e.value)


def test_the_obsolete_bridge_log_setting_should_be_accepted_ignored_and_noted_once(tmp_path):
    path = write(tmp_path, '[bridge]\nlog = false\napi_group = "g"\n')
    config = load_file(path)
    assert config.api_group == "g"
    assert not hasattr(config, "log")
    (warning,) = config.warnings
    assert path in warning and "[bridge] log" in warning and "\n" not in warning


def test_a_config_without_obsolete_settings_should_have_nothing_to_note(tmp_path):
    assert load_file(write(tmp_path, '[bridge]\napi_group = "g"\n')).warnings == []


def test_the_obsolete_bridge_log_setting_should_still_be_type_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"\[bridge\] log has the wrong type"):
        load_file(write(tmp_path, '[bridge]\nlog = "yes"\n'))


@pytest.mark.parametrize("value", ["0", "5e-324", "0.05", "301"])
def test_a_query_timeout_the_bridge_cannot_honour_should_be_refused_naming_the_bounds(
    tmp_path, value
):
    config = load_file(write(tmp_path, "[bridge]\nquery_timeout = %s\n" % value))
    with pytest.raises(ConfigError, match=r"^query_timeout must be from 0.1 to 300 seconds$"):
        config.check()


def test_a_guest_may_be_reconnected_30_times_a_minute_unless_the_file_says_otherwise(tmp_path):
    assert Config().limits.reconnect_budget == 30
    config = load_file(write(tmp_path, "[limits]\nreconnect_budget = 5\n"))
    assert config.limits.reconnect_budget == 5
    config.check()


@pytest.mark.parametrize("setting", ["reconnect_budget = 0", "reconnect_max = 0"])
def test_a_reconnect_budget_below_one_should_be_refused_in_one_line(tmp_path, setting):
    config = load_file(write(tmp_path, "[limits]\n%s\n" % setting))
    with pytest.raises(ConfigError) as e:
        config.check()
    assert "reconnect_" in str(e.value) and "\n" not in str(e.value)


def test_the_tcp_apis_admission_limits_should_come_from_the_api_table(tmp_path):
    assert Config().api_limits.max_per_address == 16
    config = load_file(write(tmp_path, "[api]\nmax_per_address = 4\nauth_timeout = 5\n"))
    assert (config.api_limits.max_per_address, config.api_limits.auth_timeout) == (4, 5.0)
    config.check()


@pytest.mark.parametrize(
    "text", ["max_connections = 0", "handshake_timeout = 0", "nonsense = 1", "fd_reserve = true"]
)
def test_a_bad_api_setting_should_be_refused_in_one_line(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load_file(write(tmp_path, "[api]\n%s\n" % text)).check()
    assert "[api]" in str(e.value) and "\n" not in str(e.value)


def test_run_states_should_be_asked_of_libvirt_with_discovery_or_a_libvirt_uri(tmp_path):
    assert Config().libvirt_enabled  # no VM given: discovery, and run states from libvirt
    static = '[[vm]]\nname = "a"\nchannel = "unix:/tmp/a.sock"\n'
    config = load_file(write(tmp_path, static))
    assert not config.discovery_enabled and not config.libvirt_enabled
    config = load_file(write(tmp_path, '[bridge]\nlibvirt_uri = "qemu:///session"\n' + static))
    assert (config.libvirt_uri, config.libvirt_enabled) == ("qemu:///session", True)
    with pytest.raises(ConfigError, match="libvirt_uri has the wrong type"):
        load_file(write(tmp_path, "[bridge]\nlibvirt_uri = 1\n"))


POOL = """
[store]
url = "postgresql://hostbridge@db.example/ovmd"
[pool]
host = "hv1"
key_file = "/etc/hostbridge/pool.key"
lease = 6
[bridge]
api_tcp = "0.0.0.0:8443"
tls_cert = "/c.pem"
tls_key = "/k.pem"
"""


def test_a_bridge_without_a_store_url_should_be_a_single_host():
    config = Config()
    config.check()
    assert not config.pooled


def test_a_store_url_should_make_the_bridge_one_of_a_pool(tmp_path):
    config = load_file(write(tmp_path, POOL))
    config.check()
    assert config.pooled and config.store_url == "postgresql://hostbridge@db.example/ovmd"
    assert (config.pool.host_name(), config.pool.lease) == ("hv1", 6.0)
    # No [pool] url: the other bridges reach this one at its TCP API, by its name.
    assert config.pool_url().startswith("https://") and config.pool_url().endswith(":8443")
    assert "0.0.0.0" not in config.pool_url()


@pytest.mark.parametrize(
    "change, word",
    [
        (('url = "postgresql://', 'url = "mysql://'), "postgresql://"),
        (('key_file = "/etc/hostbridge/pool.key"\n', ""), "key_file"),
        (('api_tcp = "0.0.0.0:8443"\n', ""), "api_tcp"),
        (("lease = 6", "lease = 0.1"), "lease"),
        (("lease = 6", 'url = "http://hv1:8443"'), "https://"),
    ],
)
def test_an_inconsistent_pool_should_be_refused_in_one_line(tmp_path, change, word):
    config = load_file(write(tmp_path, POOL.replace(*change)))
    with pytest.raises(ConfigError) as e:
        config.check()
    assert word in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text", ["[pool]\nhosts = 3\n", "[pool]\nlease = true\n", "[store]\ndb = 1\n"]
)
def test_a_bad_pool_or_store_setting_should_be_refused_in_one_line(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load_file(write(tmp_path, text))
    assert "\n" not in str(e.value)
