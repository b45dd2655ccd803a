"""hostbridge.config: the TOML file's settings, their checks, and an obsolete setting."""

import pytest

from hostbridge.config import ConfigError, load_file


def write(tmp_path, text):
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return str(p)


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
