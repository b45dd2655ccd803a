"""ovmsys: operating-system plumbing shared by the guest agent and the host bridge.

    notify        systemd's notify protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1)
    atomicfile    an atomic, fsync'd replacement of a file (never through a planted symlink)
    securedir     a directory only root (or our uid) can change, and those above it
    unixsocket    a listening unix stream socket: stale-socket probe, private bind, tidy close
    ratelimit     rate-limited logging of a warning that repeats

Standard library only, Python 3.9, no protocol and no policy: both daemons import it, and it
imports neither of them nor ovmproto. Keep this module free of imports.
"""
