"""A list of stores, nearest first: lookups, back-fill and writes, with the TTL judged
from `created_at`; and `open_cache`, the one place stores are opened, for the proxy and
the CLI alike.

An entry keeps its original `created_at` through every copy, so a back-filled entry
reports an honest age and never outlives its TTL by being copied. A store that keeps
entries past their TTL (disk: only a lookup judges them, so replay mode can still serve
them and a miss can say "expired") is written without an expiry; one that drops them
(Redis, memory shared by a team) gets the time the entry has left.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from diskcache.core import DBNAME

from .disk import DiskStore
from .entry import Entry
from .fixture_store import FixtureStore
from .redis_store import RedisStore
from .report import human_age
from .store import Store, WritesInThread

logger = logging.getLogger(__name__)
# Entries concluded within this window (up to a batch's size) share one worker-thread
# trip and one disk transaction, which cost more than a small entry's write; lookups are
# served the waiting entries meanwhile (measured: MISS 1.74 -> 1.58 ms CPU per request
# from a 10 to a 50 ms window).
WRITE_BATCH_SECONDS = 0.05
WRITE_BATCH_SIZE = 100


class WriteCancelled(Exception):
    """Raised by a `store_soon` finish hook to drop the entry; the message says why."""


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


# An entry waiting for its batch write: the entry, the caller's last work on it, and
# the future its outcome is told through.
Pending = tuple[Entry, Callable[[Entry], None], asyncio.Future[Written]]


@dataclass
class TieredCache:
    stores: list[Store]  # nearest first
    ttl: float = 0.0  # seconds; 0 keeps entries forever
    _tasks: set[asyncio.Task] = field(default_factory=set, repr=False)
    # Entries whose background write has not finished: lookups already see them.
    _unwritten: dict[str, Entry] = field(default_factory=dict, repr=False)
    on_lookup: Callable[[str, float], None] | None = None  # told each store lookup's layer and seconds (metrics)
    # Entries waiting for the next batch write, and the timer that starts it.
    _batch: list[Pending] = field(default_factory=list, repr=False)
    _flush_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def fixtures(self) -> FixtureStore | None:
        return next((store for store in self.stores if isinstance(store, FixtureStore)), None)

    @property
    def disk(self) -> DiskStore | None:
        """The local disk store, whose recordings a replay miss searches for the nearest."""
        return next((store for store in self.stores if isinstance(store, DiskStore)), None)

    def remaining(self, entry: Entry) -> float | None:
        """Seconds the entry may still live (None: forever; <= 0: expired): Redis's `EX`."""
        return self.ttl - entry.age() if self.ttl else None

    def expiry(self, store: Store, entry: Entry) -> float | None:
        """The expiry a store is given: none for stores that keep entries past the TTL."""
        return self.remaining(entry) if store.drops_expired else None

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
        """The first servable entry and its layer (a hit back-fills the stores before the
        one that had it); else the first entry found that may not be served, with why, so
        that a miss can say "expired"."""
        unservable: Found | None = None
        unwritten = self._unwritten.get(key)
        if unwritten is not None:
            found = Found(
                unwritten, self.stores[0].layer if self.stores else "", self.staleness(unwritten, max_age, any_age)
            )
            if not found.stale:
                return found
            unservable = found
        for position, store in enumerate(self.stores):
            started = time.perf_counter()
            entry = await store.get(key)
            if self.on_lookup is not None:
                self.on_lookup(store.layer, time.perf_counter() - started)
            if entry is None:
                continue
            found = Found(entry, store.layer, self.staleness(entry, max_age, any_age))
            if not found.stale:
                if position:
                    self._back_fill(entry, self.stores[:position])
                return found
            unservable = unservable or found
        return unservable

    def _back_fill(self, entry: Entry, nearer: list[Store]) -> None:
        """Copy a hit into the stores before the one that had it, served from the nearest at
        once: the request right behind it is a hit there, whatever the writes' progress."""
        self._unwritten[entry.key] = entry

        async def write() -> None:
            try:
                for store in nearer:
                    await store.put(entry, self.expiry(store, entry))
            finally:
                self._written(entry)

        self.background(write())

    def _written(self, entry: Entry) -> None:
        """Its write ended: lookups read the stores again (unless a newer copy waits)."""
        if self._unwritten.get(entry.key) is entry:
            del self._unwritten[entry.key]

    async def lookup(self, key: str, max_age: float | None = None) -> tuple[Entry, str] | None:
        """The servable entry and the layer it came from, or None."""
        found = await self.find(key, max_age)
        return (found.entry, found.layer) if found and not found.stale else None

    def store_soon(
        self, entry: Entry, finish: Callable[[Entry], None], visible: bool = True
    ) -> asyncio.Future[Written]:
        """Write off the request path; `finish` (the caller's last work on the entry) and
        the writes of stores that block (disk) happen in a worker thread, for a batch of
        entries at a time: one thread trip per `WRITE_BATCH_SECONDS`, not per entry.

        A visible entry is served to lookups at once, before it is written; `finish` may
        raise WriteCancelled to drop the entry (so an entry that may prove faulty must not
        be visible; one that may merely prove too large to keep may be, being complete).
        """
        if visible and self.stores and not self.stores[0].read_only:  # served as the nearest store's
            self._unwritten[entry.key] = entry
        loop = asyncio.get_running_loop()
        written: asyncio.Future[Written] = loop.create_future()
        self._batch.append((entry, finish, written))
        if len(self._batch) >= WRITE_BATCH_SIZE:
            self._flush()
        elif len(self._batch) == 1:
            self._flush_timer = loop.call_later(WRITE_BATCH_SECONDS, self._flush)
        return written

    def _flush(self) -> None:
        """Hand the waiting entries to one background write."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._batch = self._batch, []
        if batch:
            self.background(self._write_batch(batch))

    async def _write_batch(self, batch: list[Pending]) -> None:
        try:
            in_thread = await asyncio.to_thread(self._finish_and_write_in_thread, [(e, f) for e, f, _ in batch])
            writes = [self._write_elsewhere(entry, done) for (entry, _, _), done in zip(batch, in_thread, strict=True)]
            if all(isinstance(store, WritesInThread) for store in self.stores):  # nothing left to wait for:
                outcomes = [await write for write in writes]  # no task per entry
            else:
                outcomes = await asyncio.gather(*writes)
        except BaseException as e:  # the futures must end whatever happens: followers and logs wait on them
            for _, _, written in batch:
                if not written.done():
                    written.set_exception(e)
            raise
        finally:
            for entry, _, _ in batch:
                self._written(entry)
        for (_, _, written), outcome in zip(batch, outcomes, strict=True):
            written.set_result(outcome)

    async def _write_elsewhere(self, entry: Entry, in_thread: dict[Store, tuple[bool, str]] | str) -> Written:
        """The stores that do not write in the thread (Redis), after those that did;
        `in_thread` is their outcome, or why the entry was dropped."""
        if isinstance(in_thread, str):
            return Written(problem=in_thread)
        layers: list[str] = []
        problems: list[str] = []
        for store in self.stores:
            if store in in_thread:
                done, problem = in_thread[store]
            else:
                done, problem = await store.put(entry, self.expiry(store, entry)), ""
            if done:
                layers.append(store.layer)
            else:
                problems.append(f"{store.layer.upper()} {problem or 'write failed'}")
        return Written(tuple(layers), "; ".join(problems))

    def _finish_and_write_in_thread(
        self, batch: list[tuple[Entry, Callable[[Entry], None]]]
    ) -> list[dict[Store, tuple[bool, str]] | str]:
        """For each entry: whether each store that blocks took it, and its failure if not;
        or why `finish` dropped it."""
        outcomes: list[dict[Store, tuple[bool, str]] | str] = []
        for entry, finish in batch:
            try:
                finish(entry)
                outcomes.append({})
            except WriteCancelled as e:
                outcomes.append(str(e))
        kept = [
            (entry, outcome) for (entry, _), outcome in zip(batch, outcomes, strict=True) if isinstance(outcome, dict)
        ]
        for store in self.stores:
            if kept and isinstance(store, WritesInThread):
                results = store.put_many_sync([(entry, self.expiry(store, entry)) for entry, _ in kept])
                for (_, outcome), ok in zip(kept, results, strict=True):
                    outcome[store] = (ok, "" if ok else store.failure or "")
        return outcomes

    async def keys(self) -> list[str]:
        """Every key any store holds, sorted."""
        found: set[str] = set()
        for store in self.stores:
            found.update(await store.keys())
        return sorted(found)

    async def matching(self, prefix: str) -> list[str]:
        """The keys that start with `prefix` (keys are lower-case hex), sorted; none for ""."""
        prefix = prefix.strip().lower()
        return [key for key in await self.keys() if key.startswith(prefix)] if prefix else []

    async def copies(self, keys: Iterable[str] | None = None) -> dict[str, tuple[Entry, list[str]]]:
        """The entries under `keys` (default: every stored one), each as the nearest store
        has it, with the layers that hold it. For listings: unlike `find`, nothing is
        judged or back-filled."""
        wanted = None if keys is None else list(keys)
        found: dict[str, tuple[Entry, list[str]]] = {}
        for store in self.stores:
            for key in await store.keys() if wanted is None else wanted:
                if entry := await store.get(key):
                    found.setdefault(key, (entry, []))[1].append(store.layer)
        return found

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run store work off the request path, holding a reference until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Let pending writes finish (shutdown, tests); first the recordings concluded
        right after their answers were sent (AICache.response), already scheduled."""
        await asyncio.sleep(0)
        self._flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        for store in reversed(self.stores):
            await store.close()


class StoreSettings(Protocol):
    """What `open_cache` reads: the addon's `Settings`, or the CLI's flags."""

    @property
    def directory(self) -> str: ...
    @property
    def ttl(self) -> float: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def redis_timeout(self) -> float: ...
    @property
    def redis_prefix(self) -> str: ...
    @property
    def redis_pool(self) -> int: ...
    @property
    def max_body(self) -> int: ...
    @property
    def fixtures(self) -> str: ...
    @property
    def fixtures_writable(self) -> bool: ...


def open_cache(settings: StoreSettings, create: bool = True, fail_open: bool = True) -> TieredCache:
    """The configured stores, nearest first: the fixture directory when set (written only
    in recording modes), the cache directory (L1) and Redis when a URL is set. Raises
    ValueError for a Redis URL that cannot be used (the caller names the option or flag
    that set it).

    The proxy creates the directory and fails open: a directory that cannot be opened at
    all leaves L1 out with a warning. The CLI (`create=False`) opens only a directory
    that holds a cache, and (`fail_open=False`) gets the OS/SQLite error to report.
    """
    stores: list[Store] = []
    if settings.fixtures:
        stores.append(FixtureStore(settings.fixtures, settings.fixtures_writable))
    directory = Path(settings.directory).expanduser()
    if create or (directory / DBNAME).exists():
        try:
            stores.append(DiskStore(directory, layer="l1"))
        except (OSError, sqlite3.Error) as e:
            if not fail_open:
                raise
            logger.warning("ai-cache: cannot use cache directory %s (%s); L1 is off", settings.directory, e)
    if settings.redis_url:
        try:
            stores.append(
                RedisStore(
                    settings.redis_url,
                    settings.redis_timeout,
                    settings.redis_prefix,
                    settings.redis_pool,
                    layer="l2",
                    max_value=settings.max_body,  # larger: a peer with a larger max_body, or a zlib bomb
                )
            )
        except Exception as e:  # redis-py raises several types for a URL it cannot use
            raise ValueError(str(e)) from None
    return TieredCache(stores, settings.ttl)
