"""The bridge daemon with libvirt's lifecycle events played by the test (simlifecycle):

    python -m tests.support.sim_bridge --events SOCK [hostbridge.daemon's arguments...]

It is hostbridge.daemon, unchanged, except that Bridge.lifecycle_factory makes a SimLifecycle on
SOCK instead of connecting to libvirtd: so a test runs several "hypervisors" on one machine, each a
real bridge process (its API, its discovery, its database connections, kill -9 and all), and plays
each host's lifecycle events with tests.support.simlifecycle.send_event. The configuration must
make the bridge follow run states (libvirt_uri = "sim", or discovery on).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sim_bridge",
        description="hostbridge with lifecycle events played through a socket",
        add_help=False,  # --help and every other argument are the daemon's
        allow_abbrev=False,
    )
    parser.add_argument("--events", required=True, metavar="SOCK", help="the events' unix socket")
    args, rest = parser.parse_known_args(argv)

    # Imported once the arguments are known, as hostbridge.daemon does with the bridge.
    from hostbridge import daemon
    from hostbridge.bridge import Bridge
    from tests.support.simlifecycle import factory

    Bridge.lifecycle_factory = factory(args.events)
    try:
        import libvirt
    except ImportError:
        pass
    else:
        # As hostbridge.lifecycle does once it runs: libvirt reports errors as exceptions, and
        # would print each one on stderr too (discovery asks it for names under the URI "sim").
        libvirt.registerErrorHandler(lambda _opaque, _error: None, None)
    return daemon.main(rest)


if __name__ == "__main__":
    sys.exit(main())
