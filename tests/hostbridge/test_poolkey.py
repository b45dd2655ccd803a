"""hostbridge.poolkey: the pool key's file, the sealing of log=no values, the bridges' token."""

import base64
import os

import pytest

from hostbridge.config import ConfigError
from hostbridge.errors import StoreError
from hostbridge.poolkey import PoolKey

AAD = b"ovmd outbox v1\0web1\0007\0password"


def key_file(tmp_path, text, mode=0o600):
    path = tmp_path / "pool.key"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_a_sealed_value_should_open_to_itself_and_hold_no_plaintext():
    key = PoolKey(os.urandom(32))
    value = "s3cret \u00e9\u2603 \x00 and more"
    sealed = key.seal(value, AAD)
    assert sealed.startswith("v1:")
    assert "s3cret" not in sealed
    assert key.open(sealed, AAD) == value
    assert key.seal(value, AAD) != sealed  # a fresh nonce each time


def test_opening_with_another_key_aad_or_altered_text_should_fail_with_one_line():
    key = PoolKey(os.urandom(32))
    sealed = key.seal("value", AAD)
    raw = bytearray(base64.b64decode(sealed[3:]))
    raw[-1] ^= 1
    tampered = "v1:" + base64.b64encode(bytes(raw)).decode()
    attempts = [
        (PoolKey(os.urandom(32)), sealed, AAD),
        (key, sealed, AAD.replace(b"web1", b"web2")),
        (key, tampered, AAD),
        (key, "v1:" + sealed[3:10], AAD),  # truncated
        (key, "not sealed", AAD),
        (key, "v1:***", AAD),  # not base64
    ]
    for k, text, aad in attempts:
        with pytest.raises(StoreError) as e:
            k.open(text, aad)
        assert "cannot be decrypted" in e.value.message
        assert "\n" not in e.value.message


def test_load_should_read_base64_of_32_bytes_and_ignore_whitespace(tmp_path):
    raw = os.urandom(32)
    text = base64.b64encode(raw).decode()
    path = key_file(tmp_path, "  %s\n%s\n\n" % (text[:20], text[20:]))
    loaded = PoolKey.load(path)
    assert loaded.api_token() == PoolKey(raw).api_token()
    assert text not in repr(loaded)


def test_load_should_refuse_a_key_that_group_or_others_may_read(tmp_path):
    path = key_file(tmp_path, PoolKey.generate(), mode=0o644)
    with pytest.raises(ConfigError) as e:
        PoolKey.load(path)
    assert e.value.message == (
        "pool key %s must not be readable by group or others (chmod 600)" % path
    )
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError):
        PoolKey.load(path)
    os.chmod(path, 0o400)
    PoolKey.load(path)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        base64.b64encode(os.urandom(31)).decode(),
        base64.b64encode(os.urandom(33)).decode(),
        "",
    ],
    ids=["not-base64", "31-bytes", "33-bytes", "empty"],
)
def test_load_should_refuse_what_is_not_base64_of_32_bytes_without_quoting_it(tmp_path, text):
    path = key_file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        PoolKey.load(path)
    assert "is not base64 of 32 bytes" in e.value.message
    assert "\n" not in e.value.message
    if text:
        assert text not in e.value.message


def test_load_should_refuse_a_missing_file_with_one_line(tmp_path):
    path = str(tmp_path / "absent.key")
    with pytest.raises(ConfigError) as e:
        PoolKey.load(path)
    assert e.value.message.startswith("cannot read the pool key %s: " % path)
    assert "\n" not in e.value.message


def test_a_key_should_be_32_bytes():
    for wrong in (b"", os.urandom(16), os.urandom(33)):
        with pytest.raises(ValueError):
            PoolKey(wrong)


def test_generate_should_make_keys_that_load_and_differ(tmp_path):
    a, b = PoolKey.generate(), PoolKey.generate()
    assert a != b and len(base64.b64decode(a)) == 32
    PoolKey.load(key_file(tmp_path, a))


def test_the_api_token_should_be_stable_per_key_and_differ_between_keys():
    raw = os.urandom(32)
    token = PoolKey(raw).api_token()
    assert token == PoolKey(raw).api_token()
    assert len(token) == 64 and int(token, 16) >= 0
    assert token != PoolKey(os.urandom(32)).api_token()
    assert raw.hex() not in token
