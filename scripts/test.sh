#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
