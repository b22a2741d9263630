"""L1: diskcache on local disk, the embedded default. Writes and large reads run in a
worker thread; small reads run inline, being cheaper than the thread hop (see `get`).

A store that breaks (unwritable directory, full disk, corrupt database) degrades to
"miss / skip the write" with one warning until it works again: never a failed request.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import diskcache

from .entry import Entry, EntryError, read_header

logger = logging.getLogger(__name__)
T = TypeVar("T")
STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)


def _read_and_close(handle: BinaryIO) -> bytes:
    with handle:
        return handle.read()


class DiskStore:
    layer = "l1"

    def __init__(self, directory: str | Path) -> None:
        """Opens (creating) the cache directory; raises the OS/SQLite error if it cannot."""
        self.directory = Path(directory).expanduser()
        # No eviction: recorded fixtures must not disappear behind the user's back.
        self._cache = diskcache.Cache(
            str(self.directory), eviction_policy="none", size_limit=2**62, timeout=1
        )
        # The last failure while the store is failing (None when it works): callers that
        # must not fail open, like the CLI, report it.
        self.failure: str | None = None

    def _guarded(self, what: str, call: Callable[[], T], default: T) -> T:
        try:
            result = call()
        except STORE_ERRORS as e:
            if self.failure is None:
                logger.warning("ai-cache: L1 %s failed in %s, passing through: %s", what, self.directory, e)
            self.failure = f"{what} failed: {e}"
            return default
        if self.failure is not None:
            logger.warning("ai-cache: L1 in %s works again", self.directory)
            self.failure = None
        return result

    # Synchronous API, for threads and the CLI.

    def get_sync(self, key: str) -> Entry | None:
        data = self._guarded("read", lambda: self._cache.get(key), None)
        return None if data is None else self._decode(key, data)

    def _decode(self, key: str, data: bytes) -> Entry | None:
        """The entry, or None (with a warning) for bytes the next write will replace."""
        try:
            return Entry.from_bytes(data)
        except EntryError as e:
            logger.warning("ai-cache: discarding unreadable L1 entry %s: %s", key[:12], e)
            return None

    def put_sync(self, entry: Entry, expire: float | None) -> bool:
        data = entry.to_bytes()
        return self._guarded("write", lambda: self._cache.set(entry.key, data, expire=expire), False)

    def delete_sync(self, key: str) -> bool:
        return self._guarded("delete", lambda: self._cache.delete(key), False)

    def keys(self) -> Iterator[str]:
        yield from self._guarded("listing", lambda: list(self._cache.iterkeys()), [])

    def headers(self, limit: int) -> list[dict[str, Any]]:
        """The headers (`Entry.header_dict`, no body) of at most `limit` entries, in key
        order: a bounded read for diagnostics. Entries that cannot be read are left out."""
        found: list[dict[str, Any]] = []
        for key in self._guarded("listing", lambda: list(itertools.islice(self._cache.iterkeys(), limit)), []):
            value = self._guarded("read", lambda: self._cache.get(key, read=True), None)
            if value is None:
                continue
            with io.BytesIO(value) if isinstance(value, bytes) else value as handle:
                try:
                    found.append(read_header(handle))
                except (EntryError, OSError):
                    continue
        return found

    def close(self) -> None:
        self._cache.close()

    # Async API for hooks.

    async def get(self, key: str) -> Entry | None:
        """Reads small entries inline and large ones in a worker thread.

        diskcache keeps values under 32 KiB inside SQLite (WAL mode: readers never wait
        for writers): that read measured 5 µs, a worker-thread round trip 70 µs. Larger
        values live in files of their own, opened here and read off the loop.
        """
        found = self._guarded("read", lambda: self._cache.get(key, read=True), None)
        if found is None or isinstance(found, bytes):
            return None if found is None else self._decode(key, found)
        data = await asyncio.to_thread(self._guarded, "read", lambda: _read_and_close(found), None)
        return None if data is None else self._decode(key, data)

    async def put(self, entry: Entry, expire: float | None) -> bool:
        """Writes take a transaction and may wait for other writers: always in a thread."""
        return await asyncio.to_thread(self.put_sync, entry, expire)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, key)
