"""Authentication: scrypt user files, token files, and a real TLS listener on 127.0.0.1 that refuses
every request without valid credentials (401) while the unix socket needs none."""

import asyncio
import base64
import json
import os
import ssl
import stat
import subprocess
import urllib.error
import urllib.request

import pytest

from hostbridge import auth
from hostbridge.apiclient import ApiError, Client
from hostbridge.errors import Busy, RateLimited, Unauthorized
from tests.hostbridge.fakes import FakeBridge, ServedApp, api_config, make_tls_cert
from tests.support.processes import script

TOKEN = "tok-0123456789abcdef0123456789"
VMMESSAGE = script("vmmessage")
OVM_VMMESSAGE = script("ovm_vmmessage")


def test_it_should_verify_the_right_password_and_refuse_a_wrong_one():
    encoded = auth.hash_password("correct horse")
    assert encoded.startswith("scrypt$16384$8$1$")
    assert auth.verify_password("correct horse", encoded)
    assert not auth.verify_password("correct horsE", encoded)


def test_it_should_salt_each_hash():
    assert auth.hash_password("pw") != auth.hash_password("pw")


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "scrypt$1$2",
        "bcrypt$16384$8$1$AAAA$AAAA",
        "scrypt$x$8$1$AAAA$AAAA",
        "scrypt$16384$8$1$not-base64!$AAAA",
    ],
)
def test_it_should_treat_a_malformed_entry_as_no_match(encoded):
    assert auth.verify_password("pw", encoded) is False


def test_it_should_add_and_replace_users_in_a_0600_file(tmp_path):
    path = str(tmp_path / "users")
    assert auth.add_user(path, "admin", "one") is True
    assert auth.add_user(path, "ops", "two") is True
    assert auth.add_user(path, "admin", "three") is False
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = open(path).read().splitlines()
    assert [line.split(":")[0] for line in lines] == ["admin", "ops"]
    assert "three" not in open(path).read()
    admin = dict(line.split(":", 1) for line in lines)["admin"]
    assert auth.verify_password("three", admin) and not auth.verify_password("one", admin)


@pytest.mark.parametrize("user", ["", "a:b", "with space", "tab\tx"])
def test_it_should_refuse_bad_user_names(tmp_path, user):
    with pytest.raises(ValueError):
        auth.add_user(str(tmp_path / "users"), user, "pw")


def test_it_should_append_named_tokens_to_a_0600_file_that_the_authenticator_accepts(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# ops tokens\nold:%s" % TOKEN)  # no final newline
    path.chmod(0o644)
    first = auth.add_token(str(path), "ci")
    second = auth.add_token(str(path), "deploy")
    assert first != second and len(first) >= 32
    assert path.read_text() == "# ops tokens\nold:%s\nci:%s\ndeploy:%s\n" % (TOKEN, first, second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    authenticator = auth.Authenticator(str(path))
    assert authenticate(authenticator, "Bearer " + second) == auth.Principal("token", "deploy")
    assert authenticate(authenticator, "Bearer " + TOKEN) == auth.Principal("token", "old")


def test_it_should_create_a_missing_tokens_file_with_mode_0600(tmp_path):
    path = tmp_path / "tokens"
    old = os.umask(0)
    try:
        token = auth.add_token(str(path), "ci")
    finally:
        os.umask(old)
    assert path.read_text() == "ci:%s\n" % token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "a:b", "with space", "tab\tx", "#comment", "bell\x07"])
def test_it_should_refuse_bad_token_names_and_write_nothing(tmp_path, name):
    with pytest.raises(ValueError, match="token name"):
        auth.add_token(str(tmp_path / "tokens"), name)
    assert not (tmp_path / "tokens").exists()


def authenticate(authenticator, header):
    return asyncio.run(authenticator.authenticate(header))


def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


@pytest.fixture
def authenticator(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nci:%s\nshort\n" % TOKEN)
    users = tmp_path / "users"
    auth.add_user(str(users), "admin", "pw-admin")
    return auth.Authenticator(str(tokens), str(users))


def test_it_should_accept_a_listed_token_and_name_its_owner(authenticator):
    assert authenticate(authenticator, "Bearer " + TOKEN) == auth.Principal("token", "ci")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer nope",
        "Bearer short",
        "Bearer " + TOKEN[:-1],
        "Token " + TOKEN,
        "Basic !!!",
        basic("admin", "wrong"),
        basic("ghost", "pw-admin"),
        "Basic " + base64.b64encode(b"no-colon").decode(),
    ],
)
def test_it_should_refuse_missing_or_bad_credentials(authenticator, header):
    with pytest.raises(Unauthorized) as e:
        authenticate(authenticator, header)
    assert TOKEN not in e.value.message and "pw-admin" not in e.value.message


def test_it_should_accept_a_listed_user_with_the_right_password(authenticator):
    assert authenticate(authenticator, basic("admin", "pw-admin")) == auth.Principal(
        "user", "admin"
    )
    # again: served from the short-lived cache of verified pairs, same answer
    assert authenticate(authenticator, basic("admin", "pw-admin")) == auth.Principal(
        "user", "admin"
    )


def test_it_should_see_a_revoked_token_and_a_new_user_without_restart(authenticator, tmp_path):
    (tmp_path / "tokens").write_text("")
    with pytest.raises(Unauthorized):
        authenticate(authenticator, "Bearer " + TOKEN)
    auth.add_user(str(tmp_path / "users"), "newbie", "pw-new")
    assert authenticate(authenticator, basic("newbie", "pw-new")).name == "newbie"


POOL_TOKEN = "pool-0123456789abcdef0123456789"


def test_the_pool_token_should_authenticate_while_the_tokens_file_cannot_be_read(tmp_path):
    # The tokens file's path runs through a regular file: every stat() of it fails (ENOTDIR),
    # as for a file an operator broke. The pool keeps forwarding: its token is compared first,
    # and alone when it matches; every other token still needs the file.
    (tmp_path / "plain").write_text("")
    authenticator = auth.Authenticator(
        str(tmp_path / "plain" / "tokens"), None, pool_token=POOL_TOKEN
    )
    assert authenticate(authenticator, "Bearer " + POOL_TOKEN) == auth.Principal("token", "pool")
    assert authenticator.check_bearer("Bearer " + POOL_TOKEN) == auth.Principal("token", "pool")
    with pytest.raises(auth.CredentialFileError):
        authenticate(authenticator, "Bearer " + TOKEN)


def test_check_bearer_should_answer_only_a_valid_token_and_leave_the_rest_to_authenticate(
    tmp_path,
):
    tokens = tmp_path / "tokens"
    tokens.write_text("ci:%s\n" % TOKEN)
    authenticator = auth.Authenticator(str(tokens), None, pool_token=POOL_TOKEN)
    assert authenticator.check_bearer(" bearer  %s " % TOKEN) == auth.Principal("token", "ci")
    assert authenticator.check_bearer("Bearer " + POOL_TOKEN) == auth.Principal("token", "pool")
    for header in (None, "", "Bearer", "Bearer nope", basic("admin", "pw"), "Token " + TOKEN):
        assert authenticator.check_bearer(header) is None
    # Its None costs nothing at the failure table: authenticate() counts the failure.
    assert authenticator.failures.retry_after("192.0.2.1") == 0
    for _ in range(auth.AUTH_FAILURES_BURST):
        with pytest.raises(Unauthorized):
            asyncio.run(authenticator.authenticate("Bearer nope", "192.0.2.1"))
    assert authenticator.failures.retry_after("192.0.2.1") > 0
    # A valid token from that address still passes, as before (a token cannot be guessed).
    assert authenticator.check_bearer("Bearer " + TOKEN) == auth.Principal("token", "ci")


# ---- a real TLS listener on 127.0.0.1 ----


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = make_tls_cert(d)
    tokens = d / "tokens"
    tokens.write_text("ci:%s\n" % TOKEN)
    users = d / "users"
    auth.add_user(str(users), "admin", "pw-admin")
    return {"cert": cert, "key": key, "tokens": str(tokens), "users": str(users)}


@pytest.fixture
def tls_served(short_dir, tls_files):
    cfg = api_config(
        short_dir,
        api_tcp=("127.0.0.1", 0),
        tls_cert=tls_files["cert"],
        tls_key=tls_files["key"],
        tokens_file=tls_files["tokens"],
        users_file=tls_files["users"],
    )
    bridge = FakeBridge(["vm1"])
    bridge.fake("vm1").keys["newkey"] = ("newvalue", 0.0, "guest")
    with ServedApp(bridge, cfg) as s:
        yield s


def https_get(port, path, cafile, headers=None):
    ctx = ssl.create_default_context(cafile=cafile)
    req = urllib.request.Request("https://127.0.0.1:%d%s" % (port, path), headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


@pytest.mark.parametrize(
    "path",
    [
        "/v1/health",
        "/v1/vms",
        "/v1/vms/vm1",
        "/v1/vms/vm1/keys/newkey",
        "/openapi.json",
        "/v1/nothing",
    ],
)
def test_it_should_answer_401_on_tcp_without_credentials(tls_served, tls_files, path):
    status, doc, headers = https_get(tls_served.tcp_port, path, tls_files["cert"])
    assert status == 401
    assert doc["error"]["code"] == "unauthorized"
    assert "Bearer" in headers["WWW-Authenticate"]


def test_it_should_answer_on_tcp_with_a_token_or_a_user_and_password(tls_served, tls_files):
    port, ca = tls_served.tcp_port, tls_files["cert"]
    assert https_get(port, "/v1/vms/vm1", ca, {"Authorization": "Bearer " + TOKEN})[0] == 200
    assert (
        https_get(port, "/v1/vms/vm1", ca, {"Authorization": basic("admin", "pw-admin")})[0] == 200
    )
    assert https_get(port, "/v1/vms/vm1", ca, {"Authorization": basic("admin", "nope")})[0] == 401
    assert https_get(port, "/v1/vms/vm1", ca, {"Authorization": "Bearer " + "x" * 30})[0] == 401


def test_it_should_need_no_credentials_on_the_unix_socket_of_the_same_server(tls_served):
    assert Client(tls_served.unix_path).vm("vm1")["name"] == "vm1"


def test_it_should_work_with_the_lean_client_over_https(tls_served, tls_files):
    url = "https://127.0.0.1:%d" % tls_served.tcp_port
    assert (
        Client(url, token=TOKEN, cacert=tls_files["cert"]).query("vm1", "newkey")["value"]
        == "newvalue"
    )
    assert (
        Client(url, user="admin", password="pw-admin", cacert=tls_files["cert"]).vm("vm1")["name"]
        == "vm1"
    )
    with pytest.raises(ApiError) as e:
        Client(url, cacert=tls_files["cert"]).vm("vm1")
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_it_should_refuse_a_certificate_it_cannot_verify(tls_served):
    with pytest.raises(ApiError) as e:
        Client("https://127.0.0.1:%d" % tls_served.tcp_port, token=TOKEN).vm("vm1")
    assert e.value.code == "unreachable"
    assert "TLS" in e.value.message


def run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMMESSAGE_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, **kw)


def test_it_should_let_vmmessage_use_https_with_token_or_user_and_exit_6_without(
    tls_served, tls_files
):
    url = "https://127.0.0.1:%d" % tls_served.tcp_port
    common = ["--bridge", url, "--cacert", tls_files["cert"]]
    r = run([VMMESSAGE, "query", "vm1", "newkey", *common, "--token", TOKEN])
    assert (r.returncode, r.stdout.splitlines()[0]) == (
        0,
        "Query for Key : 'newkey' returned value 'newvalue'.",
    )
    r = run([VMMESSAGE, *common, "-u", "admin", "-p", "pw-admin", "send", "vm1", "k", "v"])
    assert (r.returncode, r.stdout) == (0, "Message sent successfully.\n")
    r = run([VMMESSAGE, "status", "vm1", *common])
    assert r.returncode == 6
    assert (
        r.stderr.startswith("vmmessage: error: authentication required")
        and r.stderr.count("\n") == 1
    )
    r = run([VMMESSAGE, "status", "vm1", *common, "-u", "admin", "-p", "bad"])
    assert r.returncode == 6


def test_it_should_let_ovm_vmmessage_authenticate_with_u_and_p_to_a_remote_bridge(
    tls_served, tls_files
):
    def query_as_admin(password):
        host = "127.0.0.1:%d" % tls_served.tcp_port
        args = ["-u", "admin", "-p", password, "-h", host, "-v", "vm1", "-q", "newkey"]
        return run([OVM_VMMESSAGE, *args, "--cacert", tls_files["cert"]])

    r = query_as_admin("pw-admin")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:6] == [
        "Oracle VM VM Message utility 0.5.2.",
        "Connected.",
        "VM : 'vm1' has status :  Running.",
        "Querying for key 'newkey'.",
        "Query successful.",
        "Query for Key : 'newkey' returned value 'newvalue'.",
    ]
    r = query_as_admin("wrong")
    assert r.returncode == 6
    assert r.stdout == "Oracle VM VM Message utility 0.5.2.\n"


# ---- what wrong credentials may cost ----


def test_the_failure_allowance_should_empty_after_the_burst_and_refill_with_time():
    now = [0.0]
    limiter = auth.FailureLimiter(burst=3, per_s=0.5, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == pytest.approx(2.0)
    assert limiter.retry_after("10.0.0.2") == 0  # per address
    now[0] = 2.0
    assert limiter.retry_after("10.0.0.1") == 0


def test_the_failure_table_should_stay_bounded_whatever_the_number_of_addresses():
    limiter = auth.FailureLimiter(burst=2, per_s=0.001, max_sources=100, clock=lambda: 0.0)
    for i in range(1000):
        limiter.failed("10.0.%d.%d" % (i // 256, i % 256))
    assert len(limiter._buckets) <= 100
    limiter.failed("10.0.3.231")  # the newest address is still remembered: its second failure
    assert limiter.retry_after("10.0.3.231") > 0  # empties its allowance of 2


def test_an_address_past_its_failures_should_be_refused_without_scrypt_even_the_right_password(
    authenticator,
):
    async def main():
        for _ in range(auth.AUTH_FAILURES_BURST):
            with pytest.raises(Unauthorized):
                await authenticator.authenticate(basic("admin", "wrong"), "192.0.2.7")
        checks = authenticator.scrypt_checks
        with pytest.raises(Unauthorized):  # a wrong token costs nothing: refused as such
            await authenticator.authenticate("Bearer " + "x" * 30, "192.0.2.7")
        for header in (basic("admin", "wrong"), basic("admin", "pw-admin")):
            with pytest.raises(RateLimited) as e:
                await authenticator.authenticate(header, "192.0.2.7")
            assert e.value.retry_after > 0 and "pw-admin" not in e.value.message
        assert authenticator.scrypt_checks == checks
        # a token is cheap to check and cannot be guessed: it still works from there
        principal = await authenticator.authenticate("Bearer " + TOKEN, "192.0.2.7")
        assert principal.name == "ci"
        # another address is not affected
        principal = await authenticator.authenticate(basic("admin", "pw-admin"), "192.0.2.8")
        assert principal.name == "admin"

    asyncio.run(main())


def test_password_checks_past_the_queue_bound_should_be_refused_busy(authenticator):
    async def main():
        attempts = [
            authenticator.authenticate(basic("admin", "wrong-%d" % i))
            for i in range(auth.AUTH_PENDING_MAX + 4)
        ]
        return await asyncio.gather(*attempts, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert sum(isinstance(o, Busy) for o in outcomes) == 4
    assert sum(isinstance(o, Unauthorized) for o in outcomes) == auth.AUTH_PENDING_MAX
    assert authenticator.scrypt_checks == auth.AUTH_PENDING_MAX


def test_a_verified_password_should_cost_one_scrypt_until_the_users_file_changes(
    authenticator, tmp_path
):
    async def main():
        for _ in range(5):
            await authenticator.authenticate(basic("admin", "pw-admin"), "192.0.2.9")
        assert authenticator.scrypt_checks == 1
        auth.add_user(str(tmp_path / "users"), "admin", "pw-changed")
        with pytest.raises(Unauthorized):
            await authenticator.authenticate(basic("admin", "pw-admin"), "192.0.2.9")

    asyncio.run(main())


def test_over_tls_a_flood_of_wrong_passwords_should_get_429_with_retry_after(tls_served, tls_files):
    port, ca = tls_served.tcp_port, tls_files["cert"]
    wrong = {"Authorization": basic("admin", "nope")}
    statuses = [
        https_get(port, "/v1/vms/vm1", ca, wrong)[0] for _ in range(auth.AUTH_FAILURES_BURST)
    ]
    assert statuses == [401] * auth.AUTH_FAILURES_BURST
    status, doc, headers = https_get(port, "/v1/vms/vm1", ca, wrong)
    assert status == 429 and doc["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    # the unix socket is never limited
    assert Client(tls_served.unix_path).vm("vm1")["name"] == "vm1"
    url = "https://127.0.0.1:%d" % port
    common = ["--bridge", url, "--cacert", ca]
    r = run([VMMESSAGE, "status", "vm1", *common, "-u", "admin", "-p", "pw-admin"])
    assert r.returncode == 6
    assert r.stderr.startswith("vmmessage: error: too many failed authentications")
    assert r.stderr.count("\n") == 1
    r = run([VMMESSAGE, "status", "vm1", *common, "--token", TOKEN])
    assert r.returncode == 0, r.stderr
