"""The bridge's Prometheus metrics: what each VM's link and outbox are doing, read at scrape time.

    metrics = BridgeMetrics(bridge)             # before bridge.start(): it counts from the first
    body, content_type = await metrics.exposition(accept_header)
    server = await metrics.serve("127.0.0.1", 9477)   # a listener serving /metrics alone
    await server.close()

Most series are read from the bridge when scraped (the agents' states, the session counters, the
queues: one query for every VM's queue, however many VMs). What cannot be read afterwards is
counted as it happens, from the bridge's change stream (hostbridge.events): each message's
outcome, and how long each delivered message waited for the guest's acknowledgement.

Each bridge has its own registry: nothing goes to prometheus_client's global one, so a process
may hold many bridges (the tests do). A VM is labelled ``domain``, as libvirt's exporter labels
it, so the two join. A key or a value never appears: no series is labelled with one, and the
events this module reads are only counted. Series, types and meanings: docs/bridge.md, "Metrics".
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ovmproto import __version__

from .errors import BridgeError
from .events import Event
from .model import VmInfo

if TYPE_CHECKING:
    from .bridge import Bridge

log = logging.getLogger(__name__)

PATH = "/metrics"
LABEL = "domain"  # the VM's name, as libvirt's exporter labels a domain

# From a millisecond (a delivery to a synced agent) to a day (a message queued for a VM that is
# shut off until its next boot).
DELIVERY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
)

# Outcomes a message is counted under. "queued": it entered the outbox (every message the bridge
# kept, delivered at once or later); the others are where it ended. "refused": a queue=false send
# made while the agent was away (nothing kept, so never "queued") or cut off by the link before
# the guest could have it.
OUTCOMES = ("queued", "delivered", "failed", "refused", "cancelled", "expired")
_OUTCOME_OF_EVENT = {
    "message.queued": "queued",
    "message.delivered": "delivered",
    "message.failed": "failed",
    "message.cancelled": "cancelled",
    "message.expired": "expired",
}

# The session's counters (hostbridge.model.zero_counters) as series: counter -> (name, help).
SESSION_COUNTERS = {
    "reconnects": ("hostbridge_reconnects", "Connects to the VM's channel after its first."),
    "failed_links": (
        "hostbridge_failed_links",
        "Links to the VM's agent that ended before they were stable (10 s synced).",
    ),
    "reconnects_delayed": (
        "hostbridge_reconnects_delayed",
        "Connects held back by the VM's reconnect budget.",
    ),
    "resyncs": (
        "hostbridge_resyncs",
        "Times the VM's synced link was resynchronised (a timeout, a busy answer, a gap).",
    ),
    "timeouts": (
        "hostbridge_request_timeouts",
        "Requests to the VM's agent that went unanswered in time.",
    ),
    "frames_in": ("hostbridge_frames_received", "Frames read from the VM's agent."),
    "frames_out": ("hostbridge_frames_sent", "Frames written to the VM's agent."),
    "bad_frames": (
        "hostbridge_bad_frames",
        "Frames from the VM's agent that were discarded (too long or malformed).",
    ),
    "dropped_rate_limited": (
        "hostbridge_frames_rate_limited",
        "Frames from the VM's agent held back by its rate limit (delayed, not dropped).",
    ),
    "refused_keys": (
        "hostbridge_refused_keys",
        "Keys or values the VM's agent announced that the protocol forbids (not mirrored).",
    ),
}


@dataclass
class _State:
    """What one scrape reads from the bridge: taken on the event loop (the only place the bridge's
    state may be read), turned into series anywhere (BridgeMetrics.exposition: in a thread)."""

    vms: list[VmInfo]
    queues: dict[str, tuple[int, float]]  # Store.queue_stats()
    stats: dict[str, float]  # Bridge.stats()
    outcomes: dict[tuple[str, str], int]
    delivered_in: list[int]
    delivered: int
    delivery_seconds: float
    now: float = field(default_factory=time.time)


class BridgeCollector(Collector):
    """A prometheus_client collector (``prometheus_client.registry.Collector``) of ``bridge``.

    It subscribes to the bridge's change stream when made: make it before bridge.start() so that
    the messages delivered from the outbox at start-up are counted too."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        # (vm, outcome) -> messages, since this collector was made.
        self.outcomes: dict[tuple[str, str], int] = {}
        # The delivery times: a count per bucket (not cumulative), the count and the sum. Kept
        # here rather than in a prometheus_client Histogram, which would add a _created series.
        self.delivered_in = [0] * len(DELIVERY_BUCKETS)
        self.delivered = 0
        self.delivery_seconds = 0.0
        bridge.events.listeners.append(self._on_event)

    def _on_event(self, ev: Event) -> None:
        # Called inside every publish(): quick, and never raising (EventHub's contract).
        outcome = _OUTCOME_OF_EVENT.get(ev.type)
        if outcome is None or ev.vm is None:
            return
        key = (ev.vm, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        waited = ev.fields.get("waited")
        if outcome == "delivered" and isinstance(waited, (int, float)):
            seconds = max(0.0, float(waited))
            i = bisect.bisect_left(DELIVERY_BUCKETS, seconds)  # the first bucket with le >= it
            if i < len(DELIVERY_BUCKETS):
                self.delivered_in[i] += 1
            self.delivered += 1
            self.delivery_seconds += seconds

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe: collect() needs the bridge running, and the registry must not call
        # it at registration (before start()) to learn the names.
        return ()

    def collect(self) -> Iterator[Metric]:
        # What generate_latest(registry) calls: on the event loop's thread only (state()).
        return self.families(self.state())

    def state(self) -> _State | None:
        """What a scrape needs of the bridge, copied (None when the bridge is not running). On
        the event loop's thread: a few milliseconds for 1,000 VMs, one query of the database."""
        bridge = self.bridge
        try:
            # In a pool, this host's VMs only: each host's scrape tells of its own.
            vms = bridge.vms(local=True)
            queues = bridge.store.queue_stats()
        except BridgeError:
            return None  # not started, or stopped: no VM to tell of
        outcomes = dict(self.outcomes)
        for name, count in bridge.refused.items():
            outcomes[(name, "refused")] = count
        return _State(
            vms=vms,
            queues=queues,
            stats=bridge.stats(),
            outcomes=outcomes,
            delivered_in=list(self.delivered_in),
            delivered=self.delivered,
            delivery_seconds=self.delivery_seconds,
        )

    def families(self, state: _State | None) -> Iterator[Metric]:
        """The series of ``state``; any thread may call it."""
        yield _build_info()
        if state is None:
            return
        yield _delivery(state)
        now, stats = state.now, state.stats
        yield _gauge(
            "hostbridge_start_time_seconds",
            "When the bridge started, in UNIX time.",
            now - stats["uptime"],
        )
        yield _counter(
            "hostbridge_commits", "Transactions of the send path (group commits).", stats["commits"]
        )
        yield _counter(
            "hostbridge_commit_writes",
            "Writes those transactions held (sends, acknowledgements).",
            stats["commit_units"],
        )
        connected = GaugeMetricFamily(
            "hostbridge_agent_connected",
            "1 when the VM's agent is connected (its link synced), else 0.",
            labels=[LABEL],
        )
        last_seen = GaugeMetricFamily(
            "hostbridge_agent_last_seen_timestamp_seconds",
            "When the bridge last heard from the VM's agent, in UNIX time (absent: never).",
            labels=[LABEL],
        )
        length = GaugeMetricFamily(
            "hostbridge_queue_messages",
            "Messages waiting in the VM's outbox for delivery.",
            labels=[LABEL],
        )
        age = GaugeMetricFamily(
            "hostbridge_queue_oldest_age_seconds",
            "Age of the oldest message waiting in the VM's outbox (0: none waits).",
            labels=[LABEL],
        )
        counters = {
            counter: CounterMetricFamily(metric, text, labels=[LABEL])
            for counter, (metric, text) in SESSION_COUNTERS.items()
        }
        for vm in state.vms:
            labels = [vm.name]
            connected.add_metric(labels, 1.0 if vm.agent == "connected" else 0.0)
            if vm.last_seen is not None:
                last_seen.add_metric(labels, vm.last_seen)
            count, oldest = state.queues.get(vm.name, (0, now))
            length.add_metric(labels, count)
            age.add_metric(labels, max(0.0, now - oldest) if count else 0.0)
            for counter, family in counters.items():
                family.add_metric(labels, vm.counters.get(counter, 0))
        yield connected
        yield last_seen
        yield length
        yield age
        yield _messages(state)
        yield from counters.values()


def _messages(state: _State) -> Metric:
    family = CounterMetricFamily(
        "hostbridge_messages",
        "Messages by outcome: queued (entered the outbox), then delivered, failed (the guest "
        "refused it), refused (queue=false and no agent), cancelled or expired.",
        labels=[LABEL, "outcome"],
    )
    outcomes = state.outcomes
    # Every outcome of every VM, zeros included: a rate() needs the series before its first
    # increment. A VM the bridge no longer holds keeps what it counted.
    names = sorted({vm.name for vm in state.vms}.union(vm for vm, _ in outcomes))
    for name in names:
        for outcome in OUTCOMES:
            family.add_metric([name, outcome], outcomes.get((name, outcome), 0))
    return family


def _delivery(state: _State) -> Metric:
    buckets = []
    total = 0
    for le, count in zip(DELIVERY_BUCKETS, state.delivered_in):
        total += count
        buckets.append((floatToGoString(le), total))
    buckets.append(("+Inf", state.delivered))
    return HistogramMetricFamily(
        "hostbridge_message_delivery_seconds",
        "Time from a message's send (its commit to the outbox) to the guest's acknowledgement.",
        buckets=buckets,
        sum_value=state.delivery_seconds,
    )


def _build_info() -> Metric:
    info = GaugeMetricFamily(
        "hostbridge_build_info",
        "The bridge's version, as a label; the value is 1.",
        labels=["version"],
    )
    info.add_metric([__version__], 1.0)
    return info


def _gauge(name: str, text: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


def _counter(name: str, text: str, value: float) -> Metric:
    family = CounterMetricFamily(name, text)
    family.add_metric([], value)
    return family


class _Families:
    """Metric families made from one state, for an encoder to write as it writes a registry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class BridgeMetrics:
    """One bridge's registry: its collector and the process' own series (CPU, memory, files)."""

    def __init__(self, bridge: Bridge) -> None:
        self.registry = CollectorRegistry()
        self.collector = BridgeCollector(bridge)
        self.registry.register(self.collector)
        self.process = ProcessCollector(registry=self.registry)

    async def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape's body and its Content-Type: Prometheus' text format, or OpenMetrics when
        ``accept`` (the request's Accept header) asks for it.

        The bridge's state is copied here, on the event loop; the series are made and written
        in a thread. That is nearly all of a scrape's cost (about 100 ms with 1,000 VMs here):
        done on the loop, it would hold every query that long, while a thread yields to the loop
        every few milliseconds (the GIL's switch interval). What the registry holds, written as
        generate_latest(self.registry) would."""
        encoder, content_type = choose_encoder(accept or "")
        state = self.collector.state()

        def write() -> bytes:
            families = [*self.collector.families(state), *self.process.collect()]
            return encoder(_Families(families))

        return await asyncio.to_thread(write), content_type

    async def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics alone on ``host``:``port`` (0: a port the system picks), without
        authentication: it holds no key and no value, but should listen on loopback or a
        management network (docs/bridge.md)."""
        app = web.Application()
        app.router.add_get(PATH, self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            try:
                sock = _listen(host, port)
            except OSError as e:
                raise BridgeError(
                    "cannot listen for metrics on %s:%d: %s" % (_host(host), port, e.strerror or e)
                ) from None
            try:
                await web.SockSite(runner, sock).start()
            except BaseException:
                sock.close()
                raise
        except BaseException:
            await runner.cleanup()
            raise
        server = MetricsServer(runner, sock.getsockname()[:2])
        log.info(
            "metrics listening on http://%s:%d%s", _host(server.address[0]), server.address[1], PATH
        )
        return server

    async def _handle(self, request: web.Request) -> web.Response:
        body, content_type = await self.exposition(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (a name, an IPv4 or an IPv6 address)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _host(host: str) -> str:
    return "[%s]" % host if ":" in host else host


class MetricsServer:
    """The metrics listener, running; close() stops it."""

    def __init__(self, runner: web.AppRunner, address: tuple[str, int]) -> None:
        self.runner = runner
        self.address = address  # (host, port): the port the system picked when asked for 0

    async def close(self) -> None:
        await self.runner.cleanup()
