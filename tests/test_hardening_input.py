"""Regression tests for issue 10's input faults: bodies JSON readers disagree on, deep
nesting, lone surrogates, credential parameters, unbounded entries, corrupt and hostile
entries (disk, Redis, fixture files), and exports through symlinks."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import diskcache
import httpx
import pytest
import redis

from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.keys import canonical_json
from ai_cache.redis_store import COMPRESSED, RedisStore
from conftest import Proxy, RedisServer
from helpers import (
    CHAT,
    chat_body,
    fill,
    key_of,
    post,
    redis_key,
    sample_entries,
    stored,
    wait_for_redis_key,
    wait_for_status,
)

SECRET = "SECRETVALUE"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# 1, 7, 9. A body is keyed only when every JSON reader reads it the same way: duplicate
# keys (Python keeps the last, others the first), NaN/Infinity, numbers that overflow,
# nesting deeper than 64, text that is not Unicode. Such bodies pass through as BYPASS.
def call(before: str = "", inside: str = "", prefix: str = "", after: str = "") -> str:
    """A chat call for "hello MARKER", raw, with text spliced in around its fields."""
    return (
        '{"model":"gpt-4o-mini",'
        + before
        + '"messages":[{"role":"user",'
        + inside
        + '"content":"'
        + prefix
        + 'hello MARKER"}]'
        + after
        + "}"
    )


ODD_BODIES = {
    "duplicate key": (
        call(before='"messages":[{"role":"user","content":"ATTACKER TEXT"}],'),
        "duplicate key 'messages'",
    ),
    "nested duplicate": (call(inside='"content":"ATTACKER TEXT",'), "duplicate key 'content'"),
    "NaN": (call(after=',"temperature":NaN'), "NaN in the body"),
    "Infinity": (call(after=',"top_p":Infinity'), "Infinity in the body"),
    "-Infinity": (call(after=',"top_p":-Infinity'), "-Infinity in the body"),
    "overflow": (call(after=',"seed":1e400'), "number 1e400 in the body is out of range"),
    "nested 500 deep": (call(after=f',"metadata":{deep(500)}'), "nested deeper than 64 levels"),
    "lone surrogate": (call(prefix="\\ud800 "), "lone surrogate"),
}


@pytest.mark.parametrize("raw,reason", ODD_BODIES.values(), ids=ODD_BODIES.keys())
def test_bodies_json_readers_disagree_on_pass_through_uncached(shared_proxy, upstream, marker, raw, reason):
    body = raw.replace("MARKER", marker).encode()
    answers = [post(shared_proxy, upstream, CHAT, None, raw=body) for _ in range(2)]
    assert [(a.status_code, a.headers.get("x-ai-cache-status")) for a in answers] == [(200, "BYPASS")] * 2
    assert upstream.count(marker) == 2
    # Nothing was stored under the key of the prompt Python's reading would have given.
    assert post(shared_proxy, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "MISS"
    logs = shared_proxy.logs()
    assert re.search(f"BYPASS openai-chat .*: not cacheable: .*{re.escape(reason)}", logs)
    assert "Addon error" not in logs and "Traceback" not in logs


def test_bodies_nested_up_to_the_limit_are_cached(shared_proxy, upstream, marker):
    # body -> metadata: one level plus 63 lists = 64 levels.
    raw = json.dumps(chat_body(marker)).encode()[:-1] + f',"metadata":{deep(63)}}}'.encode()
    statuses = [post(shared_proxy, upstream, CHAT, None, raw=raw).headers["x-ai-cache-status"] for _ in range(2)]
    assert statuses == ["MISS", "HIT"]


def test_scope_header_that_is_not_utf8_is_keyed(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_scope_headers="authorization")
    headers = {"authorization": b"Bearer \xff\xfe-tenant"}
    statuses = [
        post(proxy, upstream, CHAT, chat_body(marker), headers).headers.get("x-ai-cache-status") for _ in range(2)
    ]
    assert statuses == ["MISS", "HIT"]


# 7. An entry whose decoding raises something other than EntryError (RecursionError here)
#    is a miss and is replaced; it used to be an "Addon error" on every request.
def test_undecodable_l1_entry_is_a_miss_and_is_replaced(shared_proxy, upstream, marker):
    proxy = shared_proxy
    first = post(proxy, upstream, CHAT, chat_body(marker))
    wait_for_status(proxy, upstream, chat_body(marker), "HIT")
    key = first.headers["x-ai-cache-key"]
    head = deep(100_000).encode()  # a version-1 value: no checksum, a header that nests too deep
    with diskcache.Cache(proxy.options["ai_cache_dir"]) as raw_cache:
        raw_cache.set(key, b"AIC" + bytes([1]) + len(head).to_bytes(4, "big") + head)
    again = post(proxy, upstream, CHAT, chat_body(marker))
    assert (again.status_code, again.headers.get("x-ai-cache-status")) == (200, "MISS")
    assert wait_for_status(proxy, upstream, chat_body(marker), "HIT").json() == again.json()
    assert proxy.logs().count(f"discarding unreadable L1 entry {key[:12]}") == 1
    assert "Addon error" not in proxy.logs()


def test_export_survives_an_entry_that_cannot_be_exported(cli, tmp_path, caplog):
    bad = replace(sample_entries()[0], key=key_of("deep"), meta={"request": {"body": json.loads(deep(500))}})
    cache_dir = fill(tmp_path / "cache", [*sample_entries(), bad])
    code, out, _ = cli("--dir", cache_dir, "export", tmp_path / "out")
    assert code == 0 and len(list((tmp_path / "out").iterdir())) == 3
    assert f"discarding unreadable L1 entry {key_of('deep')[:12]}: meta nested deeper" in caplog.text


# 7, 10. Import checks every file like input: a bad one is reported with its reason and
#        skipped, the others are imported, and the exit status is 1.
BAD_FIXTURES = {
    "deep.json": (lambda d: deep(100_000), "not valid JSON"),
    "crlf.json": (lambda d: {**d, "headers": [["x-evil", "a\r\nset-cookie: pwned=1"]]}, "is not a legal header"),
    "name.json": (lambda d: {**d, "headers": [["bad name", "v"]]}, "is not a legal header"),
    "nul.json": (lambda d: {**d, "headers": [["x-a", "a\u0000b"]]}, "is not a legal header"),
    "204.json": (lambda d: {**d, "status": 204}, "status 204 is not 200"),
    "101.json": (lambda d: {**d, "status": 101}, "status 101 is not 200"),
    "slow.json": (lambda d: {**d, "body": [*d["body"][:-1], {**d["body"][-1], "at": 1e308}]}, "chunk times must"),
    "nan.json": (lambda d: {**d, "body": [*d["body"][:-1], {**d["body"][-1], "at": math.nan}]}, "chunk times must"),
    "surrogate.json": (lambda d: {**d, "body": [{"at": 0, "text": "\ud800"}]}, "holds a lone surrogate"),
    "created.json": (lambda d: {**d, "created_at": math.inf}, "created_at inf is not a time"),
    "format.json": (lambda d: {**d, "format": "html"}, "format 'html' is not one of"),
    "usage.json": (lambda d: {**d, "meta": {**d["meta"], "usage": {"input": "9"}}}, "'usage' counts are not integers"),
}


def test_import_rejects_hostile_files_and_imports_the_rest(cli, cache_dir, tmp_path):
    fixtures = tmp_path / "fixtures"
    cli("--dir", cache_dir, "export", fixtures)
    template = json.loads(next(fixtures.glob("anthropic-*.json")).read_text())
    for name, (make, _) in BAD_FIXTURES.items():
        document = make({**template, "key": key_of(name)})
        (fixtures / name).write_text(document if isinstance(document, str) else json.dumps(document))
    framed = {
        **template,
        "key": key_of("framed"),
        "headers": [
            ["content-type", "text/event-stream"],
            ["transfer-encoding", "chunked"],
            ["content-length", "5"],
            ["connection", "keep-alive"],
            ["set-cookie", "a=b"],
            ["x-request-id", "kept"],
        ],
    }
    (fixtures / "framed.json").write_text(json.dumps(framed))

    code, out, err = cli("--dir", tmp_path / "copy", "import", fixtures)
    assert code == 1
    assert out == f"imported 4 entries into {tmp_path / 'copy'}; skipped {len(BAD_FIXTURES)} bad files\n"
    reasons = dict(line.split(": ", 2)[1:] for line in err.splitlines())
    for name, (_, reason) in BAD_FIXTURES.items():
        assert reason in reasons[str(fixtures / name)], (name, reasons[str(fixtures / name)])
    entries = stored(tmp_path / "copy")
    assert entries.keys() == {*stored(cache_dir).keys(), key_of("framed")}
    assert entries[key_of("framed")].headers == [("content-type", "text/event-stream"), ("x-request-id", "kept")]


# 10, 13. Entries planted in L1 or Redis by someone else (or corrupted) are checked like
#         input: a bad one is a miss with one warning and is dropped from that layer.
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
    wait_for_status(proxy, upstream, body, "HIT")
    (value_file,) = Path(proxy.options["ai_cache_dir"]).rglob("*.val")
    data = bytearray(value_file.read_bytes())
    data[-2000:-1996] = b"EVIL"
    value_file.write_bytes(bytes(data))
    again = post(proxy, upstream, CHAT, body)
    assert again.headers["x-ai-cache-status"] == "MISS" and b"EVIL" not in again.content
    assert wait_for_status(proxy, upstream, body, "HIT").content == again.content != first.content
    assert "checksum mismatch" in proxy.logs()


# 11. Credential query parameters beyond the old fixed list, and the user's own
#     (ai_cache_secret_params), never reach a store, an export, `ls --json` or a log line.
def test_credential_query_parameters_are_never_kept(start_proxy, start_redis, upstream, marker, cli, tmp_path):
    server = start_redis()
    proxy = start_proxy(ai_cache_redis_url=server.url, ai_cache_secret_params="X-Tenant-Pass, other", flow_detail="0")
    names = [
        "subscription-key",
        "Code",
        "sig",
        "access-token",
        "Password",
        "client_secret",
        "signature",
        "token",
        "secret",
        "x-tenant-pass",
    ]

    def query(n: int) -> str:
        return "?api-version=1&" + "&".join(f"{name}={SECRET}{n}{i}" for i, name in enumerate(names))

    first = post(proxy, upstream, CHAT + query(1), chat_body(marker))
    client = redis.Redis(port=server.port)
    wait_for_redis_key(client, redis_key(first))
    second = post(proxy, upstream, CHAT + query(2), chat_body(marker))
    assert second.headers["x-ai-cache-status"] == "HIT"  # not part of the key
    other_version = post(proxy, upstream, CHAT + query(1).replace("version=1", "version=2"), chat_body(marker))
    assert other_version.headers["x-ai-cache-status"] == "MISS"  # the rest of the query still is
    cache_dir = Path(proxy.options["ai_cache_dir"])
    code, listed, _ = cli("--dir", cache_dir, "ls", "--json")
    assert code == 0 and marker in listed
    cli("--dir", cache_dir, "export", tmp_path / "export")
    proxy.stop()

    exported = "".join("".join(p.read_text().split()) for p in (tmp_path / "export").iterdir())
    assert '["api-version","1"]' in exported and '["api-version","2"]' in exported  # the rest stays
    files = [p for p in [*cache_dir.rglob("*"), *(tmp_path / "export").iterdir()] if p.is_file()]
    places = {
        "ls --json": listed.encode(),
        "logs": proxy.logs().encode(),
        "redis": b"".join(client.get(k) or b"" for k in client.keys("*")),
        **{str(p): p.read_bytes() for p in files},
    }
    assert {place for place, data in places.items() if SECRET.encode() in data} == set()


# 2. Entries are bounded: a large request keeps a preview and a hash, the whole encoded
#    value stays within ai_cache_max_body, and Redis compression follows the encoded size.
def test_a_large_request_keeps_a_preview_and_a_hash(shared_proxy, upstream, marker, cli):
    proxy = shared_proxy
    body = chat_body(marker)
    body["messages"].insert(0, {"role": "system", "content": "lorem ipsum " * 100_000})  # 1.2 MB
    first = post(proxy, upstream, CHAT, body)
    assert wait_for_status(proxy, upstream, body, "HIT").content == first.content
    store = DiskStore(proxy.options["ai_cache_dir"])
    entry = store.get_sync(first.headers["x-ai-cache-key"])
    store.close_sync()
    text = canonical_json(body).encode()
    request = entry.meta["request"]
    assert "body" not in request and request["body_size"] == len(text)
    assert request["body_sha256"] == hashlib.sha256(text).hexdigest()
    assert text.decode().startswith(request["body_preview"]) and len(request["body_preview"]) >= 1000
    assert entry.meta["preview"] == f"hello {marker}"
    assert len(entry.to_bytes()) < 8 * 1024
    code, shown, _ = cli("--dir", proxy.options["ai_cache_dir"], "show", first.headers["x-ai-cache-key"])
    assert code == 0 and f"sha256 {request['body_sha256']}" in shown


def test_entries_larger_than_max_body_are_not_stored(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_max_body="20KiB")
    body = chat_body(marker)
    body["messages"].insert(0, {"role": "system", "content": "lorem ipsum " * 4000})  # a 48 KB request copy
    first = post(proxy, upstream, CHAT, body)
    assert len(first.content) < 1024  # the answer alone is far below the cap
    for _ in range(100):  # the write (and its check) runs in the background
        if "not stored: too large: the entry has" in proxy.logs():
            break
        time.sleep(0.05)
    assert "not stored: too large: the entry has" in proxy.logs()
    assert post(proxy, upstream, CHAT, body).headers["x-ai-cache-status"] == "MISS"


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


# 12. Export writes new files and renames them: a symlink planted under a fixture's name
#     is replaced, its target left alone.
def test_export_does_not_write_through_symlinks(cli, cache_dir, tmp_path):
    out = tmp_path / "out"
    cli("--dir", cache_dir, "export", out)
    names = sorted(p.name for p in out.iterdir())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for p in out.iterdir():
        p.unlink()
        p.symlink_to(victim)
    assert cli("--dir", cache_dir, "export", out)[0] == 0
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == names
    assert not any(p.is_symlink() for p in out.iterdir())
    assert all(json.loads(p.read_text())["ai_cache_fixture"] == 1 for p in out.iterdir())


# 13. Entries written before the checksum (version 1) are still read.
def test_version_1_entries_are_still_read():
    entry = sample_entries()[1]
    head = json.dumps({"version": 1, **entry.header_dict()}).encode()
    data = b"AIC" + bytes([1]) + len(head).to_bytes(4, "big") + head + entry.body
    assert Entry.from_bytes(data, entry.key) == entry
    assert Entry.from_bytes(entry.to_bytes(), entry.key) == entry
