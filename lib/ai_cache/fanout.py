"""Live fan-out: a leader's stream, passed on to its followers as it arrives.

A follower of an in-flight stream would otherwise see its first byte only when the
leader's whole stream has ended. The leader's capture feeds a `Broadcast` every chunk
its client gets (the raw bytes, before any decoding); each follower subscribes and gets
everything so far at once, then the rest live, and ends the way the leader ended: cleanly
when the leader's client got a whole answer, abruptly otherwise (never a made-up ending).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from .entry import replayable_headers

logger = logging.getLogger(__name__)

ABORTED = object()  # the leader's stream broke off: the followers' streams break off too
ENDED = object()  # the leader's stream ended cleanly


class Subscription:
    """A follower's chunks still to be passed on, then how the stream ended; `backlog` is
    how far (in bytes) the follower is behind the leader."""

    def __init__(self, so_far: list[bytes]) -> None:
        self._so_far = so_far  # passed on first; not backlog: the broadcast keeps it anyway
        self._items: asyncio.Queue[bytes | object] = asyncio.Queue()
        self.backlog = 0

    def put(self, item: bytes | object) -> None:
        if isinstance(item, bytes):
            self.backlog += len(item)
        self._items.put_nowait(item)

    def cut(self) -> None:
        """Drop what waits and break off: the follower fell too far behind."""
        while not self._items.empty():
            self._items.get_nowait()
        self._so_far, self.backlog = [], 0
        self._items.put_nowait(ABORTED)

    async def get(self) -> list[bytes] | object:
        """The parts of the next chunk to pass on (the stream so far is one chunk: its
        parts are never joined, which would copy it for each follower), or the ending."""
        if self._so_far:
            so_far, self._so_far = self._so_far, []
            return so_far
        item = await self._items.get()
        if isinstance(item, bytes):
            self.backlog -= len(item)
            return [item]
        return item


class Broadcast:
    """The leader's response head and chunks so far, and a subscription per follower for the rest.

    The chunks so far are kept for followers still to come, up to `max_body` bytes; past
    that no one new may join (they wait for the leader to land, as JSON followers do). A
    follower whose client reads slower than the leader's falls behind; more than `max_body`
    behind, its stream breaks off: the leader is never slowed for it, and the proxy never
    keeps a whole stream for a client that stopped reading."""

    def __init__(self, status: int, headers: list[tuple[str, str]], fmt: str, max_body: int) -> None:
        self.status = status
        self.format = fmt
        # The raw bytes are passed on, so their content-encoding with them.
        self.headers = replayable_headers(headers) + [(k, v) for k, v in headers if k.lower() == "content-encoding"]
        self.max_body = max_body
        self.parts: list[bytes] = []
        self.size = 0  # passed on so far
        self.joinable = True
        self.ending: object | None = None
        self._followers: list[Subscription] = []

    def feed(self, data: bytes) -> None:
        """A chunk the leader's client gets; called from the stream callable, so it never waits."""
        if not data or self.ending is not None:
            return
        for follower in list(self._followers):
            if follower.backlog + len(data) > self.max_body:
                logger.info("ai-cache: a follower fell more than ai_cache_max_body behind the leader: cut off")
                self._followers.remove(follower)
                follower.cut()
            else:
                follower.put(data)
        self.size += len(data)
        if self.joinable:
            if self.size > self.max_body:
                self.joinable, self.parts = False, []
            else:
                self.parts.append(data)

    def end(self, cleanly: bool) -> None:
        """The leader's flow ended; `cleanly`: its client got the whole answer."""
        if self.ending is not None:
            return
        self.ending = ENDED if cleanly else ABORTED
        for follower in self._followers:
            follower.put(self.ending)

    def subscribe(self) -> Subscription:
        """A follower's subscription: everything so far as one chunk, then each chunk as
        it comes, then ENDED or ABORTED."""
        follower = Subscription(list(self.parts))
        if self.ending is not None:
            follower.put(self.ending)
        else:
            self._followers.append(follower)
        return follower

    def unsubscribe(self, follower: Subscription) -> None:
        if follower in self._followers:
            self._followers.remove(follower)


async def relayed(follower: Subscription) -> AsyncIterator[list[bytes]]:
    """The chunks of a subscription, each as its parts; raises ConnectionAbortedError if the
    leader's stream broke off (or the follower fell too far behind)."""
    while True:
        item = await follower.get()
        if item is ENDED:
            return
        if item is ABORTED:
            raise ConnectionAbortedError("the leader's stream broke off")
        assert isinstance(item, list)
        yield item
