"""What a cache tier is: the interface `TieredCache` reads and writes through.

Every method is async at the boundary, so a store may block (disk) or wait on the
network (Redis) without the hooks knowing which. A store fails open: a failure is a
miss or a skipped write (with one warning per outage), never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .entry import Entry


class Store(Protocol):
    # The name of its position in headers and logs ("l1", "l2"), set by configuration.
    layer: str
    # Whether it drops entries at the TTL (memory shared by a team) or keeps them for
    # lookups to judge (local recordings that replay mode may still serve).
    drops_expired: bool

    @property
    def read_only(self) -> str | None:
        """Why it takes no writes for good (a read-only cache directory), None when it does."""

    async def get(self, key: str) -> Entry | None: ...

    async def put(self, entry: Entry, expire: float | None) -> bool: ...

    async def delete(self, key: str) -> bool: ...

    async def keys(self) -> list[str]: ...

    async def close(self) -> None: ...


@runtime_checkable
class WritesInThread(Protocol):
    """A store whose writes block: the tiered cache makes them in the worker thread that
    prepares the entries, a batch at a time, saving a thread hop per write."""

    failure: str | None

    def put_many_sync(self, items: Sequence[tuple[Entry, float | None]]) -> list[bool]: ...
