"""Live fan-out: a leader's stream, passed on to its followers as it arrives.

A follower of an in-flight stream would otherwise see its first byte only when the
leader's whole stream has ended. The leader's capture feeds a `Broadcast` every chunk
its client gets (the raw bytes, before any decoding); each follower subscribes and gets
everything so far at once, then the rest live, and ends the way the leader ended: cleanly
when the leader's client got a whole answer, abruptly otherwise (never a made-up ending).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .entry import replayable_headers

ABORTED = object()  # the leader's stream broke off: the followers' streams break off too
ENDED = object()  # the leader's stream ended cleanly


class Broadcast:
    """The leader's response head and chunks so far, and a queue per follower for the rest.

    The chunks so far are kept for followers still to come, up to `max_body` bytes; past
    that no one new may join (they wait for the leader to land, as JSON followers do)."""

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
        self._queues: list[asyncio.Queue[bytes | object]] = []

    def feed(self, data: bytes) -> None:
        """A chunk the leader's client gets; called from the stream callable, so it never waits."""
        if not data or self.ending is not None:
            return
        for queue in self._queues:
            queue.put_nowait(data)
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
        for queue in self._queues:
            queue.put_nowait(self.ending)

    def subscribe(self) -> asyncio.Queue[bytes | object]:
        """A follower's queue: everything so far as one chunk, then each chunk as it comes,
        then ENDED or ABORTED."""
        queue: asyncio.Queue[bytes | object] = asyncio.Queue()
        if self.parts:
            queue.put_nowait(b"".join(self.parts))
        if self.ending is not None:
            queue.put_nowait(self.ending)
        else:
            self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | object]) -> None:
        if queue in self._queues:
            self._queues.remove(queue)


async def relayed(queue: asyncio.Queue[bytes | object]) -> AsyncIterator[bytes]:
    """The chunks of a subscription; raises ConnectionAbortedError if the leader's stream broke off."""
    while True:
        item = await queue.get()
        if item is ENDED:
            return
        if item is ABORTED:
            raise ConnectionAbortedError("the leader's stream broke off")
        assert isinstance(item, bytes)
        yield item
