#!/usr/bin/env bash
# Installs everything the demo and the test suite need, on a fresh Debian machine, as root.
# Idempotent: a second run only checks. Used by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: scripts/packages-base.txt always, scripts/packages-test.txt with --test.
lists=(scripts/packages-base.txt)
[ "${1:-}" = "--test" ] && lists+=(scripts/packages-test.txt)
mapfile -t APT_PACKAGES < <(cat "${lists[@]}" | sed 's/#.*//' | tr -s ' \t' '\n' | grep -v '^$')
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The project's interpreter: python3 on PATH (3.11+ for development). The venv records the real
# interpreter behind any shim, which is what the tests and benchmarks run.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($PY --version 2>&1)"
    $PY -m venv .venv || { echo "bootstrap: python3 -m venv failed: apt-get install python3-venv" >&2; exit 1; }
fi
# The stamp covers this script too: a change to how the project is installed reinstalls it.
stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "bootstrap: installing the project and its development dependencies into .venv"
    # editable_mode=compat: the checkout goes on sys.path as a plain .pth entry. The default
    # (an import-hook finder) makes every start of the interpreter pay ~17 ms in `site` (it
    # imports pathlib, fnmatch, re), which is every `ovmd -g` and `vmmessage` run from the
    # checkout, half an interpreter's start again.
    log=.venv/bootstrap-pip.log
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e '.[dev]' \
               --config-settings editable_mode=compat; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: pip failed (log above, also in $log)" >&2
        exit 1
    fi
    rm -f .venv/.installed-*
    touch "$stamp"
fi

# Byte-compile the checkout's packages (quick when nothing changed). Where PYTHONDONTWRITEBYTECODE
# is set, as on some shared machines, nothing else writes their .pyc files, and every `ovmd` or
# `vmmessage` run from the checkout would compile its modules from source again: ~15 ms a start.
.venv/bin/python -m compileall -q ovmproto ovmsys guestagent templateconfig hostbridge >/dev/null
