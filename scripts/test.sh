#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what it needs, checks the code
# (format, lint, types), then runs pytest. Arguments go to pytest (e.g. tests/hostbridge -x).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh --test
check() {
    echo "test.sh: $*"
    "$@" || { echo "test.sh: failed: $* (see CONTRIBUTING.md, 'Set up, check, test')" >&2; exit 1; }
}
check .venv/bin/ruff format --check --quiet .
check .venv/bin/ruff check --quiet .
check .venv/bin/mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
