#!/usr/bin/env bash
# The main job, on a fresh Debian machine as root: installs what it needs, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
echo "== ovmd guest agent on a real pty, answering a host peer =="
.venv/bin/python scripts/demo_guest.py
