"""The Redis store: shared by a team or CI fleet (the second tier by default), behind one
fail-open `with_redis` wrapper.

Every Redis call goes through `RedisStore.with_redis`: it bounds the call by the
timeout, turns every failure into the caller's default, and keeps a circuit breaker so
a Redis that is down costs one timeout per cool-down, not one per request. Only signs of
a Redis that is down open the breaker: all connections busy (a healthy Redis under
load) and refused writes (out of memory, a read-only replica, while reads work) do not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, OutOfMemoryError, ReadOnlyError

from .entry import KEY_PATTERN, Entry, EntryError
from .outage import Outage

logger = logging.getLogger(__name__)
T = TypeVar("T")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Large entries are zlib-compressed in Redis: SSE streams shrink ~75x at level 1 (measured
# on an OpenAI-style 7 MB stream: 7.5 ms to compress, 8 ms to decompress, in a thread),
# which saves the shared server's memory and the network between proxy and Redis.
COMPRESSED = b"AICZ"
COMPRESS_FROM = 64 * 1024
# Concurrent calls (= connections) per proxy. redis-py's async pool refuses the 101st by
# default, which made a healthy Redis look down under 150 clients; a Redis serves 10k.
DEFAULT_POOL = 256
# The most a compressed value may inflate to: a proxy writes nothing larger than its
# ai_cache_max_body, but anyone with access to Redis may plant a zlib bomb.
DEFAULT_MAX_VALUE = 1 << 30
WRITE_REFUSALS = (OutOfMemoryError, ReadOnlyError)


def redact(url: str) -> str:
    """The URL without its password (in the userinfo or the query), for log lines."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at:
        user = creds.split(":", 1)[0]
        rest = f"{user + ':' if user else ''}***@{host}"
    return scheme + sep + re.sub(r"(?i)((?:^|[?&])(?:ssl_)?password=)[^&]*", r"\1***", rest)


def encoded(entry: Entry) -> bytes:
    """The Redis value: the entry's bytes, compressed from COMPRESS_FROM encoded bytes on
    (the request copy and chunk list count, not only the answer)."""
    data = entry.to_bytes()
    return COMPRESSED + zlib.compress(data, 1) if len(data) >= COMPRESS_FROM else data


class TooLarge(Exception):
    """A compressed value inflating past the reader's bound: not read, yet not corrupt
    (a proxy with a larger ai_cache_max_body may have written it), so not deleted."""


def inflated(data: bytes, limit: int) -> bytes:
    """`data` decompressed, at most `limit` bytes of it (TooLarge beyond)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit:
        raise TooLarge(f"it inflates past {limit} bytes")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def connect(url: str, timeout: float, pool: int) -> Any:
    """A redis.asyncio client for `url`; `redis+cluster://host:port` selects Redis Cluster."""
    options: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=pool)
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    # One immediate retry on a broken connection only: a pooled connection a restarted Redis
    # closed fails once, and must not open the breaker. Timeouts are never retried (that
    # would double the bound on a slow Redis): the breaker decides when to ask again.
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(url, retry=retry, **options)


class CircuitBreaker:
    """Closed until a failure; then open for a cool-down that doubles while failures go on.

    When the cool-down ends a single probe is let through; its outcome closes or reopens.
    Only the probe closes it: a call admitted before it opened and answered after proves
    nothing (such calls closed it 6 ms after it opened, over and over). Callers pass
    `probe` = whether the breaker was open when their call was allowed.
    """

    def __init__(self, name: str, base: float = 1.0, cap: float = 30.0) -> None:
        self.name = name
        self.base, self.cap = base, cap
        self.cooldown = 0.0
        self.open_until = 0.0
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.cooldown > 0

    def allow(self) -> bool:
        if not self.is_open:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self, probe: bool) -> None:
        if not (self.is_open and probe):
            return
        logger.warning("ai-cache: %s is back, circuit closed", self.name)
        self.cooldown = 0.0
        self.probing = False

    def cancelled(self, probe: bool) -> None:
        """A call ended without an answer either way: if it was the probe, let the next one probe."""
        if probe:
            self.probing = False

    def failure(self, error: BaseException, probe: bool) -> None:
        if probe:
            self.cooldown = min(self.cap, self.cooldown * 2)
        elif not self.is_open:
            logger.warning(
                "ai-cache: %s failed (%s), skipping it for a while: requests go on without it",
                self.name,
                describe(error),
            )
            self.cooldown = self.base
        else:  # a call that started before the breaker opened: already counted
            return
        self.open_until = time.monotonic() + self.cooldown
        self.probing = False


def describe(error: BaseException) -> str:
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class RedisStore:
    drops_expired = True  # memory shared by a team: entries go at the TTL
    read_only: str | None = None  # Redis refusing writes is an outage, not for good

    def __init__(
        self,
        url: str,
        timeout: float,
        prefix: str,
        pool: int = DEFAULT_POOL,
        layer: str = "l2",
        max_value: int = DEFAULT_MAX_VALUE,
    ) -> None:
        self.layer = layer
        self.max_value = max_value
        self.timeout = timeout
        self.prefix = prefix
        self.client = connect(url, timeout, pool)
        self.name = f"Redis {layer.upper()} at {redact(url)}"
        self.breaker = CircuitBreaker(self.name)
        # One slot per pooled connection: a call waits (bounded) for a free one instead of
        # failing, and a wait that runs out is a skipped call, not Redis being down.
        self.slots = asyncio.Semaphore(pool)
        self.refusing = Outage(f"ai-cache: {self.name} accepts writes again")
        self.on_error: Callable[[str], None] | None = None  # told the op of each failed call (metrics)

    async def with_redis(
        self, op: Callable[[Any], Awaitable[T]], default: T, name: str = "other", blocks: float = 0.0
    ) -> T:
        """Run `op(client)` bounded by the timeout (plus `blocks`, the seconds a call that
        waits by design may wait: a pub/sub read); any failure yields `default` (and
        `on_error(name)`).

        Waiting for a free connection is bounded by the timeout too, apart from the call."""
        if not self.breaker.allow():
            return default
        probe = self.breaker.is_open  # when open, only the probe is allowed
        connected = False
        try:
            connected = await self._free_connection()
            if not connected:  # all busy: skip this call
                self.breaker.cancelled(probe)
                return default
            result = await asyncio.wait_for(op(self.client), self.timeout + blocks)
        except asyncio.CancelledError:
            self.breaker.cancelled(probe)
            raise
        except MaxConnectionsError:  # a cluster node's pool is full: busy, not down
            self.breaker.cancelled(probe)
            return default
        except WRITE_REFUSALS as e:  # it answered: reads still work
            self.breaker.success(probe)
            self._failed(name)
            self.refusing.failed(
                f"ai-cache: {self.name} refuses writes ({describe(e)}); lookups go on, new entries stay local"
            )
            return default
        except Exception as e:  # fail open: no Redis problem may reach a request
            self.breaker.failure(e, probe)
            self._failed(name)
            return default
        finally:
            if connected:
                self.slots.release()
        self.breaker.success(probe)
        return result

    def _failed(self, name: str) -> None:
        if self.on_error is not None:
            self.on_error(name)

    async def _free_connection(self) -> bool:
        """Take a connection slot, waiting at most the timeout; False if none came free."""
        if not self.slots.locked():
            return await self.slots.acquire()  # at once, without a task for the timeout
        try:
            return await asyncio.wait_for(self.slots.acquire(), self.timeout)
        except TimeoutError:
            return False

    def redis_key(self, key: str) -> str:
        return self.prefix + key

    async def get(self, key: str) -> Entry | None:
        data = await self.with_redis(lambda r: r.get(self.redis_key(key)), None, "get")
        if data is None:
            return None
        if not isinstance(data, bytes):  # decode_responses=true in the URL: the value may be fine
            logger.warning(
                "ai-cache: %s value for %s is %s, not bytes", self.layer.upper(), key[:12], type(data).__name__
            )
            return None
        try:
            if data.startswith(COMPRESSED):
                data = await asyncio.to_thread(inflated, data[len(COMPRESSED) :], self.max_value)
            entry = Entry.from_bytes(data, key)
        except TooLarge as e:
            logger.warning("ai-cache: skipping %s value for %s: %s", self.layer.upper(), key[:12], e)
            return None
        except (EntryError, zlib.error) as e:
            logger.warning("ai-cache: discarding unreadable %s value for %s: %s", self.layer.upper(), key[:12], e)
            await self.delete(key)
            return None
        return entry

    async def put(self, entry: Entry, expire: float | None) -> bool:
        ex = max(1, round(expire)) if expire else None
        data = await asyncio.to_thread(encoded, entry)
        written = bool(await self.with_redis(lambda r: r.set(self.redis_key(entry.key), data, ex=ex), False, "set"))
        if written:
            self.refusing.worked()
        return written

    async def delete(self, key: str) -> bool:
        return bool(await self.with_redis(lambda r: r.delete(self.redis_key(key)), 0, "delete"))

    async def keys(self) -> list[str]:
        """Every cache key under the prefix (SCAN, never KEYS: a shared Redis stays responsive)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "*"

        async def scan(client: Any) -> list[bytes]:
            return [k async for k in client.scan_iter(match=pattern, count=1000)]

        found: list[bytes] = await self.with_redis(scan, [], "scan")
        keys = (k.decode()[len(self.prefix) :] for k in found)
        return [k for k in keys if KEY_PATTERN.fullmatch(k)]  # not another tool's keys, nor vectors

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.aclose(), self.timeout)
        except Exception:  # closing a broken connection must not fail shutdown
            pass
