"""ai_cache.fixture_store: a directory of fixture files as a cache layer, kept in step
with the directory, written atomically, and what a run did not use."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

from ai_cache.entry import Entry
from ai_cache.fixture_store import UNUSED_LIST, FixtureStore, read_unused, write_unused
from ai_cache.fixtures import export_dir, file_name
from ai_cache.tiers import TieredCache
from helpers import sample_entries


def load_error(path: Path) -> str:
    try:
        json.loads(path.read_text())
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{path} is valid JSON")


def exported(directory: Path) -> list[Entry]:
    entries = sample_entries()
    export_dir(entries, directory)
    return entries


def answer(entry: Entry, text: str) -> Entry:
    body = json.dumps({"id": text, "choices": [{"message": {"content": text}}]}).encode()
    return dataclasses.replace(entry, body=body, chunks=[(0.0, len(body))])


async def test_serves_the_files_of_the_directory_and_knows_which_it_served(tmp_path):
    json_entry, sse_entry, ndjson_entry = exported(tmp_path)
    store = FixtureStore(tmp_path, writable=False)
    found = await store.get(sse_entry.key)
    assert found is not None and found.body == sse_entry.body and found.chunks == sse_entry.chunks
    assert await store.get("0" * 64) is None
    assert sorted(await store.keys()) == sorted(e.key for e in (json_entry, sse_entry, ndjson_entry))
    assert store.used == {file_name(sse_entry)}
    assert store.unused() == sorted([file_name(json_entry), file_name(ndjson_entry)])


async def test_files_added_or_deleted_while_running_count_from_the_next_miss(tmp_path):
    json_entry, sse_entry, _ = sample_entries()
    export_dir([json_entry], tmp_path)
    store = FixtureStore(tmp_path, writable=False)
    assert await store.get(sse_entry.key) is None
    export_dir([sse_entry], tmp_path)  # committed meanwhile: the miss scans again
    assert (await store.get(sse_entry.key)).body == sse_entry.body
    (tmp_path / file_name(json_entry)).unlink()
    assert await store.get("0" * 64) is None  # a miss scans the directory again
    assert await store.get(json_entry.key) is None


async def test_a_miss_scans_the_directory_only_when_it_changed(tmp_path, monkeypatch):
    """A scan stats every file (3.5 ms for 1000): misses in a directory nobody wrote skip it."""
    json_entry, sse_entry, _ = sample_entries()
    export_dir([json_entry], tmp_path)
    os.utime(tmp_path, ns=(time.time_ns() - 3_600 * 10**9,) * 2)  # last changed an hour ago
    store = FixtureStore(tmp_path, writable=False)
    assert await store.get(json_entry.key) is not None
    scans: list[object] = []
    listing = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or listing(path))
    for _ in range(20):
        assert await store.get("0" * 64) is None
    assert scans == []
    export_dir([sse_entry], tmp_path)  # the directory changed: the next miss scans it
    assert await store.get(sse_entry.key) is not None
    assert len(scans) == 1
    assert await store.get("0" * 64) is None  # changed just now: a file created in the same clock tick
    assert len(scans) == 2  # would not change its time again, so the scan is not trusted yet


async def test_a_bad_file_is_skipped_with_one_warning_and_the_others_served(tmp_path, caplog):
    json_entry, *_ = exported(tmp_path)
    (tmp_path / "broken.json").write_text('{"ai_cache_fixture": 2, "key": ')
    caplog.set_level(logging.WARNING)
    store = FixtureStore(tmp_path, writable=False)
    assert (await store.get(json_entry.key)) is not None
    await store.get("0" * 64)
    await store.get("1" * 64)
    assert [r.getMessage() for r in caplog.records if "broken.json" in r.getMessage()] == [
        f"ai-cache: fixture {tmp_path / 'broken.json'} skipped: not valid JSON: "
        "Expecting value: line 1 column 32 (char 31)"
    ]


async def test_a_bad_file_is_named_with_its_reason_until_it_is_fixed_or_gone(tmp_path):
    """The proxy's warning goes to a log that the pytest plugin removes: the run reports `skipped`."""
    json_entry, *_ = exported(tmp_path)
    path = tmp_path / file_name(json_entry)
    good = path.read_text()
    path.write_text(good.replace('"key"', '"key",'))  # a hand edit gone wrong
    store = FixtureStore(tmp_path, writable=False)
    assert await store.get(json_entry.key) is None
    assert store.skipped == {path.name: f"not valid JSON: {load_error(path)}"}
    assert path.name not in store.unused()
    path.write_text(good)
    assert (await store.get(json_entry.key)) is not None
    assert store.skipped == {}
    (tmp_path / "broken.json").write_text("{}")
    await store.get("0" * 64)
    (tmp_path / "broken.json").unlink()
    await store.get("0" * 64)
    assert store.skipped == {}


async def test_recording_modes_write_one_file_per_answer_and_leave_an_unchanged_answer_alone(tmp_path):
    directory = tmp_path / "fixtures"
    json_entry = sample_entries()[0]
    store = FixtureStore(directory, writable=True)
    assert store.put_sync(json_entry, None)
    path = directory / file_name(json_entry)
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temporary file left
    assert "SECRET" not in path.read_text()  # written as export writes it
    first = path.stat().st_mtime_ns, path.read_bytes()

    again = dataclasses.replace(json_entry, created_at=json_entry.created_at + 60)  # recorded again, same answer
    assert await store.put(again, None)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == first

    changed = answer(json_entry, "changed")
    assert store.put_sync(changed, None)
    assert json.loads(path.read_text())["body"]["id"] == "changed"
    assert (await FixtureStore(directory, writable=False).get(json_entry.key)).body == changed.body
    assert (await store.get(json_entry.key)).body == changed.body


async def test_replay_mode_never_writes(tmp_path):
    store = FixtureStore(tmp_path / "fixtures", writable=False)
    assert not store.put_sync(sample_entries()[0], None)
    assert not (tmp_path / "fixtures").exists()


def test_a_killed_writers_temporary_files_are_removed_when_recording_starts(tmp_path, caplog):
    """`write_new` writes a temporary file, then renames it: a proxy killed between the
    two leaves `.NAME.json.XXXX.tmp` behind. Old ones go; a live writer's (new) stays."""
    caplog.set_level(logging.INFO)
    old, new = tmp_path / ".a.json.k2j4.tmp", tmp_path / ".b.json.9zq1.tmp"
    for path in (old, new):
        path.write_bytes(b'{"half": ')
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    FixtureStore(tmp_path, writable=False)._ready.wait(5)  # replay: the directory is not touched
    assert old.exists() and new.exists()
    FixtureStore(tmp_path, writable=True)._ready.wait(5)
    assert not old.exists() and new.exists()
    assert f"removed 1 unfinished fixture writes from {tmp_path}" in caplog.text


def test_two_writers_on_one_directory_never_leave_a_partial_file(tmp_path):
    """Two proxies (pytest -n 2) recording the same request: every read sees a whole file."""
    json_entry = sample_entries()[0]
    stores = [FixtureStore(tmp_path, writable=True) for _ in range(2)]
    path = tmp_path / file_name(json_entry)
    big = "x" * 200_000  # several write() calls per file
    errors: list[str] = []

    def write(store: FixtureStore, name: str) -> None:
        for i in range(40):
            assert store.put_sync(answer(json_entry, f"{name}{i}{big}"), None)

    def read() -> None:
        while any(t.is_alive() for t in writers):
            try:
                document = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError as e:
                errors.append(str(e))
            else:
                assert document["key"] == json_entry.key

    writers = [threading.Thread(target=write, args=(store, name)) for store, name in zip(stores, "ab", strict=True)]
    for thread in writers:
        thread.start()
    read()
    for thread in writers:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


async def test_in_front_of_l1_a_fixture_hit_is_not_copied_into_l1_and_an_l1_hit_is_recorded_as_a_fixture(tmp_path):
    from ai_cache.disk import DiskStore

    json_entry, sse_entry, _ = sample_entries()
    export_dir([json_entry], tmp_path / "fixtures")
    disk = DiskStore(tmp_path / "l1")
    disk.put_sync(sse_entry, None)
    cache = TieredCache([FixtureStore(tmp_path / "fixtures", writable=True), disk])
    assert (await cache.find(json_entry.key)).layer == "fixtures"
    assert (await cache.find(sse_entry.key)).layer == "l1"
    await cache.drain()
    assert await disk.get(json_entry.key) is None  # deleting the file makes the next run miss
    assert (tmp_path / "fixtures" / file_name(sse_entry)).is_file()  # record mode: the run's answers, as files
    await cache.close()


def test_the_unused_list_names_fixture_files_only(tmp_path):
    entries = exported(tmp_path)
    names = sorted(file_name(e) for e in entries)
    assert write_unused(tmp_path, {names[0]}) == names[1:]
    assert (tmp_path / UNUSED_LIST).read_text() == "".join(f"{n}\n" for n in names[1:])
    (tmp_path / UNUSED_LIST).write_text(f"{names[1]}\n../victim.json\nmissing.json\n{UNUSED_LIST}\n")
    assert read_unused(tmp_path) == [names[1]]
