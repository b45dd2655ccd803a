#!/usr/bin/env bash
# Build the ovmd, hostbridge and hostbridge-cockpit RPMs (noarch) into OUTDIR:  packaging/build-rpm.sh OUTDIR
# Uses packaging/rpm/ovmd.spec. On a Debian build host (Debian's rpm package) there is no RPM
# database to satisfy BuildRequires (--nodeps), and by default the bridge is built for python3
# (3.11 here, as on Fedora); RPM_FLAVOUR=el9 keeps the spec's EL9 defaults (python3.11 and its
# python3.11-* modules for the bridge). On EL9 itself, plain `rpmbuild -bb` on the spec does.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

version=$(sed -n 's/^Version: *//p' "$root/packaging/rpm/ovmd.spec")
mkdir -p "$work"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} "$work/src/ovmd-$version"
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    ovmproto ovmsys guestagent templateconfig hostbridge systemd packaging/bin packaging/man \
    packaging/completion cockpit \
    packaging/rpm packaging/hostbridge.toml packaging/sysconfig packaging/serial_unit.py \
    packaging/debian/copyright \
    README.md docs |
    tar -C "$work/src/ovmd-$version" -xf -
tar -C "$work/src" -czf "$work/SOURCES/ovmd-$version.tar.gz" "ovmd-$version"
cp "$root/packaging/rpm/ovmd.spec" "$work/SPECS/"

defines=(--define "_topdir $work")
if [ -e /etc/debian_version ]; then
    defines+=(--nodeps)
    if [ "${RPM_FLAVOUR:-}" != el9 ]; then
        defines+=(--define "hostbridge_python /usr/bin/python3" --define "hostbridge_pyprefix python3")
    fi
fi
rpmbuild -bb "${defines[@]}" "$work/SPECS/ovmd.spec" >"$work/build.log" 2>&1 || {
    cat "$work/build.log" >&2
    echo "build-rpm.sh: rpmbuild failed" >&2
    exit 1
}
find "$work/RPMS" -name '*.rpm' -exec cp {} "$out"/ \;
ls "$out"/*.rpm
