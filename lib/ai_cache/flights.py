"""Single flight: identical requests in flight at once reach the provider once.

The first MISS for a key leads; identical requests arriving while it is in flight wait
(bounded) for it to land and are then answered from the cache, so N parallel test
workers asking the same question pay for one answer, not N. The whole protocol lives
here: lead, wait for an answer, release once the answer is visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .state import FlowState

Answer = TypeVar("Answer")


class SingleFlight:
    def __init__(self) -> None:
        self._leaders: dict[str, asyncio.Future[None]] = {}

    def lead(self, state: FlowState) -> None:
        """Lead the flow's key, unless another request already does or the flow followed
        one (hit-for-pass: the followers of a leader that landed without a usable entry
        all go upstream at once; a chain of new leaders would make the last one wait for
        every answer before it)."""
        if state.followed:
            return
        state.leader = state.key not in self._leaders
        if state.leader:
            self._leaders[state.key] = asyncio.get_running_loop().create_future()

    async def answer(
        self, state: FlowState, patience: float, lookup: Callable[[], Awaitable[Answer | None]]
    ) -> Answer | None:
        """Wait up to `patience` seconds for the leader of the flow's key to land, then `lookup` its
        answer; None at once when no identical request is in flight."""
        leader = self._leaders.get(state.key)
        if leader is None:
            return None
        try:
            await asyncio.wait_for(asyncio.shield(leader), patience)
        except TimeoutError:
            pass
        state.followed = True
        return await lookup()

    def land(self, state: FlowState, hidden: asyncio.Future[Any] | None = None) -> None:
        """The leader's flow ended (stored or not): its followers look up as soon as its
        answer is visible, at once or when a `hidden` entry (one that needed a full check
        before it may be served) has been written."""
        if not state.leader:
            return
        if hidden is None:
            self._release(state.key)
        else:
            hidden.add_done_callback(lambda _: self._release(state.key))

    def _release(self, key: str) -> None:
        leader = self._leaders.pop(key, None)
        if leader is not None and not leader.done():
            leader.set_result(None)
