"""Answers about a VM of the pool that no live host serves (docs/pool.md, "Any bridge answers").

A pool bridge forwards a request for a VM another host runs (hostbridge.forward). When that host
is down, or nobody owns the VM, the bridge that was asked answers from the shared database, the
way a single bridge answers for a VM whose agent is away: a send is queued for the VM's next
owner (whose wake-up the enqueue's NOTIFY carries, hostbridge.pgstore), a query comes from the
mirror its last owner saved, marked stale. Nothing here talks to a guest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import errors
from .groupcommit import GroupCommit
from .model import CancelResult, KeyList, KeyValue, QueuedMessage, QueueList, SendResult, VmInfo
from .store import IdempotencyRow, MirrorRow, OutboxRow, VmRow

# A remote VM's agent counts as connected while its owner saw it this recently: the owner saves
# last_seen about once a second, and pings a silent agent every keepalive (15 s).
SEEN_RECENTLY = 40.0
# Every row of a VM whose owner is away may be in its guest already (written, not acknowledged).
_ANY_SEQ = 1 << 62


def vm_info(row: VmRow, host: str | None, alive: bool, queued: int) -> VmInfo:
    """What `list` shows of a VM another host runs (or nobody runs now)."""
    seen = row.last_seen
    connected = alive and seen is not None and time.time() - seen < SEEN_RECENTLY
    return VmInfo(
        name=row.name,
        channel=row.channel or "",
        source=row.source or "discovered",
        agent="connected" if connected else "disconnected",
        last_seen=seen,
        queued=queued,
        host=host,
    )


async def send(
    store: Any,
    committer: GroupCommit,
    name: str,
    key: str,
    value: str | None,
    log_value: bool,
    queue: bool,
    deadline: float | None,
    idempotency: tuple[str, str] | None,
) -> SendResult | IdempotencyRow:
    """Queue a message for VM ``name`` in the shared outbox; the prior send when its idempotency
    key was used already (the caller replays it)."""
    if not queue:
        raise errors.AgentNotConnected(
            "the agent in VM %r is not reachable from any live host; nothing was queued" % name
        )

    def enqueue(db: object) -> OutboxRow | IdempotencyRow:
        if idempotency is not None:
            prior: IdempotencyRow | None = store.idempotent(name, idempotency[0])
            if prior is not None:
                return prior
        row: OutboxRow = store.enqueue(
            name, key, value, log_value, expires=deadline, idempotency=idempotency
        )
        return row

    done = await committer.run(enqueue)
    if isinstance(done, IdempotencyRow):
        return done
    return SendResult(vm=name, key=key, outcome="queued", seq=done.seq)


def _stale(name: str, r: MirrorRow, last_seen: float | None) -> KeyValue:
    assert r.value is not None
    return KeyValue(
        vm=name, key=r.key, value=r.value, ts=r.ts, origin=r.origin, stale=True, last_seen=last_seen
    )


def query(store: Any, row: VmRow, key: str) -> KeyValue:
    for r in store.mirror(row.name):
        if r.key == key:
            if r.value is None:
                raise errors.NotFound(
                    "the value of key %r in VM %r was sent with log off and is not kept on "
                    "disk; no live host runs the VM" % (key, row.name)
                )
            return _stale(row.name, r, row.last_seen)
    raise errors.NotFound(
        "VM %r has no key %r (from the pool's copy; no live host runs the VM)" % (row.name, key)
    )


def keys(store: Any, row: VmRow) -> KeyList:
    return KeyList(
        vm=row.name,
        stale=True,
        last_seen=row.last_seen,
        entries=[
            _stale(row.name, r, row.last_seen)
            for r in store.mirror(row.name)
            if r.value is not None
        ],
    )


def queue_list(
    store: Any, name: str, limit: int, written: Callable[[int], bool] = lambda seq: False
) -> QueueList:
    """VM ``name``'s waiting messages without their values; ``written(seq)``: whether the guest
    may hold one (its owner's delivery knows; elsewhere, none is known to be)."""
    return QueueList(
        vm=name,
        messages=[
            QueuedMessage(
                seq=r.seq,
                key=r.key,
                op="del" if r.value is None else "set",
                size=0 if r.value is None else len(r.value.encode("utf-8")),
                log=r.log,
                created=r.created,
                expires=r.expires,
                in_flight=written(r.seq),
            )
            for r in store.outbox(name, limit=max(0, int(limit)))
        ],
    )


def cancel(store: Any, name: str, seq: int | None) -> CancelResult:
    """Withdraw without the owner: any row may be in the guest already, so each loses its value
    now and stays, marked, until the VM's next owner learns at its sync whether the guest had it
    (Store.withdraw)."""
    cancelled, in_flight = store.withdraw(
        name, None if seq is None else [seq], "cancelled", _ANY_SEQ
    )
    if seq is not None and not (cancelled or in_flight):
        raise errors.NotFound("VM %r has no message %d waiting for delivery" % (name, seq))
    return CancelResult(vm=name, cancelled=cancelled, in_flight=in_flight)
