"""Single flight: identical requests in flight at once reach the provider once.

The first MISS for a key leads; identical requests arriving while it is in flight wait
(bounded) for it to land and are then answered from the cache, so N parallel test
workers asking the same question pay for one answer, not N. Followers of a stream get
the leader's stream live instead, from its first byte (fanout.py). With a fleet
(lease.py: proxies sharing a Redis L2) the leader first takes the key's fleet-wide
lease, or waits for another proxy's leader to store the answer. The whole protocol
lives here: lead, wait for an answer, release once the answer is visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .fanout import Broadcast
from .lease import Claim, FleetLeases, Lease
from .state import FlowState
from .tiers import Written

Answer = TypeVar("Answer")


def stored(write: asyncio.Future[Written]) -> bool:
    """Whether a finished write put the entry anywhere."""
    return not write.cancelled() and write.exception() is None and bool(write.result().layers)


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Flight:
    """One key's flight: landed when the leader's answer is visible; live once its stream began."""

    landed: asyncio.Future[None] = field(default_factory=_future)
    live: asyncio.Future[Broadcast] = field(default_factory=_future)
    lease: Lease | None = None  # the fleet lease the leader holds


class SingleFlight:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self.fleet: FleetLeases | None = None

    def use_fleet(self, fleet: FleetLeases | None) -> None:
        """Lead fleet-wide through `fleet` from now on (None: this proxy alone)."""
        old, self.fleet = self.fleet, fleet
        if old is not None:
            old.close()

    async def lead(
        self, state: FlowState, patience: float, lookup: Callable[[], Awaitable[Answer | None]]
    ) -> Answer | None:
        """Lead the flow's key, unless another request already does or the flow followed
        one (hit-for-pass: the followers of a leader that landed without a usable entry
        all go upstream at once; a chain of new leaders would make the last one wait for
        every answer before it). In a fleet, lead it fleet-wide too, or wait up to
        `patience` seconds for another proxy's answer: returned by `lookup`, and then the
        flow leads nothing (its own followers look up at once)."""
        if state.followed:
            return None
        state.leader = state.key not in self._flights
        if not state.leader:
            return None
        flight = self._flights[state.key] = Flight()
        if self.fleet is None:
            return None
        claim = await self.fleet.acquire(state.key, patience)
        if isinstance(claim, Lease):
            flight.lease = claim
            return None
        answer = await lookup() if claim is Claim.STORED else None
        if answer is not None or claim is Claim.PASS:
            # Answered, or hit-for-pass across the fleet: its own followers go on at once too.
            state.leader, state.followed = False, True
            self._release(state.key)
        return answer

    async def drain(self) -> None:
        """Let the fleet leases' releases finish (after the writes they wait for)."""
        if self.fleet is not None:
            await self.fleet.drain()

    def go_live(self, state: FlowState, broadcast: Broadcast) -> None:
        """The leader's stream began: its followers may join it."""
        flight = self._flights.get(state.key) if state.leader else None
        if flight is not None and not flight.live.done():
            flight.live.set_result(broadcast)

    async def answer(
        self, state: FlowState, patience: float, lookup: Callable[[], Awaitable[Answer | None]]
    ) -> Answer | Broadcast | None:
        """Wait up to `patience` seconds for the leader of the flow's key to land, then `lookup` its
        answer; or for its stream to begin (a JSON answer never does), and join it. None at
        once when no identical request is in flight."""
        flight = self._flights.get(state.key)
        if flight is None:
            return None
        waits: list[asyncio.Future[Any]] = [flight.landed, flight.live]
        await asyncio.wait(waits, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
        state.followed = True
        if flight.live.done() and flight.live.result().joinable:
            return flight.live.result()
        return await lookup()

    def land(
        self,
        state: FlowState,
        written: asyncio.Future[Written] | None = None,
        hidden: bool = False,
        cleanly: bool = False,
    ) -> None:
        """The leader's flow ended (stored or not; `cleanly`: its client got the whole
        answer): its live followers end as it did, the others look up as soon as its
        answer is visible, at once or (`hidden`: an entry that needed a full check before
        it may be served) once `written`. The fleet lease goes once the write ended."""
        if not state.leader:
            return
        flight = self._flights.get(state.key)
        if flight is None:
            return
        if flight.live.done():
            flight.live.result().end(cleanly)
        if hidden and written is not None:
            written.add_done_callback(lambda _: self._release(state.key))
        else:
            self._release(state.key)
        if (lease := flight.lease) is not None:
            if written is None:
                lease.fleet.release_soon(lease, stored=False)
            else:
                written.add_done_callback(lambda task: lease.fleet.release_soon(lease, stored=stored(task)))

    def _release(self, key: str) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None and not flight.landed.done():
            flight.landed.set_result(None)
