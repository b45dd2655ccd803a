"""Modules authentication and user, with the real chpasswd and useradd working on a system tree
(-R): the password verifies against the hash written to its shadow file; keys and refusals."""

import subprocess

import pytest

from templateconfig.builtin import authentication, user
from templateconfig.builtin.base import System
from templateconfig.builtin.passwords import hash_password
from templateconfig.common import TemplateError
from tests.templateconfig.support import system_root, verifies

U = "com.oracle.linux.user."


def shadow_hash(root, name):
    for line in (root / "etc/shadow").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")[1]
    raise AssertionError("no %s in shadow" % name)


def ed25519(tmp_path, name="k"):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@example",
                    "-f", str(tmp_path / name)], check=True)  # fmt: skip
    return (tmp_path / (name + ".pub")).read_text().strip()


def test_a_plain_root_password_should_verify_against_the_new_shadow_hash(tmp_path):
    root = system_root(tmp_path)
    pairs = {"com.oracle.linux.root-password": "s3cret pass:with colon"}
    authentication.MODULE.run("configure", pairs, System(str(root)))
    h = shadow_hash(root, "root")
    assert h.startswith("$6$") and verifies("s3cret pass:with colon", h)
    assert not verifies("wrong", h)


def test_a_crypt_hash_should_be_written_as_it_is(tmp_path):
    root = system_root(tmp_path)
    h = hash_password("from the manager")
    authentication.MODULE.run(
        "configure", {"com.oracle.linux.root-password": "{crypt}" + h}, System(str(root))
    )
    assert shadow_hash(root, "root") == h


@pytest.mark.parametrize("value", ["{crypt}$1$abc$def", "{crypt}$6$salt$short", "{CRYPT}plain"])
def test_a_hash_in_an_unknown_format_should_be_refused_and_shadow_left_alone(tmp_path, value):
    root = system_root(tmp_path)
    with pytest.raises(
        TemplateError, match=r"^com\.oracle\.linux\.root-password: a \{crypt\} hash"
    ):
        authentication.MODULE.run(
            "configure", {"com.oracle.linux.root-password": value}, System(str(root))
        )
    assert shadow_hash(root, "root") == "*"


def test_no_password_sent_should_leave_root_as_it_is(tmp_path):
    root = system_root(tmp_path)
    authentication.MODULE.run("configure", {}, System(str(root)))
    assert shadow_hash(root, "root") == "*"


def test_a_user_should_be_created_with_groups_password_and_its_authorized_keys(tmp_path):
    root = system_root(tmp_path)
    key1, key2 = ed25519(tmp_path, "a"), ed25519(tmp_path, "b")
    pairs = {
        U + "name.0": "alice",
        U + "uid.0": "1500",
        U + "groups.0": "sudo",
        U + "password.0": "alice pw",
        U + "ssh-authorized-keys.0": "%s\n\n# a comment\n%s\n" % (key1, key2),
    }
    user.MODULE.run("configure", pairs, System(str(root)))
    entry = [ln for ln in (root / "etc/passwd").read_text().splitlines() if ln.startswith("alice:")]
    assert entry and entry[0].split(":")[2] == "1500"
    assert "sudo:x:27:alice" in (root / "etc/group").read_text()
    h = shadow_hash(root, "alice")
    assert verifies("alice pw", h)
    keys = root / "home/alice/.ssh/authorized_keys"
    assert keys.read_text() == "%s\n%s\n" % (key1, key2)
    assert keys.stat().st_mode & 0o777 == 0o600 and keys.stat().st_uid == 1500
    assert (root / "home/alice/.ssh").stat().st_mode & 0o777 == 0o700


def test_an_existing_account_should_be_updated_not_recreated(tmp_path):
    root = system_root(tmp_path)
    key = ed25519(tmp_path)
    user.MODULE.run(
        "configure", {U + "name.0": "root", U + "ssh-authorized-keys.0": key}, System(str(root))
    )
    assert (root / "etc/passwd").read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    assert (root / "root/.ssh/authorized_keys").read_text() == key + "\n"


@pytest.mark.parametrize(
    "pairs, message",
    [
        ({U + "name.0": "Bad Name"}, U + "name.0: not a user name"),
        ({U + "uid.0": "7"}, U + "name.0: required"),
        ({U + "name.0": "bob", U + "groups.0": "wheel"}, U + "groups.0: no group named wheel"),
        ({U + "name.0": "bob", U + "shell.0": "/bin/zsh"}, U + "shell.0: not a shell"),
        (
            {U + "name.0": "bob", U + "ssh-authorized-keys.0": "ssh-ed25519 AAAAnotakey x"},
            U + "ssh-authorized-keys.0: line 1: the key's data is not valid",
        ),
        (
            {U + "name.0": "bob", U + "ssh-authorized-keys.0": "hello world"},
            U + "ssh-authorized-keys.0: line 1 is not an ssh public key",
        ),
    ],
)
def test_bad_user_keys_should_be_refused_before_any_account_changes(tmp_path, pairs, message):
    root = system_root(tmp_path)
    before = (root / "etc/passwd").read_text()
    good = {U + "name.1": "carol"}  # a good account of another index is not created either
    with pytest.raises(TemplateError) as e:
        user.MODULE.run("configure", dict(pairs, **good), System(str(root)))
    assert str(e.value).startswith(message)
    assert (root / "etc/passwd").read_text() == before


def test_a_key_of_another_type_inside_should_be_refused(tmp_path):
    rsa_type_ed_blob = "ssh-rsa " + ed25519(tmp_path).split()[1]
    with pytest.raises(TemplateError, match="the key's data is not a ssh-rsa key"):
        user.MODULE.run(
            "configure",
            {U + "name.0": "bob", U + "ssh-authorized-keys.0": rsa_type_ed_blob},
            System(str(system_root(tmp_path))),
        )
