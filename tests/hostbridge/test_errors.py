"""hostbridge.errors: an error's HTTP status comes from ovmproto.errorcodes, by its class's code."""

import importlib

import pytest

from hostbridge import errors
from ovmproto import errorcodes

# Every hostbridge module that defines a BridgeError.
MODULES = ("hostbridge.errors", "hostbridge.api", "hostbridge.channels", "hostbridge.config")


def bridge_errors():
    for name in MODULES:
        importlib.import_module(name)
    found, todo = [], [errors.BridgeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_bridge_error_class_should_have_a_code_with_an_http_status():
    for cls in bridge_errors():
        if "http_status" in vars(cls) and not isinstance(vars(cls)["http_status"], property):
            continue  # it says its own status (a guest's varying code)
        assert cls.code in errorcodes.HTTP_STATUS, cls
        assert cls("x").http_status == errorcodes.HTTP_STATUS[cls.code], cls


@pytest.mark.parametrize(
    "code, status",
    [
        ("key_too_long", 413),
        ("value_too_long", 413),
        ("invalid_key", 400),
        ("invalid_value", 400),
        ("bad_request", 400),
    ],
)
def test_invalid_input_should_answer_the_status_of_the_limit_it_names(code, status):
    assert errors.InvalidInput("too long", code).http_status == status
    assert errors.InvalidInput("bad").http_status == 400


def test_a_guest_code_passed_on_should_not_change_the_bridges_own_status():
    # A guest's malformed reply ("bad_request") is the bridge's failure to serve, not the client's.
    assert errors.BridgeError("the guest sent a malformed reply", "bad_request").http_status == 500
    assert errors.NotFound("guest: no such key", "not_found").http_status == 404


def test_a_class_that_declares_its_status_should_keep_it_whatever_the_code():
    class FromTheGuest(errors.BridgeError):
        http_status = 409

    for code in ("quota", "busy", "key_too_long"):
        exc = FromTheGuest("guest: refused", code)
        assert (exc.code, exc.http_status) == (code, 409)
