"""The daemon's wiring: load the cache, listen locally, open the channel, tell systemd, serve until
SIGTERM/SIGINT; SIGHUP reopens the channel.

    guestagent.daemon.run(guestagent.config.load(path, overrides)) -> exit code

``python -m guestagent.daemon [options]`` does the same as ``ovmd --daemon [options]``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from ovmproto import jsonlib
from ovmproto.errors import OvmError
from ovmsys import securedir
from ovmsys.notify import Notifier, watchdog_interval

from .factwatch import FactWatch
from .hostlink import DISCONNECTED, HostLink
from .localserver import LocalServer
from .logsetup import setup as setup_logging
from .loop import Loop
from .service import Service
from .store import CacheStore

TYPE_CHECKING = False  # mypy takes any TYPE_CHECKING as true; at run time nothing here is imported
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .config import Config

log = logging.getLogger(__name__)


def status_text(state: str, path: str) -> str:
    if state == DISCONNECTED:
        return "waiting for host on %s" % path
    return "host connected"


class UnsafeDirectoryError(OvmError):
    code = "internal"


def _secure_directory(what: str, path: str) -> str:
    """securedir.secure(path) (made when missing, checked, resolved); one-line OvmError when
    someone other than root or our uid could change it (docs/reliability.md)."""
    try:
        return securedir.secure(os.path.abspath(path))
    except securedir.UnsafeDirectory as e:
        raise UnsafeDirectoryError("%s %s" % (what, e.strerror)) from None


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()
        self.loop = Loop()
        self.service: Service | None = None
        self.server: LocalServer | None = None
        self.link: HostLink | None = None
        self.facts: FactWatch | None = None
        self._watchdog_interval: float | None = None

    def start(self) -> None:
        """Everything up to READY=1; raise OvmError or OSError (one line) when impossible."""
        config = self.config
        loop = self.loop
        # Handlers first: a SIGTERM that arrives while we start is kept until the loop runs.
        loop.add_signal(signal.SIGTERM, self._on_stop)
        loop.add_signal(signal.SIGINT, self._on_stop)
        loop.add_signal(signal.SIGHUP, self._on_hup)
        # Before anything is created: directories only root can change, used by their real path.
        state_dir = _secure_directory("state directory", config.state_dir)
        socket_dir = _secure_directory("socket directory", os.path.dirname(config.socket))
        store = CacheStore(state_dir, config.max_keys, config.max_events)
        self.service = Service(store)
        cache = self.service.cache
        log.info(
            "cache %s: %d keys, gid %s, gseq %d; JSON by %s",
            store.path,
            len(cache),
            cache.gid,
            cache.gseq,
            jsonlib.BACKEND,
        )
        self.server = LocalServer(
            self.loop,
            self.service,
            os.path.join(socket_dir, os.path.basename(config.socket)),
            config.group,
            max_clients=config.max_clients,
            max_clients_per_user=config.max_clients_per_user,
            reserved_root_clients=config.reserved_root_clients,
            request_timeout=config.request_timeout,
            idle_timeout=config.idle_timeout,
        )
        self.server.start()
        self.link = HostLink(loop, self.service, config.channel, on_state=self._on_state)
        self.link.start()
        # After the link: its listener is in place, so a host already there hears of the facts.
        self.facts = FactWatch(loop, self.service, enabled=config.facts)
        self.facts.start()
        self.notifier.ready(status_text(self.link.state, self.link.path))
        self._watchdog_interval = watchdog_interval()
        if self._watchdog_interval:
            self._watchdog()

    def _on_state(self, state: str, path: str) -> None:
        self.notifier.status(status_text(state, path))

    def _on_stop(self, signum: int) -> None:
        log.info("stopping on signal %d", signum)
        self.loop.stop()

    def _on_hup(self, signum: int) -> None:
        if self.link is not None:
            self.link.reopen()

    def _watchdog(self) -> None:
        self.notifier.watchdog()
        if self._watchdog_interval:  # always: start() calls this only then
            self.loop.call_later(self._watchdog_interval, self._watchdog)

    def serve(self) -> None:
        self.loop.run()

    def close(self) -> None:
        self.notifier.stopping()
        if self.server is not None:
            self.server.close()
        if self.facts is not None:
            self.facts.close()
        if self.link is not None:
            self.link.close()
        self.loop.close()
        self.notifier.close()


def run(config: Config) -> int:
    """Run the daemon until a stop signal; return the exit code (0 after a clean stop)."""
    setup_logging(config.debug)
    daemon = Daemon(config)
    try:
        try:
            daemon.start()
        except OvmError as e:
            log.error("cannot start: %s", e.message)
            return 1
        except OSError as e:
            log.error(
                "cannot start: %s%s", e.strerror or e, ": %s" % e.filename if e.filename else ""
            )
            return 1
        log.info("ovmd ready (pid %d)", os.getpid())
        daemon.serve()
    finally:
        daemon.close()
    log.info("ovmd stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m guestagent.daemon [options]`` is ``ovmd --daemon [options]``: one parser (the
    CLI's) for the daemon's options, so the two spellings cannot drift apart."""
    from .cli import main as cli_main

    return cli_main(["--daemon"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
