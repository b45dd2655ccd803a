"""The keys template configuration passes between the host and the guest: the guest's first boot
reads the host's settings and reports in its own keys (docs/template-config.md). Both sides name
them from here, as they name the wire protocol's messages from this package."""

from __future__ import annotations

# Host -> guest: the original's settings, com.oracle.linux.*; the root password comes last.
ROOT_PASSWORD_KEY = "com.oracle.linux.root-password"
# Keys that hold a secret: sent unlogged and last by the host, deleted by the guest after use:
# the root password, and each account's (`.N`, the account's index).
USER_PASSWORD_PREFIX = "com.oracle.linux.user.password."
# Prefix marking a password value that is already a crypt(3) hash, as LDAP writes it.
CRYPT_PREFIX = "{crypt}"

# Guest -> host: the first boot's report; and the host's name for its request, echoed.
REPORT_PREFIX = "org.ovmd.template-config."
STATE_KEY = REPORT_PREFIX + "state"  # waiting, running, done, failed, timeout
ERROR_KEY = REPORT_PREFIX + "error"
RUN_KEY = REPORT_PREFIX + "run"
MODULE_KEY_PREFIX = REPORT_PREFIX + "module."
REQUEST_KEY = REPORT_PREFIX + "request"
FINAL_STATES = ("done", "failed", "timeout")


def is_secret(key: str) -> bool:
    return key == ROOT_PASSWORD_KEY or key.startswith(USER_PASSWORD_PREFIX)
