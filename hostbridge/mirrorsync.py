"""Keeps the bridge's copy of one guest's keys (hostbridge.mirror) in step with the guest.

A synced agent announces every change of its cache in a `changed` frame numbered by its change
counter (gseq, per cache identity gid). Changes are applied in order; a gap, a new gid, or a
mirror that was saved at another gseq means the copy cannot be patched, so the whole cache is
listed again (a refresh).

A change that arrives while a listing is under way may or may not be in it, and the listing's
reply may be processed after the change's frame. So such changes are held and replayed onto the
listing when they are newer than the gseq the listing reflects (applying them at once would be
wiped by the listing).

``current`` says when the copy holds every change the guest announced on this link, which is
when the bridge may answer a synced agent's queries from it (hostbridge.bridge, docs/bridge.md).
"""

from __future__ import annotations

from collections.abc import Callable

from ovmproto.handshake import HelloResult
from ovmproto.messages import Changed, List

from . import errors
from .mirror import Mirror
from .session import Session
from .tasks import TaskSet

REFRESH_TIMEOUT = 15.0  # a full list of a large cache over a slow port
HELD_CHANGES_MAX = 4096  # changes held during one refresh; past that, list again


def _nothing() -> None:
    pass


class MirrorSync:
    def __init__(self, session: Session, mirror: Mirror, tasks: TaskSet) -> None:
        self.session = session
        self.mirror = mirror
        self._tasks = tasks
        self.on_refreshed: Callable[[], None] = _nothing  # the owner saves the new copy
        self.refreshing = False
        self._guest_gid: str | None = None
        self._seen_gseq: int | None = None
        self._held: list[Changed] = []
        self._held_overflow = False

    @property
    def current(self) -> bool:
        """Whether the mirror holds every change announced by the guest whose hello was last
        answered, up to the newest `changed` read: not while a listing is under way, after a
        gap, or while it is the copy of another cache (another gid). Whether that link is still
        synced is the session's state, which the caller checks."""
        mirror = self.mirror
        gid = self._guest_gid
        return (
            not self.refreshing
            and gid is not None
            and mirror.gid == gid
            and mirror.gseq is not None
            and mirror.gseq >= (self._seen_gseq or 0)
        )

    def on_synced(self, result: HelloResult) -> None:
        self._guest_gid = result.gid
        self._seen_gseq = result.gseq
        if self.mirror.gid != result.gid or self.mirror.gseq != result.gseq:
            self.refresh()

    def on_changed(self, msg: Changed) -> None:
        self._seen_gseq = max(self._seen_gseq or 0, msg.gseq)
        if not self.refreshing:
            self._apply(msg)
        elif len(self._held) < HELD_CHANGES_MAX:
            self._held.append(msg)
        else:
            self._held_overflow = True

    def _apply(self, msg: Changed) -> bool:
        """Apply one change; False when it shows a gap (a refresh is then under way)."""
        mirror = self.mirror
        known = mirror.gid == self._guest_gid and mirror.gseq is not None
        expected = (mirror.gseq or 0) + 1
        if known and msg.gseq < expected:
            return True  # already mirrored
        if not self.session.admit(msg.key, msg.value):
            # Refused, counted and logged; its gseq still counts below. Whatever the mirror held
            # for the key is out of date now: a query asks the guest instead.
            if msg.key is not None:
                mirror.discard(msg.key)
        elif not mirror.apply(msg.op, msg.key, msg.value, float(msg.ts), msg.origin):
            self.session.warn.warn(
                "quota",
                "mirror quota reached (%d keys, %d bytes); key %r not mirrored",
                mirror.max_keys,
                mirror.max_bytes,
                msg.key,
            )
        if known and msg.gseq == expected:
            mirror.gseq = msg.gseq
            return True
        self.session.log.debug("gseq %d after %s: refreshing the mirror", msg.gseq, mirror.gseq)
        self.refresh()
        return False

    def refresh(self) -> None:
        """List the guest's whole cache into the mirror (once at a time)."""
        if not self.refreshing:
            self.refreshing = True
            self._held = []
            self._held_overflow = False
            self._tasks.spawn(self._refresh(), "refresh")

    async def _refresh(self) -> None:
        try:
            ok, items = await self.session.request(
                lambda i: List(id=i), REFRESH_TIMEOUT, collect=True, internal=True
            )
        except errors.BridgeError as e:
            self.refreshing = False
            self.session.log.info("mirror refresh failed: %s", e.message)  # the next sync retries
            return
        # ok.gseq is the change counter the listing reflects (an agent too old to say: None).
        listed = ok.gseq
        self.mirror.replace(
            [(i.key, i.value, float(i.ts), i.origin) for i in items or ()],
            self._guest_gid,
            listed if listed is not None else self._seen_gseq,
        )
        self.session.log.debug("mirror refreshed: %d keys", len(items or ()))
        self.refreshing = False
        held, self._held = self._held, []
        if self._held_overflow or (held and listed is None):
            self.refresh()  # cannot tell which held changes the listing has: list again
        elif listed is not None:  # None here: nothing was held
            for msg in held:
                if msg.gseq > listed and not self._apply(msg):
                    break
        self.on_refreshed()
