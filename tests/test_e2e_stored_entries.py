"""End to end: entries read back from L1, Redis or a diskcache value file are checked like
input; an undecodable, hostile or corrupt one is a miss, dropped and replaced."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import diskcache
import httpx
import pytest
import redis

from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from conftest import Proxy, RedisServer
from helpers import CHAT, chat_body, deep, on_disk, post, wait_for_status, wait_for_stored


# An entry whose decoding raises something other than EntryError (RecursionError here)
# is a miss and is replaced; it used to be an "Addon error" on every request.
def test_undecodable_l1_entry_is_a_miss_and_is_replaced(shared_proxy, upstream, marker):
    proxy = shared_proxy
    first = post(proxy, upstream, CHAT, chat_body(marker))
    key = first.headers["x-ai-cache-key"]
    on_disk(proxy.options["ai_cache_dir"], key)  # planted below once the proxy's own write is done
    head = deep(100_000).encode()  # a version-1 value: no checksum, a header that nests too deep
    with diskcache.Cache(proxy.options["ai_cache_dir"]) as raw_cache:
        raw_cache.set(key, b"AIC" + bytes([1]) + len(head).to_bytes(4, "big") + head)
    again = post(proxy, upstream, CHAT, chat_body(marker))
    assert (again.status_code, again.headers.get("x-ai-cache-status")) == (200, "MISS")
    assert wait_for_status(proxy, upstream, chat_body(marker), "HIT").json() == again.json()
    assert proxy.logs().count(f"discarding unreadable L1 entry {key[:12]}") == 1
    assert "Addon error" not in proxy.logs()


# Entries planted in L1 or Redis by someone else (or corrupted) are checked like
# input: a bad one is a miss with one warning and is dropped from that layer.
@pytest.fixture(scope="module")
def replay_proxy(tmp_path_factory, confdir):
    workdir = tmp_path_factory.mktemp("replay")
    server = RedisServer(workdir).start()
    proxy = Proxy(
        workdir,
        confdir,
        {
            "ai_cache_dir": str(workdir / "cache"),
            "ai_cache_mode": "replay",
            "ai_cache_replay_speed": "1",
            "ai_cache_redis_url": server.url,
        },
        [],
    ).start()
    yield proxy, server
    proxy.stop()
    server.stop()


SSE = b'data: {"choices":[{"delta":{"content":"planted"}}]}\n\ndata: [DONE]\n\n'
PLANTED = Entry(
    "0" * 64,
    "sse",
    SSE,
    [("content-type", "text/event-stream")],
    chunks=[(0.0, 20), (0.05, len(SSE) - 20)],
    meta={"protocol": "openai-chat"},
)
HOSTILE_ENTRIES = {
    "header injection": dict(headers=[("x-evil", "a\r\nset-cookie: pwned=1")]),
    "header name": dict(headers=[("bad name", "v")]),
    "status 101": dict(status=101),
    "status 204": dict(status=204),
    "chunk time 1e308": dict(chunks=[(0.0, 20), (1e308, len(SSE) - 20)]),
    "chunk time NaN": dict(chunks=[(0.0, 20), (math.nan, len(SSE) - 20)]),
    "chunk sizes": dict(chunks=[(0.0, 20), (0.05, 5)]),
    "format": dict(format="html"),
    "another key": dict(key="f" * 64),
}


def plant(layer: str, proxy: Proxy, server: RedisServer, key: str, data: bytes) -> None:
    if layer == "l1":
        with diskcache.Cache(proxy.options["ai_cache_dir"]) as raw_cache:
            raw_cache.set(key, data)
    else:
        redis.Redis(port=server.port).set("ai-cache:" + key, data)


def planted_in(layer: str, proxy: Proxy, server: RedisServer, key: str) -> bool:
    if layer == "l1":
        with diskcache.Cache(proxy.options["ai_cache_dir"]) as raw_cache:
            return key in raw_cache
    return bool(redis.Redis(port=server.port).exists("ai-cache:" + key))


def replay_request(proxy: Proxy, upstream, marker: str) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, timeout=5) as client:
        return client.post(upstream.url + CHAT, json=chat_body(marker, stream=True))


@pytest.mark.parametrize("layer", ["l1", "l2"])
@pytest.mark.parametrize("changes", HOSTILE_ENTRIES.values(), ids=HOSTILE_ENTRIES.keys())
def test_hostile_stored_entries_are_misses_and_dropped(replay_proxy, upstream, marker, layer, changes):
    proxy, server = replay_proxy
    key = replay_request(proxy, upstream, marker).headers["x-ai-cache-key"]  # a 504: nothing recorded yet
    plant(layer, proxy, server, key, replace(PLANTED, **{"key": key, **changes}).to_bytes())
    answers = [replay_request(proxy, upstream, marker) for _ in range(2)]
    assert [a.status_code for a in answers] == [504, 504]
    assert not any("set-cookie" in a.headers for a in answers)
    assert not planted_in(layer, proxy, server, key)
    warning = f"discarding unreadable {'L1 entry' if layer == 'l1' else 'L2 value for'} {key[:12]}"
    assert proxy.logs().count(warning) == 1


@pytest.mark.parametrize("layer", ["l1", "l2"])
def test_corrupt_stored_entries_are_misses_and_dropped(replay_proxy, upstream, marker, layer):
    proxy, server = replay_proxy
    key = replay_request(proxy, upstream, marker).headers["x-ai-cache-key"]
    data = bytearray(replace(PLANTED, key=key).to_bytes())
    data[-20:-16] = b"EVIL"  # four bytes of the answer overwritten
    plant(layer, proxy, server, key, bytes(data))
    answer = replay_request(proxy, upstream, marker)
    assert answer.status_code == 504 and b"EVIL" not in answer.content
    assert not planted_in(layer, proxy, server, key)
    assert "checksum mismatch" in proxy.logs()


@pytest.mark.parametrize("layer", ["l1", "l2"])
def test_framing_headers_of_stored_entries_are_dropped(replay_proxy, upstream, marker, layer):
    proxy, server = replay_proxy
    key = replay_request(proxy, upstream, marker).headers["x-ai-cache-key"]
    headers = [
        ("content-type", "text/event-stream"),
        ("transfer-encoding", "chunked"),
        ("content-length", "7"),
        ("connection", "upgrade"),
        ("upgrade", "h2c"),
        ("set-cookie", "a=b"),
        ("x-request-id", "kept"),
    ]
    plant(layer, proxy, server, key, replace(PLANTED, key=key, headers=headers).to_bytes())
    answer = replay_request(proxy, upstream, marker)  # paced (ai_cache_replay_speed=1)
    assert (answer.status_code, answer.headers["x-ai-cache-status"], answer.content) == (200, "HIT", SSE)
    assert answer.headers["x-request-id"] == "kept" and "set-cookie" not in answer.headers


def test_corrupt_value_file_is_a_miss_and_is_replaced(start_proxy, upstream, marker):
    proxy = start_proxy()
    body = chat_body(marker + " " + "lorem ipsum " * 4000)  # a 48 KB answer: a value file of its own
    first = post(proxy, upstream, CHAT, body)
    wait_for_stored(proxy)
    (value_file,) = Path(proxy.options["ai_cache_dir"]).rglob("*.val")
    data = bytearray(value_file.read_bytes())
    data[-2000:-1996] = b"EVIL"
    value_file.write_bytes(bytes(data))
    again = post(proxy, upstream, CHAT, body)
    assert again.headers["x-ai-cache-status"] == "MISS" and b"EVIL" not in again.content
    assert wait_for_status(proxy, upstream, body, "HIT").content == again.content != first.content
    assert "checksum mismatch" in proxy.logs()


# Answers wait up to 50 ms for their batch write: a proxy stopped right after answering
# must still write them.
def test_answers_waiting_for_their_write_are_written_when_the_proxy_stops(start_proxy, upstream, marker):
    proxy = start_proxy()
    keys = [post(proxy, upstream, CHAT, chat_body(f"{marker} {i}")).headers["x-ai-cache-key"] for i in range(3)]
    proxy.stop()  # SIGTERM at once
    store = DiskStore(proxy.options["ai_cache_dir"])
    try:
        assert all(store.get_sync(key) is not None for key in keys)
    finally:
        store.close_sync()
    assert proxy.logs().count(": stored") == 3
