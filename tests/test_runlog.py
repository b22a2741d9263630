"""ai_cache.runlog's reader: counts as the proxy appends, writes still pending, fixtures used."""

from __future__ import annotations

import json
import threading

from ai_cache.runlog import RunReader


def append(path, *records: dict) -> None:
    with open(path, "a") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)


def test_counts_the_lines_appended_since_the_last_read_and_waits_for_pending_writes(tmp_path):
    path = tmp_path / "run.jsonl"
    reader = RunReader(path)
    assert reader.read().hits == 0  # no file yet
    append(
        path,
        {"flow": "a", "status": "HIT", "layer": "fixtures", "fixture": "x.json", "recording": False},
        {"flow": "b", "status": "MISS", "recording": True},
    )
    counts = reader.read()
    assert (counts.hits, counts.misses, counts.stored, reader.pending) == (1, 1, 0, True)

    later = threading.Timer(0.05, append, (path, {"flow": "b", "stored": True, "fixture": "y.json"}))
    later.start()
    counts = reader.settle()
    later.join()
    assert (counts.hits, counts.misses, counts.stored, reader.pending) == (0, 0, 1, False)

    with open(path, "a") as file:
        file.write('{"flow": "c", "status": "MI')  # a line being written: left for the next read
    assert reader.read().misses == 0
    with open(path, "a") as file:  # the rest of c's line; its replay miss
        file.write('SS", "recording": false, "message": "ai-cache: no recording for this ..."}\n')
    counts = reader.read()
    assert (counts.misses, counts.replay_misses) == (1, ["ai-cache: no recording for this ..."])


def test_a_write_that_ends_before_its_call_line_is_not_pending(tmp_path):
    """An answer not stored (upstream answered 500) is concluded before the call's line."""
    path = tmp_path / "run.jsonl"
    append(path, {"flow": "a", "stored": False, "reason": "upstream answered 500"})
    append(path, {"flow": "a", "status": "MISS", "recording": True})
    reader = RunReader(path)
    counts = reader.settle(timeout=0)
    assert (counts.misses, counts.stored, reader.pending) == (1, 0, False)


def test_the_shutdown_line_names_the_fixtures_used_and_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    skipped = {"c.json": "not valid JSON: Expecting value: line 1 column 1 (char 0)"}
    append(
        path, {"done": True, "fixtures": "/repo/tests/fixtures/llm", "used": ["a.json", "b.json"], "skipped": skipped}
    )
    reader = RunReader(path)
    reader.read()
    assert (reader.fixtures, reader.used, reader.skipped) == ("/repo/tests/fixtures/llm", {"a.json", "b.json"}, skipped)
