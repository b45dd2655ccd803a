#!/usr/bin/env bash
# Build the ovmd, hostbridge and hostbridge-cockpit .debs into OUTDIR:  packaging/build-deb.sh OUTDIR
# Needs: debhelper dh-python python3 (scripts/packages-test.txt lists them). Builds from a clean copy
# of the project's files (no caches, no venv), with packaging/debian as its debian/ directory.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

src="$work/ovmd-0.1.0"
mkdir "$src"
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    ovmproto ovmsys guestagent templateconfig hostbridge systemd packaging/bin packaging/man \
    packaging/completion cockpit \
    packaging/hostbridge.toml packaging/sysconfig packaging/serial_unit.py \
    README.md docs |
    tar -C "$src" -xf -
cp -r "$root/packaging/debian" "$src/debian"
# Reproducible file dates: the changelog's.
export SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Timestamp)
(cd "$src" && dpkg-buildpackage -b -us -uc --no-sign) >"$work/build.log" 2>&1 || {
    cat "$work/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed" >&2
    exit 1
}
cp "$work"/*.deb "$out"/
ls "$out"/*.deb
