"""A request waiting for its reply: the future its caller awaits, and the items of a listing.

A `list` is answered by one `item` frame per key and then an `ok`; the items are collected up to
the mirror's quota, so that a guest cannot make the bridge hold more for one answer than it
would mirror. The session keeps these in its id -> Pending map.
"""

from __future__ import annotations

import asyncio
from typing import Union

from ovmproto.messages import Err, Item, Ok

from . import errors
from .errors import GuestError

Reply = tuple[Ok, Union[list[Item], None]]


class Pending:
    __slots__ = ("fut", "items", "item_bytes")

    def __init__(self, fut: asyncio.Future[Reply], collect: bool) -> None:
        self.fut = fut
        self.items: list[Item] | None = [] if collect else None
        self.item_bytes = 0

    def reply(self, msg: Ok | Err) -> None:
        """The guest's `ok` or `err` for this request."""
        if self.fut.done():
            return
        if isinstance(msg, Ok):
            self.fut.set_result((msg, self.items))
            return
        exc_cls = errors.NotFound if msg.code == "not_found" else GuestError
        self.fut.set_exception(exc_cls("guest: %s" % msg.msg[:200], msg.code))

    def item(self, msg: Item, max_keys: int, max_bytes: int) -> None:
        """One `item` of a listing; past the quota the request fails."""
        if self.items is None or self.fut.done():
            return
        self.item_bytes += len(msg.key) + len(msg.value)
        if len(self.items) >= max_keys or self.item_bytes > max_bytes:
            reason = "the guest's answer passed %d keys or %d bytes" % (max_keys, max_bytes)
            self.fail(errors.BridgeError(reason))
            self.items = None
            return
        self.items.append(msg)

    def fail(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)
