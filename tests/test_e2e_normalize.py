"""ai_cache_normalize end to end: a prompt with a fresh timestamp and run UUID replays."""

from __future__ import annotations

import uuid

from ai_cache.cli import main
from helpers import CHAT, chat_body, post, wait_for_status


def volatile_body(marker: str, stamp: str) -> dict:
    return chat_body(f"{marker} at {stamp}, run {uuid.uuid4()}")


def test_a_fresh_timestamp_and_uuid_replay_the_recording(start_proxy, upstream, marker, capsys):
    proxy = start_proxy(ai_cache_normalize="datetime,uuid")
    monday = volatile_body(marker, "2026-11-23T08:00:00Z")
    recorded = post(proxy, upstream, CHAT, monday)
    assert recorded.headers["x-ai-cache-status"] == "MISS"
    wait_for_status(proxy, upstream, monday, "HIT")

    tuesday = volatile_body(marker, "2026-11-24 17:45:12.5+02:00")
    replayed = post(proxy, upstream, CHAT, tuesday)
    assert replayed.headers["x-ai-cache-status"] == "HIT"
    assert replayed.headers["x-ai-cache-key"] == recorded.headers["x-ai-cache-key"]
    assert replayed.content == recorded.content and upstream.count(marker) == 1

    proxy.stop()  # the stored request copy is the one sent on Monday, not the normalised text
    assert main(["--dir", proxy.options["ai_cache_dir"], "show", recorded.headers["x-ai-cache-key"]]) == 0
    shown = capsys.readouterr().out
    assert monday["messages"][0]["content"] in shown and "<datetime>" not in shown


def test_without_the_option_a_fresh_timestamp_is_a_miss(start_proxy, upstream, marker):
    proxy = start_proxy()
    monday = volatile_body(marker, "2026-11-23T08:00:00Z")
    post(proxy, upstream, CHAT, monday)
    wait_for_status(proxy, upstream, monday, "HIT")
    tuesday = post(proxy, upstream, CHAT, volatile_body(marker, "2026-11-24T17:45:12Z"))
    assert tuesday.headers["x-ai-cache-status"] == "MISS" and upstream.count(marker) == 2
