"""The disk store: diskcache on local disk, the embedded default and first tier. Writes
and large reads run in a worker thread; small reads run inline, being cheaper than the
thread hop (see `get`).

A store that breaks (unwritable directory, full disk, corrupt database) degrades to
"miss / skip the write" with one warning until it works again: never a failed request.
A directory that cannot be written at all (a read-only checkout or mount, a full disk)
is opened read-only: lookups go on, writes are off.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import diskcache
from diskcache.core import DBNAME

from .entry import Entry, EntryError, read_header
from .outage import Outage

logger = logging.getLogger(__name__)
T = TypeVar("T")
STORE_ERRORS = (OSError, sqlite3.Error, diskcache.Timeout)
READS = frozenset({"read", "listing"})
TIMEOUT = 1.0  # seconds SQLite waits for another writer's lock
# Decoded entries kept for hits read again: at most this many, each at most this large.
DECODED_ENTRIES = 256
DECODED_MAX_BYTES = 32 * 1024


class ReadOnlyCache(diskcache.Cache):
    """diskcache's own reader on a database opened read-only.

    `diskcache.Cache()` writes its settings when it opens, so it fails on a read-only
    directory and on a full disk. This reads them instead and keeps diskcache's lookup
    code. SQLite `mode=ro` still sees a write-ahead log a killed writer left behind, but
    needs to create the shared-memory file next to the database; where it cannot (a
    read-only mount of a cleanly closed cache, a full disk) `immutable=1` reads the
    database file alone, which then holds everything.
    """

    def __init__(self, directory: str) -> None:  # not super().__init__(): it writes
        self._directory = directory
        self._timeout = TIMEOUT
        self._local = threading.local()
        self._txn_id = None
        path = urllib.parse.quote(os.path.join(directory, DBNAME))
        for flag in ("mode=ro", "immutable=1"):
            self._uri = f"file:{path}?{flag}"
            try:
                settings = dict(self._sql("SELECT key, value FROM Settings").fetchall())
                self._sql("SELECT rowid FROM Cache LIMIT 1").fetchall()
                break
            except sqlite3.Error:
                self.close()
                if flag == "immutable=1":
                    raise
        disk = {key[5:]: value for key, value in settings.items() if key.startswith("disk_")}
        self._disk = diskcache.Disk(directory, **disk)
        for key, value in settings.items():  # as diskcache's reset() does
            setattr(self, key, value)

    @property
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = sqlite3.connect(self._uri, uri=True, timeout=self._timeout, isolation_level=None)
        return con


def _read_and_close(handle: BinaryIO) -> bytes:
    with handle:
        return handle.read()


class DiskStore:
    # Entries stay past the TTL: only a lookup judges them, so replay mode can still serve
    # them and a miss can say "expired".
    drops_expired = False

    def __init__(self, directory: str | Path, layer: str = "l1") -> None:
        """Opens (creating) the cache directory, read-only if it cannot be written;
        raises the OS/SQLite error if it cannot be read either."""
        self.layer = layer
        self.directory = Path(directory).expanduser()
        # Why writes are off for good (None: they are on).
        self.read_only: str | None = None
        try:
            # No eviction: recorded fixtures must not disappear behind the user's back.
            self._cache: diskcache.Cache = diskcache.Cache(
                str(self.directory), eviction_policy="none", size_limit=2**62, timeout=TIMEOUT
            )
        except STORE_ERRORS as e:
            try:
                self._cache = ReadOnlyCache(str(self.directory))
            except STORE_ERRORS:
                raise e from None
            self.read_only = "writes are off: the cache directory cannot be written"
            logger.warning(
                "ai-cache: cannot write to cache directory %s (%s): lookups are served from it, writes are off",
                self.directory,
                e,
            )
        # The last failure (None after a success): callers that must not fail open, like
        # the CLI, report it.
        self.failure: str | None = None
        self._decoded: dict[str, tuple[bytes, Entry]] = {}  # key -> the bytes last read, decoded
        self._outages = {
            kind: Outage(f"ai-cache: {layer.upper()} {kind} in {self.directory} work again")
            for kind in ("reads", "writes")
        }

    def _guarded(self, what: str, call: Callable[[], T], default: T) -> T:
        """Reads and writes fail and recover apart: a full disk still serves lookups."""
        outage = self._outages["reads" if what in READS else "writes"]
        try:
            result = call()
        except STORE_ERRORS as e:
            self.failure = f"{what} failed: {e}"
            outage.failed(f"ai-cache: {self.layer.upper()} {what} failed in {self.directory}, going on without it: {e}")
            return default
        outage.worked()
        self.failure = None
        return result

    def _writable(self) -> bool:
        if self.read_only:
            self.failure = self.read_only
        return not self.read_only

    # Synchronous API, for threads and the CLI.

    def get_sync(self, key: str) -> Entry | None:
        data = self._guarded("read", lambda: self._cache.get(key), None)
        entry = None if data is None else self._decode(key, data)
        if data is not None and entry is None:
            self.delete_sync(key)
        return entry

    def _decode(self, key: str, data: bytes) -> Entry | None:
        """The entry, or None (with a warning) for bytes that are no valid entry: the
        caller drops those, so each one warns once."""
        try:
            return Entry.from_bytes(data, key)
        except EntryError as e:
            logger.warning("ai-cache: discarding unreadable %s entry %s: %s", self.layer.upper(), key[:12], e)
            return None

    def _decode_known(self, key: str, data: bytes) -> Entry | None:
        """`_decode`, skipped when `data` is what the last read of `key` decoded (a memcmp
        instead of a checksum, a JSON parse and the checks): a hit read again and again."""
        known = self._decoded.get(key)
        if known is not None and known[0] == data:
            return known[1]
        entry = self._decode(key, data)
        if entry is not None and len(data) <= DECODED_MAX_BYTES:
            if len(self._decoded) >= DECODED_ENTRIES:
                del self._decoded[next(iter(self._decoded))]  # the oldest
            self._decoded[key] = (data, entry)
        return entry

    def put_sync(self, entry: Entry, expire: float | None) -> bool:
        return self.put_many_sync([(entry, expire)])[0]

    def put_many_sync(self, items: Sequence[tuple[Entry, float | None]]) -> list[bool]:
        """Many entries in one transaction: a write's BEGIN and COMMIT cost more than a
        small entry's insert. They are all written, or (a failed commit) none is."""
        if not self._writable():
            return [False] * len(items)
        encoded = [(entry.key, entry.to_bytes(), expire) for entry, expire in items]

        def write() -> bool:
            with self._cache.transact():
                for key, data, expire in encoded:
                    self._cache.set(key, data, expire=expire)
            return True

        return [self._guarded("write", write, False)] * len(items)

    def delete_sync(self, key: str) -> bool:
        return self._writable() and self._guarded("delete", lambda: self._cache.delete(key), False)

    def keys_sync(self) -> list[str]:
        return self._guarded("listing", lambda: list(self._cache.iterkeys()), [])

    def count_sync(self) -> int:
        """How many entries it holds (diskcache keeps the count: one small read)."""
        return self._guarded("listing", lambda: len(self._cache), 0)

    def headers(self, limit: int) -> list[dict[str, Any]]:
        """The headers (`Entry.header_dict`, no body) of at most `limit` entries, in key
        order: a bounded read for diagnostics. Entries that cannot be read are left out."""
        found: list[dict[str, Any]] = []
        keys: list[str] = self._guarded("listing", lambda: list(itertools.islice(self._cache.iterkeys(), limit)), [])
        for key in keys:
            value = self._guarded("read", functools.partial(self._cache.get, key, read=True), None)
            if value is None:
                continue
            with io.BytesIO(value) if isinstance(value, bytes) else value as handle:
                try:
                    found.append(read_header(handle))
                except (EntryError, OSError):
                    continue
        return found

    def close_sync(self) -> None:
        self._cache.close()

    # Async API for hooks.

    async def get(self, key: str) -> Entry | None:
        """Reads small entries inline and large ones in a worker thread.

        diskcache keeps values under 32 KiB inside SQLite (WAL mode: readers never wait
        for writers): that read measured 5 µs, a worker-thread round trip 70 µs. Larger
        values live in files of their own, opened here and read off the loop.
        """
        found = self._guarded("read", lambda: self._cache.get(key, read=True), None)
        data = found
        if found is not None and not isinstance(found, bytes):
            data = await asyncio.to_thread(self._guarded, "read", lambda: _read_and_close(found), None)
        entry = None if data is None else self._decode_known(key, data)
        if data is not None and entry is None:
            await self.delete(key)
        return entry

    async def put(self, entry: Entry, expire: float | None) -> bool:
        """Writes take a transaction and may wait for other writers: always in a thread."""
        return await asyncio.to_thread(self.put_sync, entry, expire)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete_sync, key)

    async def keys(self) -> list[str]:
        return await asyncio.to_thread(self.keys_sync)

    async def close(self) -> None:
        """Inline: diskcache's connections belong to the threads that opened them."""
        self.close_sync()
