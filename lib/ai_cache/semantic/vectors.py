"""Where question vectors live: L1, an exact in-memory index persisted next to the disk
store, and L2, a RediSearch index in the shared Redis.

A vector is stored under its entry's key, with its partition, its question text (for
the lexical guard) and its entry's `created_at` (for the TTL). Searches stay inside one
partition and return the best few candidates; the caller judges them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ..disk import STORE_ERRORS, TIMEOUT
from ..entry import KEY_PATTERN
from ..outage import Outage
from ..redis_store import RedisStore

logger = logging.getLogger(__name__)
SUBDIRECTORY = "semantic"  # of the cache directory
HITS = "semantic-hits"  # L1's counter of semantic hits, beside the vectors
# A search over more than this many numbers (vectors x dimensions) runs in a worker
# thread: about 1 ms of numpy on the machine measured (10k x 384 took 0.34 ms).
INLINE_WORK = 8_000_000


@dataclass(frozen=True)
class Candidate:
    key: str
    text: str
    created_at: float
    similarity: float
    layer: str


class Partition:
    """The vectors of one partition as rows of a matrix (grown by doubling; a removal
    moves the last row into the gap). Its lock keeps a search in a worker thread apart
    from writes."""

    def __init__(self, dims: int) -> None:
        self.matrix = np.empty((16, dims), dtype=np.float32)
        self.keys: list[str] = []
        self.texts: list[str] = []
        self.created: list[float] = []
        self.rows: dict[str, int] = {}
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, text: str, created_at: float, vector: np.ndarray) -> None:
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                row = len(self.keys)
                if row == len(self.matrix):
                    self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
                self.keys.append(key)
                self.texts.append(text)
                self.created.append(created_at)
                self.rows[key] = row
            self.matrix[row] = vector
            self.texts[row], self.created[row] = text, created_at

    def remove(self, key: str) -> None:
        with self.lock:
            row = self.rows.pop(key, None)
            if row is None:
                return
            last = len(self.keys) - 1
            if row != last:
                self.matrix[row] = self.matrix[last]
                self.keys[row], self.texts[row], self.created[row] = (
                    self.keys[last],
                    self.texts[last],
                    self.created[last],
                )
                self.rows[self.keys[row]] = row
            del self.keys[last], self.texts[last], self.created[last]

    def search(self, vector: np.ndarray, k: int) -> list[Candidate]:
        with self.lock:
            count = len(self.keys)
            if not count or vector.shape[0] != self.matrix.shape[1]:
                return []
            scores = self.matrix[:count] @ vector
            best = np.argpartition(-scores, k - 1)[:k] if count > k else np.arange(count)
            best = best[np.argsort(-scores[best])]
            return [
                Candidate(self.keys[i], self.texts[i], self.created[i], float(scores[i]), "l1") for i in best.tolist()
            ]


class LocalVectors:
    """L1's vectors: all in memory by partition for exact numpy search, persisted in a
    diskcache in the cache directory's `semantic/` and read back at start (`load_sync`).
    Disk failures leave the memory index working, with one warning per outage."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser() / SUBDIRECTORY
        self._disk = diskcache.Cache(str(self.directory), eviction_policy="none", size_limit=2**62, timeout=TIMEOUT)
        self.partitions: dict[str, Partition] = {}
        self._where: dict[str, str] = {}  # key -> partition
        self.loaded = False
        self._outage = Outage(f"ai-cache: semantic index in {self.directory} works again")

    def _guarded(self, what: str, call: Any, default: Any = None) -> Any:
        try:
            result = call()
        except STORE_ERRORS as e:
            self._outage.failed(f"ai-cache: semantic index {what} failed in {self.directory}: {e}")
            return default
        self._outage.worked()
        return result

    def load_sync(self, expired_before: float = 0.0) -> int:
        """Read every stored vector into memory; how many. Values are written as bytes (a
        JSON head, a newline, float32s), like entries; any other value is skipped, and so
        is a vector of another size than its partition's (they are normalised again: a
        corrupt one must not score above 1). Vectors of entries created before
        `expired_before` (expired by the TTL: they went, their questions stayed) are deleted."""
        expired = []
        for key in self._guarded("listing", lambda: list(self._disk.iterkeys()), []):
            value = self._guarded("read", lambda k=key: self._disk.get(k))
            if isinstance(value, bytes) and KEY_PATTERN.fullmatch(str(key)):
                head, _, data = value.partition(b"\n")
                try:
                    fields = json.loads(head)
                    partition, text, created_at = str(fields["partition"]), str(fields["text"]), fields["created_at"]
                    vector = np.frombuffer(data, dtype=np.float32)
                except (ValueError, KeyError, TypeError):
                    continue
                norm = float(np.linalg.norm(vector)) if vector.size and np.isfinite(vector).all() else 0.0
                known = self.partitions.get(partition)
                if known is not None and known.matrix.shape[1] != vector.size:
                    continue
                if not np.isfinite(norm) or norm == 0 or not isinstance(created_at, float | int):
                    continue
                if created_at < expired_before:
                    expired.append(key)
                else:
                    self._remember(key, partition, text, float(created_at), vector / norm)
        self.remove_sync(expired)
        self.loaded = True
        return len(self._where)

    def _remember(self, key: str, partition: str, text: str, created_at: float, vector: np.ndarray) -> None:
        old = self._where.get(key)
        if old is not None and old != partition:
            self.partitions[old].remove(key)
        self._where[key] = partition
        self.partitions.setdefault(partition, Partition(len(vector))).add(key, text, created_at, vector)

    def add_sync(self, key: str, partition: str, text: str, created_at: float, vector: np.ndarray) -> None:
        self._remember(key, partition, text, created_at, vector)
        head = json.dumps({"partition": partition, "text": text, "created_at": created_at}).encode()
        value = head + b"\n" + vector.astype(np.float32).tobytes()
        self._guarded("write", lambda: self._disk.set(key, value))

    def remove_sync(self, keys: Iterable[str]) -> int:
        """Forget vectors, in memory and on disk; how many were on disk."""
        removed = 0
        for key in keys:
            partition = self._where.pop(key, None)
            if partition is not None:
                self.partitions[partition].remove(key)
            removed += bool(self._guarded("delete", lambda k=key: self._disk.delete(k), False))
        return removed

    async def search(self, partition: str, vector: np.ndarray, k: int) -> list[Candidate]:
        """The best `k` of a partition; in a worker thread when the partition is large."""
        found = self.partitions.get(partition)
        if found is None or not len(found):
            return []
        if len(found) * vector.shape[0] <= INLINE_WORK:
            return found.search(vector, k)
        return await asyncio.to_thread(found.search, vector, k)

    def clear_sync(self) -> int:
        """Forget every vector, also those whose entries went by themselves (expired,
        evicted); how many. The hit count stays."""
        keys = [k for k in self._guarded("listing", lambda: list(self._disk.iterkeys()), []) if k != HITS]
        self.partitions.clear()
        self._where.clear()
        return self.remove_sync(keys)

    def count_hit_sync(self) -> None:
        self._guarded("write", lambda: self._disk.incr(HITS))

    def counts_sync(self) -> tuple[int, int]:
        """(vectors stored, semantic hits counted) on disk."""
        total = self._guarded("listing", lambda: len(self._disk), 0)
        hits = self._guarded("read", lambda: self._disk.get(HITS, 0), 0)
        return total - (HITS in self._disk), int(hits)

    def close(self) -> None:
        self._disk.close()


def local_vectors(directory: str | Path, create: bool = True) -> LocalVectors | None:
    """The L1 vectors of a cache directory, None when it cannot be used (one warning) or,
    without `create`, has none."""
    if not create and not (Path(directory).expanduser() / SUBDIRECTORY).is_dir():
        return None
    try:
        return LocalVectors(directory)
    except STORE_ERRORS as e:
        logger.warning("ai-cache: no semantic index in %s (%s): semantic lookups use L2 only", directory, e)
        return None


def documents(answer: Any) -> list[dict[Any, Any]]:
    """The fields of each document in an FT.SEARCH answer, RESP2 (a flat list) or RESP3 (a map)."""
    if isinstance(answer, dict):
        results = answer.get(b"results", answer.get("results")) or []
        return [r.get(b"extra_attributes", r.get("extra_attributes")) or {} for r in results if isinstance(r, dict)]
    if isinstance(answer, list):
        return [dict(zip(f[::2], f[1::2], strict=False)) if isinstance(f, list) else {} for f in answer[2::2]]
    return []


def candidates(answer: Any) -> list[Candidate]:
    """An FT.SEARCH answer's candidates. An expired document can come back without its
    fields for a while: it is skipped (and the TTL is judged from `created_at` anyway)."""
    found = []
    for values in documents(answer):
        try:
            key, text = values[b"key"].decode(), values[b"text"].decode("utf-8", "replace")
            created, distance = float(values[b"created_at"]), float(values[b"distance"])
        except (KeyError, ValueError, AttributeError):
            continue
        if KEY_PATTERN.fullmatch(key):
            found.append(Candidate(key, text, created, 1.0 - distance, "l2"))
    return found


def search_query(partition: str, k: int) -> str:
    return f"(@partition:{{{partition}}})=>[KNN {k} @vector $vec AS distance]"


class RedisVectors:
    """L2's vectors: HASH documents in a RediSearch index per vector size, a TAG field
    for the partition, KNN within it. Every call goes through the store's fail-open
    `with_redis`; a Redis without the search module (or a cluster) leaves L2 out."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        base = store.prefix.rstrip(":") or "ai-cache"
        self.index_prefix = f"{base}-semantic-"  # never under the entries' prefix
        self.available: bool | None = None  # None: not known yet (Redis unreachable so far)
        self._indexes: set[int] = set()

    def index(self, dims: int) -> str:
        return f"{self.index_prefix}{dims}"

    def document(self, dims: int, key: str) -> str:
        return f"{self.index(dims)}:{key}"

    async def detect(self) -> bool:
        """Whether Redis has the search module; asked until Redis answers, then once."""
        if self.available is None:
            if isinstance(self.store.client, RedisCluster):
                self.available = False
            else:

                async def probe(client: Any) -> bool:
                    try:
                        await client.execute_command("FT._LIST")
                    except ResponseError:  # an unknown command: plain Redis
                        return False
                    return True

                self.available = await self.store.with_redis(probe, None, "semantic")
            if self.available is False:
                logger.info(
                    "ai-cache: %s has no search module (RediSearch): semantic lookups stay local", self.store.name
                )
        return bool(self.available)

    async def _ensure_index(self, dims: int) -> bool:
        if dims in self._indexes:
            return True

        async def create(client: Any) -> bool:
            try:
                await client.execute_command(
                    "FT.CREATE", self.index(dims), "ON", "HASH", "PREFIX", "1", self.index(dims) + ":",
                    "SCHEMA", "partition", "TAG", "vector", "VECTOR", "HNSW", "6",
                    "TYPE", "FLOAT32", "DIM", str(dims), "DISTANCE_METRIC", "COSINE",
                )  # fmt: skip
            except ResponseError as e:
                if "already exists" not in str(e).lower():
                    raise
            return True

        if await self.store.with_redis(create, False, "semantic"):
            self._indexes.add(dims)
            return True
        return False

    async def add(
        self, key: str, partition: str, text: str, created_at: float, vector: np.ndarray, expire: float | None
    ) -> bool:
        if not await self.detect() or not await self._ensure_index(len(vector)):
            return False
        doc = self.document(len(vector), key)
        fields = {"partition": partition, "key": key, "text": text, "created_at": repr(created_at)}

        async def write(client: Any) -> bool:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(doc, mapping={**fields, "vector": vector.tobytes()})
                if expire:
                    pipe.expire(doc, max(1, round(expire)))
                await pipe.execute()
            return True

        return await self.store.with_redis(write, False, "semantic")

    async def search(self, partition: str, vector: np.ndarray, k: int) -> list[Candidate]:
        if not await self.detect() or not await self._ensure_index(len(vector)):
            return []
        query = [
            "FT.SEARCH", self.index(len(vector)), search_query(partition, k),
            "PARAMS", "2", "vec", vector.tobytes(), "SORTBY", "distance", "ASC",
            "RETURN", "4", "key", "text", "created_at", "distance", "LIMIT", "0", str(k), "DIALECT", "2",
        ]  # fmt: skip
        dims = len(vector)

        async def knn(client: Any) -> Any:
            try:
                return await client.execute_command(*query)
            except ResponseError as e:  # gone (a flush, a restart): Redis is fine, make it again
                if not any(gone in str(e).lower() for gone in ("no such index", "unknown index")):
                    raise
                self._indexes.discard(dims)
                return None

        return candidates(await self.store.with_redis(knn, None, "semantic"))

    async def remove(self, keys: list[str]) -> int:
        """Delete the documents of `keys` from every index this prefix has."""
        if not keys or not await self.detect():
            return 0

        async def delete(client: Any) -> int:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in await client.execute_command("FT._LIST")]
            sizes = [n[len(self.index_prefix) :] for n in names if n.startswith(self.index_prefix)]
            docs = [self.document(int(dims), key) for dims in sizes if re.fullmatch(r"\d+", dims) for key in keys]
            return int(await client.delete(*docs)) if docs else 0

        return await self.store.with_redis(delete, 0, "semantic")

    async def clear(self) -> bool:
        """Drop every index of this prefix with its documents (FT.DROPINDEX ... DD)."""
        if not await self.detect():
            return False

        async def drop(client: Any) -> bool:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in await client.execute_command("FT._LIST")]
            for name in names:
                if name.startswith(self.index_prefix):
                    await client.execute_command("FT.DROPINDEX", name, "DD")
            self._indexes.clear()
            return True

        return await self.store.with_redis(drop, False, "semantic")


async def forget_questions(local: LocalVectors | None, remote: RedisVectors | None, keys: list[str] | None) -> None:
    """Drop the questions of `keys` (None: every question, also those whose entries went
    by themselves) from L1 and L2: they go with their entries (CLI and proxy commands)."""
    if local is not None:
        await asyncio.to_thread(local.clear_sync if keys is None else functools.partial(local.remove_sync, keys))
    if remote is not None:
        await (remote.clear() if keys is None else remote.remove(keys))
