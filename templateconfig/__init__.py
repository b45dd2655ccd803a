"""Template configuration: a VM configures itself from the host's messages (`ovm-template-config`).

A re-implementation of Oracle VM's first-boot template configuration for the KVM agent. The master
command (`ovm-template-config`, master.py) runs, for one target, every module enabled for it in
priority order; modules are executables in /etc/template.d/scripts with a plugin header
(plugins.py) and are enabled per target by `ovm-chkconfig` (chkconfig.py). Modules written for the
original import `templateconfig.cli.main` and `templateconfig.common.run_cmd`: both are here.
docs/template-config.md is the user's documentation.

Layers (tests/test_layering.py): this package may import guestagent's client (first boot talks to
the agent); the agent never imports this package (`ovmd -s` runs the master as a program).
"""

from __future__ import annotations

# The keys of the host's request and of the guest's report: named once for both sides.
from ovmproto.templatekeys import (  # noqa: F401 (named here for modules and tests)
    ERROR_KEY,
    MODULE_KEY_PREFIX,
    REPORT_PREFIX,
    REQUEST_KEY,
    ROOT_PASSWORD_KEY,
    RUN_KEY,
    STATE_KEY,
)

VERSION = "0.1.0"

# The targets of the original, in its order.
TARGETS = (
    "configure",
    "unconfigure",
    "reconfigure",
    "cleanup",
    "suspend",
    "resume",
    "migrate",
    "shutdown",
)

TEMPLATE_DIR = "/etc/template.d"
SCRIPTS_DIR = TEMPLATE_DIR + "/scripts"
LOG_FILE = "/var/log/ovm-template-config.log"
# The first boot's settings file: the original's path on every distribution, as users' sealing
# scripts write INITIAL_CONFIG=yes there.
SETTINGS_FILE = "/etc/sysconfig/ovm-template-initial-config"

# What a module may take before it is killed (seconds); the run goes on with the next module.
MODULE_TIMEOUT = 300.0
