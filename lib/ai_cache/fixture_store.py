"""Fixture files as a cache layer (`ai_cache_fixtures`): a directory of export-format
files, one per entry, read and written by the proxy, in front of L1 and L2.

Lookups never touch the disk on the event loop: every file is parsed once, in a worker
thread, into an in-memory index (key -> entry), built when the store opens and scanned
again on a miss, so files added, edited or deleted while the proxy runs count from the
next miss on. A scan stats every file and parses only the new and changed ones; it is
skipped while the directory's own time has not changed since a scan that began well
after that time (a file made within the same tick of file times leaves it as it was).
Editing a known file in place does not change that time: the edit counts from the next
scan. Files that did not load are checked on every miss, so mending one counts at once.

Writes (record and refresh modes only: replay never changes the directory) go to a
temporary file in the directory, renamed over the fixture's stable name: several proxies
on one directory (pytest -n) never leave a half-written file, the last writer wins. An
answer the file already holds is not written again, so re-recording it leaves the file,
its `created_at` and its timing, untouched.

The store remembers which files it served or wrote (`used`): what a run never used
(`unused`) is what `ai-cache prune-unused` offers to delete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .entry import Entry
from .fixtures import FixtureError, dumps, file_name, from_fixture, load_file, remove_stale_temporaries, write_new

logger = logging.getLogger(__name__)
# Where the last run's unused fixture names are listed, one per line, for prune-unused.
UNUSED_LIST = ".ai-cache-unused"
# A directory time this close to a scan's start may be shared by a change after it (file
# times in ticks: 2 s on FAT, 1 s on HFS+ and ext3; a file server's skew): such a scan is
# not trusted to be current.
SETTLED_NS = 3_000_000_000


@dataclass(frozen=True)
class Indexed:
    name: str
    stamp: tuple[int, int]  # (mtime_ns, size): a file whose stamp changed is parsed again
    entry: Entry


def same_answer(a: Entry, b: Entry) -> bool:
    return (a.status, a.format, a.body, a.headers) == (b.status, b.format, b.body, b.headers)


class FixtureStore:
    # Fixtures stay whatever their age: a committed recording must keep replaying.
    drops_expired = False

    def __init__(self, directory: str | Path, writable: bool, layer: str = "fixtures") -> None:
        self.layer = layer
        self.directory = Path(directory).expanduser()
        self.writable = writable
        self.failure: str | None = None
        self.used: set[str] = set()
        self._files: dict[str, Indexed] = {}  # file name -> entry
        self._by_key: dict[str, Indexed] = {}
        # Files that do not load, warned about once per version: (stamp, why). The proxy's
        # log may be a temporary file: runs report these (`skipped`) to their user.
        self._rejected: dict[str, tuple[tuple[int, int], str]] = {}
        self._scan_lock = threading.Lock()
        self._scanned: tuple[int, int] | None = None  # (mtime_ns, inode) of the directory a scan saw
        umask = os.umask(0)
        os.umask(umask)
        self._file_mode = 0o666 & ~umask
        self._ready = threading.Event()
        threading.Thread(target=self._first_scan, name="ai-cache-fixtures", daemon=True).start()

    def _first_scan(self) -> None:
        try:
            if self.writable:
                self.directory.mkdir(parents=True, exist_ok=True)
                if removed := remove_stale_temporaries(self.directory, time.time()):
                    logger.info("ai-cache: removed %d unfinished fixture writes from %s", len(removed), self.directory)
            elif not self.directory.is_dir():
                logger.warning(
                    "ai-cache: fixture directory %s does not exist: no fixture will be served", self.directory
                )
            self.rescan()
            logger.info("ai-cache: %d fixtures in %s", len(self._by_key), self.directory)
        except OSError as e:
            logger.warning("ai-cache: cannot use fixture directory %s (%s)", self.directory, e.strerror or e)
        finally:
            self._ready.set()

    async def _wait_ready(self) -> None:
        if not self._ready.is_set():
            await asyncio.to_thread(self._ready.wait)

    def _stat(self, path: Path) -> os.stat_result | None:
        try:
            return path.stat()
        except FileNotFoundError:
            return None

    def _current(self, directory: tuple[int, int] | None) -> bool:
        """Whether the index still describes the directory: its time is the one a trusted
        scan saw, and no file that did not load has changed since."""
        if directory is None or directory != self._scanned:
            return False
        for name, (stamp, _) in self._rejected.items():
            stat = self._stat(self.directory / name)
            if stat is None or (stat.st_mtime_ns, stat.st_size) != stamp:
                return False
        return True

    def rescan(self) -> None:
        """Bring the index in step with the directory (blocking: call in a thread)."""
        with self._scan_lock:
            started = time.time_ns()
            found = self._stat(self.directory)  # before the listing: a change during it moves the time on
            directory = (found.st_mtime_ns, found.st_ino) if found else None
            if self._current(directory):
                return
            files: dict[str, Indexed] = {}
            rejected: dict[str, tuple[tuple[int, int], str]] = {}
            try:
                listing = [e for e in os.scandir(self.directory) if e.name.endswith(".json") and e.is_file()]
            except FileNotFoundError:
                listing = []
            for item in sorted(listing, key=lambda e: e.name):
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                stamp = (stat.st_mtime_ns, stat.st_size)
                known = self._files.get(item.name)
                bad = self._rejected.get(item.name)
                if known is not None and known.stamp == stamp:
                    files[item.name] = known
                elif bad is not None and bad[0] == stamp:
                    rejected[item.name] = bad
                else:
                    try:
                        files[item.name] = Indexed(item.name, stamp, load_file(Path(item.path)))
                    except FixtureError as e:
                        rejected[item.name] = (stamp, str(e))
                        logger.warning("ai-cache: fixture %s skipped: %s", item.path, e)
            by_key: dict[str, Indexed] = {}
            for indexed in files.values():
                by_key.setdefault(indexed.entry.key, indexed)
            self._files, self._by_key = files, by_key  # readers see the old index or the new one
            self._rejected = rejected
            self._scanned = directory if directory and directory[0] < started - SETTLED_NS else None

    async def get(self, key: str) -> Entry | None:
        await self._wait_ready()
        found = self._by_key.get(key)
        if found is None:
            await asyncio.to_thread(self.rescan)
            found = self._by_key.get(key)
        if found is None:
            return None
        self.used.add(found.name)
        return found.entry

    @property
    def read_only(self) -> str | None:
        return None if self.writable else "fixture files are written in record and refresh modes only"

    def put_sync(self, entry: Entry, expire: float | None) -> bool:
        """Write the entry's file unless it holds this answer already (blocking)."""
        if not self.writable:
            return False  # replay and off: the directory is read, never written
        self._ready.wait()
        name = file_name(entry)
        data = dumps(entry)
        written = from_fixture(json.loads(data))  # as the file gives it back: no credentials, times rounded
        known = self._files.get(name)
        if known is not None and known.entry.key == entry.key and same_answer(known.entry, written):
            self.used.add(name)
            return True
        try:
            write_new(self.directory / name, data, self._file_mode)
            stat = (self.directory / name).stat()
        except OSError as e:
            self.failure = f"cannot write {self.directory / name}: {e.strerror or e}"
            logger.warning("ai-cache: %s", self.failure)
            return False
        self.failure = None
        with self._scan_lock:
            indexed = Indexed(name, (stat.st_mtime_ns, stat.st_size), written)
            self._files = {**self._files, name: indexed}
            self._by_key = {**self._by_key, entry.key: indexed}
            self._rejected = {other: bad for other, bad in self._rejected.items() if other != name}
        self.used.add(name)
        return True

    def put_many_sync(self, items: Sequence[tuple[Entry, float | None]]) -> list[bool]:
        """One file each: a file is its own transaction."""
        return [self.put_sync(entry, expire) for entry, expire in items]

    async def put(self, entry: Entry, expire: float | None) -> bool:
        return await asyncio.to_thread(self.put_sync, entry, expire)

    async def delete(self, key: str) -> bool:
        await self._wait_ready()
        found = self._by_key.get(key)
        if found is None or not self.writable:
            return False
        await asyncio.to_thread((self.directory / found.name).unlink, True)
        await asyncio.to_thread(self.rescan)
        return True

    async def keys(self) -> list[str]:
        await self._wait_ready()
        return list(self._by_key)

    def headers(self, limit: int) -> list[dict[str, Any]]:
        """The headers of at most `limit` fixtures, for the nearest-recording search."""
        return [indexed.entry.header_dict() for indexed in list(self._files.values())[:limit]]

    def name_of(self, key: str) -> str | None:
        """The file holding `key`, for reports."""
        found = self._by_key.get(key)
        return found.name if found else None

    @property
    def skipped(self) -> dict[str, str]:
        """The fixture files in the directory that do not load, and why."""
        return {name: why for name, (_, why) in self._rejected.items()}

    def unused(self) -> list[str]:
        """The fixture files in the directory this run neither served nor wrote."""
        return sorted(set(self._files) - self.used)

    async def close(self) -> None:
        await self._wait_ready()


# The unused list: written by the run's owner (the pytest plugin, with-ai-cache), read by prune-unused.


def fixture_names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.json") if p.is_file()}


def write_unused(directory: Path, used: set[str], skipped: Collection[str] = ()) -> list[str]:
    """List the fixture files of `directory` not in `used` in its UNUSED_LIST; returns them.
    A file `skipped` (it does not load) is not unused: it needs mending, not deleting."""
    unused = sorted(fixture_names(directory) - used - set(skipped))
    if directory.is_dir():
        umask = os.umask(0)
        os.umask(umask)
        write_new(directory / UNUSED_LIST, "".join(f"{name}\n" for name in unused).encode(), 0o666 & ~umask)
    return unused


def read_unused(directory: Path) -> list[str]:
    """The names the last run listed that are still fixture files here (never a path elsewhere)."""
    try:
        listed = (directory / UNUSED_LIST).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    present = fixture_names(directory)
    return sorted(name for name in set(listed) if name in present and "/" not in name)
