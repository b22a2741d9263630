"""L1 then L2: lookups, back-fill and writes, with the TTL judged from `created_at`.

An entry keeps its original `created_at` through every copy, so a back-filled entry
reports an honest age and never outlives its TTL by being copied. L1 keeps entries past
their TTL (only a lookup judges them, so replay mode can still serve them and a miss can
say "expired"); Redis, memory shared by a team, drops them at the TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .entry import Entry
from .l1 import DiskStore
from .l2 import RedisStore
from .report import human_age


class NotStorable(Exception):
    """A background check found that an answer must not be stored after all."""


@dataclass(frozen=True)
class Found:
    entry: Entry
    layer: str
    stale: str = ""  # why the entry may not be served; "" when it may


@dataclass(frozen=True)
class Written:
    """Where a background write put an entry, and why not in every layer (or at all)."""

    layers: tuple[str, ...] = ()
    problem: str = ""


@dataclass
class TieredCache:
    l1: DiskStore | None
    l2: RedisStore | None
    ttl: float = 0.0  # seconds; 0 keeps entries forever
    _tasks: set[asyncio.Task] = field(default_factory=set, repr=False)
    # Entries whose background write has not finished: lookups already see them.
    _unwritten: dict[str, Entry] = field(default_factory=dict, repr=False)

    def remaining(self, entry: Entry) -> float | None:
        """Seconds the entry may still live (None: forever; <= 0: expired): Redis's `EX`."""
        return self.ttl - entry.age() if self.ttl else None

    def staleness(self, entry: Entry, max_age: float | None, any_age: bool = False) -> str:
        """Why the entry may not be served, "" when it may. `any_age` (replay mode) lets the
        TTL pass: a recording a CI run depends on must not vanish a week after it was made."""
        age = entry.age()
        if self.ttl and not any_age and age >= self.ttl:
            return f"expired (age {human_age(age)}, ttl {human_age(self.ttl)})"
        if max_age is not None and age > max_age:
            return f"older than the client's max-age (age {human_age(age)}, max-age {human_age(max_age)})"
        return ""

    async def find(self, key: str, max_age: float | None = None, any_age: bool = False) -> Found | None:
        """The first servable entry and its layer (an L2 hit back-fills L1); else the first
        entry found that may not be served, with why, so that a miss can say "expired"."""
        unservable: Found | None = None
        unwritten = self._unwritten.get(key)
        if unwritten is not None:
            found = Found(unwritten, "l1" if self.l1 else "l2",
                          self.staleness(unwritten, max_age, any_age))
            if not found.stale:
                return found
            unservable = found
        for store in (self.l1, self.l2):
            entry = await store.get(key) if store is not None else None
            if entry is None:
                continue
            found = Found(entry, store.layer, self.staleness(entry, max_age, any_age))
            if not found.stale:
                if store is self.l2 and self.l1 is not None:
                    self.background(self.l1.put(entry, None))
                return found
            unservable = unservable or found
        return unservable

    async def lookup(self, key: str, max_age: float | None = None) -> tuple[Entry, str] | None:
        """The servable entry and the layer it came from, or None."""
        found = await self.find(key, max_age)
        return (found.entry, found.layer) if found and not found.stale else None

    def store_soon(
        self, entry: Entry, prepare: Callable[[Entry], None], visible: bool = True
    ) -> asyncio.Task[Written]:
        """Write off the request path; `prepare` and the L1 write share one worker-thread trip.

        A visible entry is served to lookups at once, before it is written; `prepare` may
        raise NotStorable to drop the entry (a faulty answer must not have been visible;
        one merely too large to keep may have been, being complete).
        """
        if visible:
            self._unwritten[entry.key] = entry

        async def write() -> Written:
            layers: list[str] = []
            problems: list[str] = []
            try:
                if problem := await asyncio.to_thread(self._prepare_and_write_l1, entry, prepare):
                    problems.append(problem)
                elif self.l1 is not None:
                    layers.append(self.l1.layer)
                if self.l2 is not None:
                    if await self.l2.put(entry, self.remaining(entry)):
                        layers.append(self.l2.layer)
                    else:
                        problems.append("L2 write failed")
            except NotStorable as e:
                return Written(problem=str(e))
            finally:
                if self._unwritten.get(entry.key) is entry:
                    del self._unwritten[entry.key]
            return Written(tuple(layers), "; ".join(problems))

        return self.background(write())

    def _prepare_and_write_l1(self, entry: Entry, prepare: Callable[[Entry], None]) -> str:
        """Why L1 did not take the entry ("" when it did, or when there is no L1)."""
        prepare(entry)
        if self.l1 is None or self.l1.put_sync(entry, None):  # L1 keeps entries past the TTL: see above
            return ""
        return f"L1 {self.l1.failure or 'write failed'}"

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run store work off the request path, holding a reference until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Let pending writes finish (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        if self.l2 is not None:
            await self.l2.close()
        if self.l1 is not None:
            self.l1.close()
