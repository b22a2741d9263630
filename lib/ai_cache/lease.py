"""Fleet-wide single flight: one upstream call per key across every proxy sharing a Redis L2.

The proxy that leads a key takes a short lease in Redis (`SET lease token NX PX`), renews
it while the upstream call runs and deletes it (only if still its own) once the answer's
write ended, then publishes the key. Identical requests on other proxies wait, bounded,
for the entry to appear in L2: woken by that message, or by polling when pub/sub is not
available. A leader that dies lets its lease expire and a waiter takes over. Every call
goes through the store's fail-open `with_redis`: a Redis that is down or slow makes
`acquire` answer None, and the proxy falls back to its own single flight.

The lease key and the entry key share a cluster slot: the lease key's hash tag is the
entry key itself (or the entry key's own hash tag, when its prefix has one).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from typing import Any

from redis.exceptions import ResponseError

from .redis_store import RedisStore
from .store import Store

logger = logging.getLogger(__name__)
LEASE_TTL = 3.0  # seconds a lease outlives a leader that stopped renewing it (died); renewed every third
POLL = 0.25  # seconds between looks at L2 and the lease, whatever pub/sub says
LISTEN = 1.0  # seconds one pub/sub read waits for a message
FAILED = object()
CHANNEL = "stored"  # after the prefix: the keys whose leader landed

# Keys: 1 = entry, 2 = lease. The entry is there, or the last leader left none (the lease
# says 'pass' for a while: everyone goes upstream at once, as a chain of leaders would make
# the last wait for every answer), or the lease is taken here, or another proxy holds it.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'stored' end
local held = redis.call('GET', KEYS[2])
if held == 'pass' then return 'pass' end
if not held and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'lead' end
return 'wait'
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Then it tells the waiters (ARGV[3] the channel, ARGV[4] the key): one round trip.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], 'pass', 'PX', ARGV[2]) end
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""


class Claim(enum.Enum):
    LEAD = "lead"  # the lease is ours: go upstream
    STORED = "stored"  # the entry is in L2: answer from it
    PASS = "pass"  # the last leader left no entry: go upstream without leading
    WAIT = "wait"  # another proxy leads


def lease_key(entry_key: str) -> str | None:
    """The lease's Redis key, in the entry key's cluster slot; None when no key can be (a
    prefix with a `}` but no hash tag: a tag around the entry key would end there)."""
    start = entry_key.find("{")
    end = entry_key.find("}", start + 1)
    if start >= 0 and end > start + 1:
        return entry_key + ":lease"  # its own hash tag decides the slot of both
    return None if "}" in entry_key else "{" + entry_key + "}:lease"


class Lease:
    """A lease this proxy holds, renewed in the background until released."""

    def __init__(self, fleet: FleetLeases, key: str, token: str) -> None:
        self.fleet = fleet  # released through the Redis it was taken in, whatever was configured since
        self.key = key
        self.token = token
        self._renewal = asyncio.create_task(fleet.renew(self))


class FleetLeases:
    def __init__(self, store: RedisStore, ttl: float = LEASE_TTL, poll: float = POLL) -> None:
        self.store = store
        self.ttl = ttl
        self.poll = poll
        self.channel = store.prefix + CHANNEL
        self._watchers: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Sent by their SHA (EVALSHA), and loaded on the first NOSCRIPT: not the text every call.
        self._scripts = {text: store.client.register_script(text) for text in (CLAIM, RENEW, RELEASE)}

    async def _script(self, script: str, keys: tuple[str, ...], *args: str) -> Any:
        """Run a lease script; None if Redis answered with an error (out of memory, scripts
        not allowed): such a Redis is up, and its breaker must not open for the lookups."""
        registered = self._scripts[script]

        async def run(client: Any) -> Any:
            try:
                return await registered(keys=keys, args=args, client=client)
            except ResponseError as e:
                logger.debug("ai-cache: fleet lease script refused: %s", e)
                return None

        return await self.store.with_redis(run, None, "lease")

    def _keys(self, key: str) -> tuple[str, str]:
        entry = self.store.redis_key(key)
        lease = lease_key(entry)
        assert lease is not None  # fleet_leases checked the prefix
        return entry, lease

    async def claim(self, key: str, token: str) -> Claim | None:
        """One look: the entry, the lease taken with `token`, or another's; None if Redis failed."""
        keys = self._keys(key)
        px = str(int(self.ttl * 1000))
        found = await self._script(CLAIM, keys, token, px)
        if isinstance(found, bytes):
            found = found.decode()
        try:
            return Claim(found) if found is not None else None
        except ValueError:
            return None

    async def acquire(self, key: str, patience: float) -> Lease | Claim | None:
        """A `Lease` to lead with, Claim.STORED when the entry is in L2 (now or after waiting
        for another proxy's leader), Claim.PASS when that leader left none, or None: Redis
        failed, or `patience` ran out."""
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        notified: asyncio.Future[None] | None = None  # subscribed only once there is a wait
        try:
            while True:
                claim = await self.claim(key, token)
                if claim is Claim.LEAD:
                    return Lease(self, key, token)
                if claim is not Claim.WAIT:
                    return claim
                left = deadline - loop.time()
                if left <= 0:
                    return None
                if notified is None or notified.done():
                    if notified is not None:
                        self._unwatch(key, notified)
                    notified = self._watch(key)
                await asyncio.wait([notified], timeout=min(self.poll, left))
        finally:
            if notified is not None:
                self._unwatch(key, notified)

    async def renew(self, lease: Lease) -> None:
        """Keep the lease alive while its upstream call runs; stop once it is lost."""
        keys = self._keys(lease.key)[1:]
        px = str(int(self.ttl * 1000))
        while True:
            await asyncio.sleep(self.ttl / 3)
            renewed = await self._script(RENEW, keys, lease.token, px)
            if renewed == 0:
                logger.warning("ai-cache: lost the fleet lease for %s: another proxy may lead it too", lease.key[:12])
                return

    def release_soon(self, lease: Lease, stored: bool) -> None:
        """Drop the lease (if still ours) and tell the waiters, off the request path. Without
        a `stored` entry the lease says PASS for a lease's lifetime instead."""
        lease._renewal.cancel()
        task = asyncio.create_task(self._release(lease, stored))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, lease: Lease, stored: bool) -> None:
        keys = self._keys(lease.key)[1:]
        await self._script(
            RELEASE, keys, lease.token, "" if stored else str(int(self.ttl * 1000)), self.channel, lease.key
        )

    # Pub/sub: one subscription per proxy while anyone waits.

    def _watch(self, key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.setdefault(key, set()).add(future)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        return future

    def _unwatch(self, key: str, future: asyncio.Future[None]) -> None:
        watchers = self._watchers.get(key)
        if watchers is not None:
            watchers.discard(future)
            if not watchers:
                del self._watchers[key]

    async def _listen(self) -> None:
        """Wake the waiters of each published key, while there are any; ends on any failure
        (the waiters poll meanwhile; the next waiter subscribes again)."""
        pubsub = self.store.client.pubsub()

        async def subscribe(_: Any) -> bool:
            await pubsub.subscribe(self.channel)
            return True

        try:
            if not await self.store.with_redis(subscribe, False, "subscribe"):
                return
            while self._watchers:
                message: Any = await self.store.with_redis(
                    lambda _: pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN),
                    FAILED,
                    "subscribe",
                    blocks=LISTEN,
                )
                if message is FAILED:
                    return
                if message and message.get("type") == "message":
                    key = message["data"].decode() if isinstance(message["data"], bytes) else str(message["data"])
                    for future in self._watchers.get(key, ()):
                        if not future.done():
                            future.set_result(None)
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), self.store.timeout)
            except Exception:  # a broken connection must not outlive its listener
                pass

    async def drain(self) -> None:
        """Let the releases under way finish (shutdown: before the Redis client closes)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        """Stop listening (the stores were replaced); releases under way finish on their own."""
        if self._listener is not None:
            self._listener.cancel()


def fleet_leases(stores: list[Store]) -> FleetLeases | None:
    """Fleet-wide single flight over the Redis store among `stores`, if there is one."""
    store = next((store for store in stores if isinstance(store, RedisStore)), None)
    if store is None:
        return None
    if lease_key(store.redis_key("0" * 64)) is None:
        logger.warning("ai-cache: ai_cache_redis_prefix has a '}' but no hash tag: single flight stays per proxy")
        return None
    return FleetLeases(store)
