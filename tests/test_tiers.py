"""tiers.py: the TTL is judged at lookup from `created_at`; replay mode lets it pass."""

from __future__ import annotations

import time

import pytest

from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.tiers import TieredCache, WriteCancelled, Written

DAY = 86400.0


@pytest.fixture
async def cache(tmp_path):
    cache = TieredCache([DiskStore(tmp_path / "cache")], ttl=7 * DAY)
    yield cache
    await cache.close()


def aged(days: float, digit: str = "a") -> Entry:
    return Entry(digit * 64, "json", b"{}", [], created_at=time.time() - days * DAY)


async def test_an_expired_entry_is_found_with_why_and_kept_on_disk(cache):
    assert cache.disk.put_sync(aged(9), None)
    found = await cache.find("a" * 64)
    assert found.stale == "expired (age 9d, ttl 7d)" and found.layer == "l1"
    assert await cache.lookup("a" * 64) is None
    # Replay mode: a recording is a recording, whatever its age.
    replayed = await cache.find("a" * 64, any_age=True)
    assert replayed.stale == "" and replayed.entry.key == "a" * 64
    assert cache.disk.get_sync("a" * 64) is not None


async def test_the_clients_max_age_still_applies_in_replay_mode(cache):
    cache.disk.put_sync(aged(2, "b"), None)
    assert (await cache.find("b" * 64, max_age=DAY, any_age=True)).stale.startswith(
        "older than the client's max-age (age 2d, max-age 1d)"
    )
    assert (await cache.find("b" * 64, max_age=3 * DAY)).stale == ""


async def test_nothing_stored_is_none(cache):
    assert await cache.find("c" * 64, any_age=True) is None


async def test_entries_written_by_the_cache_outlive_the_ttl_on_disk(cache):
    cache.ttl = 0.5
    await cache.store_soon(aged(1 / DAY, "d"), lambda entry: None)  # recorded 1 s ago: past the TTL
    assert (await cache.find("d" * 64)).stale.startswith("expired")
    assert (await cache.find("d" * 64, any_age=True)).stale == ""


async def test_entries_concluded_together_are_written_in_one_batch(cache, monkeypatch):
    batches: list[list[str]] = []
    disk = cache.disk
    put_many = disk.put_many_sync
    monkeypatch.setattr(
        disk, "put_many_sync", lambda items: batches.append([e.key[0] for e, _ in items]) or put_many(items)
    )

    def finish(entry: Entry) -> None:
        if entry.key[0] == "f":
            raise WriteCancelled("the answer proved faulty")

    writes = [cache.store_soon(aged(0, digit), finish) for digit in "ef0"]
    assert (await cache.find("e" * 64)).layer == "l1"  # served while it waits for its batch
    written = [await write for write in writes]
    assert batches == [["e", "0"]]  # one trip, one transaction; the dropped entry is not in it
    assert written[0] == Written(("l1",)) and written[2] == Written(("l1",))
    assert written[1] == Written(problem="the answer proved faulty")
    assert disk.get_sync("e" * 64) is not None and disk.get_sync("f" * 64) is None
