"""Single flight: identical requests in flight at once reach the provider once.

The first MISS for a key leads; identical requests arriving while it is in flight wait
(bounded) for it to land and are then answered from the cache, so N parallel test
workers asking the same question pay for one answer, not N.
"""

from __future__ import annotations

import asyncio


class InFlight:
    def __init__(self) -> None:
        self._leaders: dict[str, asyncio.Future[None]] = {}

    def lead(self, key: str) -> bool:
        """Become the leader for `key`, unless another request already is."""
        if key in self._leaders:
            return False
        self._leaders[key] = asyncio.get_running_loop().create_future()
        return True

    async def follow(self, key: str, timeout: float) -> bool:
        """Wait up to `timeout` for the leader of `key` to land; False when there is none."""
        leader = self._leaders.get(key)
        if leader is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(leader), timeout)
        except asyncio.TimeoutError:
            pass
        return True

    def land(self, key: str) -> None:
        """The leader's flow ended (stored or not): release its followers."""
        leader = self._leaders.pop(key, None)
        if leader is not None and not leader.done():
            leader.set_result(None)
