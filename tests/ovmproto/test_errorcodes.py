"""ovmproto.errorcodes: one row per code, every code our errors carry has one, and the CLIs' fast
paths can import it for free."""

import subprocess
import sys

import pytest

from ovmproto import errorcodes, errors, limits


def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def test_every_row_should_hold_an_http_status_two_exit_statuses_and_a_meaning():
    for code, (http, vmmessage, ovmd, meaning) in errorcodes.CODES.items():
        assert http is None or 400 <= http <= 599, code
        assert vmmessage is None or 1 <= vmmessage <= 7, code
        assert ovmd is None or 1 <= ovmd <= 4, code
        assert meaning and "\n" not in meaning, code


def test_every_code_the_protocol_errors_carry_should_be_in_the_table():
    carried = {cls.code for cls in subclasses(errors.OvmError)} | {errors.OvmError.code}
    carried.add("unknown_type")  # BadMessage's code for a "t" the receiver does not know
    assert carried <= set(errorcodes.CODES), carried - set(errorcodes.CODES)


@pytest.mark.parametrize(
    "code", [limits.KEY_TOO_LONG, limits.VALUE_TOO_LONG, limits.INVALID_KEY, limits.INVALID_VALUE]
)
def test_a_broken_limit_should_be_bad_input_everywhere(code):
    assert errorcodes.vmmessage_exit(code) == errorcodes.vmmessage_exit("usage")
    assert errorcodes.ovmd_exit(code) == errorcodes.ovmd_exit("usage")
    assert errorcodes.http_status(code) in (400, 413)


def test_an_unknown_code_should_be_reported_like_internal():
    assert errorcodes.vmmessage_exit("from_a_newer_peer") == errorcodes.vmmessage_exit("internal")
    assert errorcodes.ovmd_exit("from_a_newer_peer") == errorcodes.ovmd_exit("internal")
    assert errorcodes.http_status("from_a_newer_peer") == errorcodes.http_status("internal")


def test_a_guest_only_code_should_have_no_http_status_of_its_own():
    # The bridge answers a guest's err as 409 (hostbridge.errors.GuestError), not by its code.
    for code in ("quota", "denied", "timeout", "bad_frame", "unsupported_version"):
        assert code not in errorcodes.HTTP_STATUS
        assert errorcodes.http_status(code, 409) == 409


def test_importing_it_should_import_nothing_else():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import ovmproto.errorcodes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    names = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if "|" in line]
    after_startup = names[names.index("site") + 1 :] if "site" in names else names
    assert after_startup == ["ovmproto", "ovmproto.errorcodes"]
