"""disk.py and tiers.py: the disk store behind the Store interface, at any position."""

from __future__ import annotations

import time

from mitmproxy.test import taddons

from ai_cache.addon import AICache
from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.options import Settings
from ai_cache.redis_store import RedisStore
from ai_cache.store import Store, WritesInThread
from ai_cache.tiers import TieredCache, open_cache


def entry(digit: str) -> Entry:
    return Entry(digit * 64, "json", b'{"a": 1}', [], created_at=time.time())


async def test_the_disk_store_is_async_at_the_boundary(tmp_path):
    store: Store = DiskStore(tmp_path / "cache")
    assert await store.put(entry("a"), None) and await store.put(entry("b"), None)
    assert sorted(await store.keys()) == ["a" * 64, "b" * 64]
    assert (await store.get("a" * 64)).body == b'{"a": 1}'
    assert await store.delete("a" * 64) and await store.keys() == ["b" * 64]
    await store.close()


async def test_a_hit_back_fills_every_store_before_the_one_that_had_it(tmp_path):
    near, middle, far = (
        DiskStore(tmp_path / name, layer) for name, layer in (("near", "l1"), ("middle", "l2"), ("far", "l3"))
    )
    cache = TieredCache([near, middle, far])
    assert await far.put(entry("c"), None)
    found = await cache.find("c" * 64)
    assert found is not None and found.layer == "l3"
    await cache.drain()
    assert near.keys_sync() == middle.keys_sync() == ["c" * 64]
    assert (await cache.find("c" * 64)).layer == "l1"
    written = await cache.store_soon(entry("d"), lambda e: None)
    assert written.layers == ("l1", "l2", "l3") and far.get_sync("d" * 64) is not None
    await cache.close()


async def test_open_cache_opens_the_configured_stores(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon, ai_cache_dir=str(tmp_path / "cache"), ai_cache_ttl="60s", ai_cache_redis_url="redis://127.0.0.1:1/0"
        )
        cache = open_cache(Settings.from_options(tctx.options))
    assert [(type(s), s.layer) for s in cache.stores] == [(DiskStore, "l1"), (RedisStore, "l2")]
    assert cache.disk is cache.stores[0] and cache.ttl == 60.0
    assert isinstance(cache.stores[0], WritesInThread) and not isinstance(cache.stores[1], WritesInThread)
    await cache.close()
    await addon.cache.close()


async def test_a_back_filled_entry_is_served_from_the_nearest_store_at_once(tmp_path):
    near, far = DiskStore(tmp_path / "near", "l1"), DiskStore(tmp_path / "far", "l2")
    cache = TieredCache([near, far])
    assert await far.put(entry("e"), None)
    assert (await cache.find("e" * 64)).layer == "l2"
    # The copy into the nearer store is still on its way: the next request is an l1 hit all the same.
    assert near.keys_sync() == []
    assert (await cache.find("e" * 64)).layer == "l1"
    await cache.drain()
    assert near.keys_sync() == ["e" * 64]
    await cache.close()


async def test_a_hit_read_again_is_decoded_once_until_its_bytes_change(tmp_path):
    store = DiskStore(tmp_path / "cache")
    assert store.put_sync(entry("a"), None)
    first = await store.get("a" * 64)
    assert await store.get("a" * 64) is first  # the same bytes: no second decode
    other = DiskStore(tmp_path / "cache")  # another proxy on the directory rewrites it
    assert other.put_sync(Entry("a" * 64, "json", b'{"a": 2}', [], created_at=time.time()), None)
    assert (await store.get("a" * 64)).body == b'{"a": 2}'
    other._cache.set("a" * 64, b"AIC not an entry")  # and then spoils it
    assert await store.get("a" * 64) is None  # checked again, not served from memory
    other.close_sync()
    await store.close()
