#!/usr/bin/env bash
# The main job, on a fresh Debian machine as root: installs what it needs, then runs the demos.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
echo "######## 1. A host bridge and two guest agents, driven with vmmessage and ovmd ########"
.venv/bin/python scripts/demo_bridge.py
echo
echo "######## 2. The wire protocol up close: one guest agent and a host peer on a pty ########"
.venv/bin/python scripts/demo_guest.py
