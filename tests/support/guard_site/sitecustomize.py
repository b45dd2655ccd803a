"""Installs the test guard in a Python child of the test suite (Python imports this module at
start-up when its directory is on PYTHONPATH; tests/support/guard.py puts it there for the session).

Nothing else happens here: a child started without $REALPATH_GUARD_LOG runs unguarded. Python
imports only the first sitecustomize on its path: this one hides any other (Debian's installs
apport's crash hook), which no test needs.
"""

import os

if os.environ.get("REALPATH_GUARD_LOG"):
    import realpath_guard

    realpath_guard.install(os.environ["REALPATH_GUARD_LOG"])
