"""The `hostbridge` daemon: parse flags, build the Bridge and the API, serve until SIGTERM/SIGINT.

hostbridge [--config FILE] [--vm NAME=unix:PATH]... [--vm NAME=pty:PATH]...
           [--discover|--no-discover] [--libvirt-dir DIR]... [--db PATH]
           [--api-socket PATH] [--api-tcp HOST:PORT --tls-cert F --tls-key F]
           [--tokens-file F] [--users-file F] [--metrics-listen HOST:PORT] [-d LEVEL]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import signal
import sys
from typing import TYPE_CHECKING

from ovmproto.errors import OvmError
from ovmsys.notify import Notifier, watchdog_interval

from .config import Config, ConfigError, load_file, parse_hostport, parse_vm_flag
from .errors import BridgeError

if TYPE_CHECKING:
    from .bridge import Bridge
    from .metrics import BridgeMetrics

log = logging.getLogger("hostbridge")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hostbridge", description="Relay messages between managers and ovmd guest agents."
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="NAME=unix:PATH|NAME=pty:PATH",
        help="a VM and its channel (repeatable)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--discover",
        dest="discover",
        action="store_true",
        default=None,
        help="find libvirt guests' channels (default when no VM is given)",
    )
    g.add_argument("--no-discover", dest="discover", action="store_false")
    p.add_argument(
        "--libvirt-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="a libvirt channel directory to scan (repeatable)",
    )
    p.add_argument("--db", metavar="PATH", help="the state database")
    p.add_argument("--api-socket", metavar="PATH", help="the API's unix socket ('' for none)")
    p.add_argument("--api-tcp", metavar="HOST:PORT", help="also serve the API on TCP, with TLS")
    p.add_argument("--tls-cert", metavar="FILE")
    p.add_argument("--tls-key", metavar="FILE")
    p.add_argument("--tokens-file", metavar="FILE")
    p.add_argument("--users-file", metavar="FILE")
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve /metrics alone there, without authentication (loopback or management)",
    )
    p.add_argument(
        "-d",
        "--debug",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="0 warnings, 1 info (default), 2 debug, 3 debug with asyncio's",
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    config = load_file(args.config) if args.config else Config()
    for text in args.vm:
        config.vms.append(parse_vm_flag(text))
    if args.discover is not None:
        config.discover = args.discover
    if args.libvirt_dir:
        config.libvirt_dirs = list(args.libvirt_dir)
    if args.db:
        config.db = args.db
    if args.api_socket is not None:
        config.api_socket = args.api_socket or None
    if args.api_tcp:
        config.api_tcp = parse_hostport(args.api_tcp)
    if args.metrics_listen:
        config.metrics_listen = parse_hostport(args.metrics_listen, any_port=True)
    for name in ("tls_cert", "tls_key", "tokens_file", "users_file", "debug"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.check()
    return config


def setup_logging(level: int) -> None:
    levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}
    logging.basicConfig(
        stream=sys.stderr,
        level=levels.get(level, logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if level < 3:
        logging.getLogger("asyncio").setLevel(logging.WARNING)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a loop that stalls stops pinging, and systemd
    restarts the bridge."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (each guest channel and API client needs a
    descriptor; the default soft limit is 1,024); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:  # EPERM under a seccomp filter: keep what we have
            log.info("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
    return soft


def _metrics(bridge: Bridge, config: Config) -> BridgeMetrics | None:
    """The bridge's metrics (hostbridge.metrics); None without prometheus_client, unless the
    configuration asks for their listener (BridgeError then: exit 1)."""
    try:
        from .metrics import BridgeMetrics
    except ImportError as e:
        if config.metrics_listen is not None:
            raise BridgeError("cannot serve metrics (metrics_listen): %s" % e) from None
        log.warning("metrics are unavailable (%s); /metrics answers 404", e)
        return None
    return BridgeMetrics(bridge)


async def serve(config: Config, stop: asyncio.Event | None = None) -> int:
    from .bridge import Bridge  # the heavy part: imported once flags are known to be good

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("open files limit: %d", raise_open_files_limit())
    bridge = Bridge(config)
    metrics = _metrics(bridge, config)  # before start(): it counts what start-up delivers
    await bridge.start()
    server = metrics_server = None
    notifier = Notifier()
    try:
        try:
            from . import api
        except ImportError as e:
            log.warning("the HTTP API is unavailable (%s); running the bridge without it", e)
        else:
            app = api.make_app(bridge, config, metrics)
            server = await api.start(app, config, lambda: bridge.guest_count)
        if metrics is not None and config.metrics_listen is not None:
            metrics_server = await metrics.serve(*config.metrics_listen)
        # What start-up made (modules, the app, each guest's parts) lives as long as the process;
        # frozen, the collector's full passes skip it. Unfrozen, a full pass over the heap of a
        # bridge with 1,000 guests (~60 MB) stopped the loop for 55-80 ms, the worst of the
        # query latency at 64 connections (bench/bridge.py).
        gc.collect()
        gc.freeze()
        notifier.ready()
        log.info("ready")
        watchdog = None
        interval = watchdog_interval()
        if interval:
            watchdog = loop.create_task(_watchdog(notifier, interval), name="watchdog")
        await stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        notifier.stopping()
        log.info("stopping")
    finally:
        bridge.events.close()  # open event streams end now, and the server need not wait
        if server is not None:
            await server.close()
        if metrics_server is not None:
            await metrics_server.close()
        await bridge.stop()
        notifier.close()
    return EXIT_OK


def run(config: Config) -> int:
    try:
        return asyncio.run(serve(config))
    except OvmError as e:
        log.error("%s", e.message)
        return EXIT_FAILURE
    except OSError as e:
        log.error("%s", e)
        return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print("hostbridge: %s" % e.message, file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.debug)
    for warning in config.warnings:
        log.warning("%s", warning)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
