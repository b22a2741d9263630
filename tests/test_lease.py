"""The fleet lease against a real redis-server: claim, wait, notify, take over, fail open."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis
from redis.crc import key_slot

from ai_cache.entry import Entry
from ai_cache.launch import free_port
from ai_cache.lease import Claim, FleetLeases, Lease, fleet_leases, lease_key
from ai_cache.redis_store import RedisStore

KEY = "a" * 64


@pytest.mark.parametrize("prefix", ["ai-cache:", "team{ci}:", "odd{:", "x{y}}{z}"])
def test_the_lease_shares_the_entry_keys_cluster_slot(prefix):
    entry_key = prefix + KEY
    lease = lease_key(entry_key)
    assert lease is not None and lease != entry_key
    assert key_slot(lease.encode()) == key_slot(entry_key.encode())


@pytest.mark.parametrize("prefix", ["odd}{x", "{}x"])
def test_a_prefix_no_lease_key_can_share_a_slot_with_leaves_the_fleet_off(caplog, prefix):
    assert lease_key(prefix + KEY) is None
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 0.2, prefix)
    assert fleet_leases([store]) is None
    assert "single flight stays per proxy" in caplog.text


async def test_one_leads_the_others_wait_until_the_entry_is_stored(start_redis):
    server = start_redis()
    stores = [RedisStore(server.url, 1.0, "ai-cache:") for _ in range(2)]
    # Polling practically off: only the published message can wake the waiter in time.
    leader, waiter = FleetLeases(stores[0], poll=60), FleetLeases(stores[1], poll=60)
    lease = await leader.acquire(KEY, 5)
    assert isinstance(lease, Lease)
    waiting = asyncio.create_task(waiter.acquire(KEY, 30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert await stores[0].put(Entry(KEY, "json", b"{}", []), None)
    leader.release_soon(lease, stored=True)
    assert await asyncio.wait_for(waiting, 5) is Claim.STORED
    for store in stores:
        await store.close()


async def test_a_leader_that_stored_nothing_lets_every_waiter_pass_at_once(start_redis):
    server = start_redis()
    stores = [RedisStore(server.url, 1.0, "ai-cache:") for _ in range(3)]
    leader, *waiters = (FleetLeases(store, poll=60) for store in stores)
    lease = await leader.acquire(KEY, 5)
    assert isinstance(lease, Lease)
    waiting = [asyncio.create_task(waiter.acquire(KEY, 30)) for waiter in waiters]
    await asyncio.sleep(0.2)
    leader.release_soon(lease, stored=False)
    assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [Claim.PASS, Claim.PASS]
    for store in stores:
        await store.close()


async def test_a_lease_that_is_not_renewed_expires_and_a_waiter_takes_over(start_redis):
    server = start_redis()
    stores = [RedisStore(server.url, 1.0, "ai-cache:") for _ in range(2)]
    leader, waiter = FleetLeases(stores[0], ttl=0.5, poll=0.05), FleetLeases(stores[1], ttl=0.5, poll=0.05)
    lease = await leader.acquire(KEY, 5)
    assert isinstance(lease, Lease)
    await asyncio.sleep(1.0)  # renewed meanwhile: still held
    assert await waiter.claim(KEY, "other") is Claim.WAIT
    lease._renewal.cancel()  # as if its proxy died
    assert isinstance(await waiter.acquire(KEY, 5), Lease)
    # The dead leader's late release cannot drop the new leader's lease.
    leader.release_soon(lease, stored=False)
    await asyncio.sleep(0.1)
    assert await leader.claim(KEY, "third") is Claim.WAIT
    for store in stores:
        await store.close()


async def test_no_redis_means_no_fleet_and_no_wait():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", 0.2, "ai-cache:")
    assert await asyncio.wait_for(FleetLeases(store).acquire(KEY, 30), 5) is None
    await store.close()


async def test_lease_scripts_go_by_their_sha_not_their_text(start_redis):
    """EVALSHA (the script loaded once, on the first NOSCRIPT), not EVAL with ~300 bytes a call."""
    server = start_redis()
    store = RedisStore(server.url, 1.0, "ai-cache:")
    fleet = FleetLeases(store)
    lease = await fleet.acquire(KEY, 1)
    assert isinstance(lease, Lease)
    fleet.release_soon(lease, stored=False)
    await fleet.drain()
    assert await fleet.claim(KEY, "other") is Claim.PASS
    stats = Redis(port=server.port).info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] >= 3 and "cmdstat_eval" not in stats
    await store.close()
