"""ai_cache.redis_store: the circuit breaker and the redaction of Redis URLs; against a real
redis-server, compression by encoded size and a breaker that calls in flight cannot close."""

from __future__ import annotations

import asyncio
import zlib

import redis
import redis.asyncio

from ai_cache.entry import Entry
from ai_cache.redis_store import COMPRESSED, CircuitBreaker, RedisStore, redact
from helpers import key_of


def test_breaker_opens_once_backs_off_and_closes(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ai_cache.redis_store.time.monotonic", lambda: clock[0])
    breaker = CircuitBreaker("Redis", base=1, cap=4)
    assert breaker.allow()
    breaker.failure(TimeoutError(), probe=False)
    breaker.failure(TimeoutError(), probe=False)  # a call already in flight: counted once
    breaker.success(probe=False)  # one in flight that succeeded proves nothing
    assert not breaker.allow() and breaker.cooldown == 1
    clock[0] += 1.01
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure(ConnectionError(), probe=True)
    assert breaker.cooldown == 2
    clock[0] += 2.01
    assert breaker.allow()
    breaker.success(probe=True)
    assert breaker.allow() and not breaker.is_open
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipping it" in m for m in messages) == 1 and sum("circuit closed" in m for m in messages) == 1


def test_redact_hides_redis_passwords():
    assert redact("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:pw@host") == "redis://***@host"
    assert redact("redis://host:6379") == "redis://host:6379"


# Passwords given as a query parameter (redis-py accepts ?password=) are logged.
def test_redis_password_in_query_is_redacted():
    assert "hunter2" not in redact("redis://cache.internal:6379/0?password=hunter2")


# Entries are bounded: Redis compression follows the encoded size.
async def test_redis_compression_follows_the_encoded_size(start_redis):
    server = start_redis()
    store = RedisStore(server.url, 5.0, "t:")
    small_answer = Entry(
        key_of("big request"),
        "json",
        b'{"ok": true}',
        [],
        meta={"request": {"body": {"prompt": "lorem ipsum " * 10_000}}},
    )
    assert len(small_answer.body) < 64 and len(small_answer.to_bytes()) > 100_000
    await store.put(small_answer, None)
    value = redis.Redis(port=server.port).get("t:" + small_answer.key)
    assert value.startswith(COMPRESSED) and len(value) < 10_000
    assert (await store.get(small_answer.key)).meta == small_answer.meta
    await store.close()


async def test_a_value_inflating_past_the_bound_is_skipped_not_deleted(start_redis, caplog):
    server = start_redis()
    raw = redis.Redis(port=server.port)
    store = RedisStore(server.url, 5.0, "t:", max_value=1_000_000)
    bomb = COMPRESSED + zlib.compress(b"\0" * 200_000_000, 9)  # ~200 KB planted, 200 MB inflated
    raw.set("t:" + key_of("bomb"), bomb)
    assert await store.get(key_of("bomb")) is None
    assert raw.get("t:" + key_of("bomb")) == bomb  # maybe a peer's larger entry: not ours to drop
    assert "inflates past 1000000 bytes" in caplog.text
    entry = Entry(key_of("fits"), "json", b"{}", [], meta={"request": {"body": {"p": "lorem ipsum " * 20_000}}})
    await store.put(entry, None)  # compressed, and well within the bound once inflated
    assert (await store.get(entry.key)).meta == entry.meta
    truncated = raw.get("t:" + entry.key)[:-10]
    raw.set("t:" + entry.key, truncated)
    assert await store.get(entry.key) is None and raw.get("t:" + entry.key) is None  # corrupt: dropped
    await store.close()


# The breaker flapped: calls already in flight when it opened succeeded and closed it
# again at once. Only the probe after the cool-down may close it.
async def test_calls_in_flight_when_the_breaker_opens_do_not_close_it(start_redis):
    server = start_redis()
    store = RedisStore(server.url, 5.0, "t:")
    admin = redis.asyncio.Redis(port=server.port)

    async def blocked_clients() -> list[int]:
        clients = (await admin.execute_command("CLIENT", "LIST")).decode().splitlines()
        return [int(c.split("id=")[1].split()[0]) for c in clients if "cmd=blpop" in c]

    async def wait_blocked(n: int) -> list[int]:
        while len(ids := await blocked_clients()) < n:  # noqa: ASYNC110 (polls Redis, nothing to await)
            await asyncio.sleep(0.01)
        return ids

    failing = asyncio.create_task(store.with_redis(lambda r: r.blpop("a", 10), "default"))
    [victim] = await wait_blocked(1)
    in_flight = asyncio.create_task(store.with_redis(lambda r: r.blpop("b", 10), "default"))
    seen = await wait_blocked(2)
    await admin.execute_command("CLIENT", "KILL", "ID", victim)  # a real connection failure, ...
    while not (retried := [i for i in await blocked_clients() if i not in seen]):  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # ... retried once on a new connection ...
    await admin.execute_command("CLIENT", "KILL", "ID", retried[0])  # ... which fails too
    assert await failing == "default" and store.breaker.is_open
    await admin.lpush("b", "x")  # the call that was already in flight succeeds
    assert list(await in_flight) == [b"b", b"x"]
    assert store.breaker.is_open
    await store.close()
    await admin.aclose()


# A restarted Redis left the pool's connections stale: the first call on each failed
# ("Connection closed by server") and opened the breaker although Redis was back.
async def test_a_restarted_redis_is_used_at_once(start_redis, caplog):
    server = start_redis()
    store = RedisStore(server.url, 1.0, "t:")
    entry = Entry(key_of("before"), "json", b"{}", [])
    assert await store.put(entry, None)
    assert await asyncio.gather(*(store.get(entry.key) for _ in range(4)))  # several pooled connections
    server.stop()
    server.start()  # same port, empty
    assert await store.put(entry, None) and (await store.get(entry.key)).key == entry.key
    assert "skipping it for a while" not in caplog.text and not store.breaker.is_open
    await store.close()
