"""End to end: the real mitmdump with the addon, the fake provider, real clients; JSON answers."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time

import anthropic
import pytest

from ai_cache.keys import canonical_json
from ai_cache.launch import mitmdump_command
from conftest import ADDON
from helpers import CHAT, chat_body, deep, on_disk, openai_client, post, wait_for_status


def test_openai_sdk_miss_then_hit_replays_the_same_answer(shared_proxy, upstream, marker):
    client = openai_client(shared_proxy, upstream)
    messages = [{"role": "user", "content": f"hi {marker}"}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    second = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    assert first.headers["x-ai-cache-status"] == "MISS"
    assert second.headers["x-ai-cache-status"] == "HIT"
    assert second.headers["x-ai-cache-layer"] == "l1"
    assert int(second.headers["x-ai-cache-age"]) >= 0
    assert first.headers["x-ai-cache-key"] == second.headers["x-ai-cache-key"]
    a, b = first.parse(), second.parse()
    assert a.id == b.id and a.choices[0].message.content == f"echo: hi {marker}"
    assert b.model_dump() == a.model_dump()
    assert upstream.count(marker) == 1
    assert "set-cookie" not in second.headers  # upstream cookies are never replayed


def test_anthropic_sdk_miss_then_hit(shared_proxy, upstream, marker):
    client = anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url=upstream.url,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(proxy=shared_proxy.url),
    )
    ask = dict(model="claude-sonnet-4", max_tokens=64, messages=[{"role": "user", "content": marker}])
    first = client.messages.with_raw_response.create(**ask)
    second = client.messages.with_raw_response.create(**ask)
    assert [first.headers["x-ai-cache-status"], second.headers["x-ai-cache-status"]] == ["MISS", "HIT"]
    assert first.parse().id == second.parse().id
    assert second.parse().content[0].text == f"echo: {marker}"
    assert upstream.count(marker) == 1


PROTOCOL_CALLS = {
    "openai-chat": (CHAT, lambda m: chat_body(m)),
    "azure-chat": (
        "/openai/deployments/gpt4/chat/completions?api-version=2024-10-21",
        lambda m: {"messages": [{"role": "user", "content": m}]},
    ),
    "openai-completions": ("/v1/completions", lambda m: {"model": "gpt-3.5-turbo-instruct", "prompt": m}),
    "openai-responses": ("/v1/responses", lambda m: {"model": "gpt-4o", "input": m}),
    "openai-embeddings": ("/v1/embeddings", lambda m: {"model": "text-embedding-3-small", "input": [m, "b"]}),
    "anthropic-messages": (
        "/v1/messages",
        lambda m: {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": m}]},
    ),
    "gemini": (
        "/v1beta/models/gemini-2.0-flash:generateContent",
        lambda m: {"contents": [{"role": "user", "parts": [{"text": m}]}]},
    ),
    "ollama": (
        "/api/chat",
        lambda m: {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": m}]},
    ),
}


@pytest.mark.parametrize("path,make", PROTOCOL_CALLS.values(), ids=PROTOCOL_CALLS.keys())
def test_each_protocol_is_cached(shared_proxy, upstream, marker, path, make):
    first = post(shared_proxy, upstream, path, make(marker))
    second = post(shared_proxy, upstream, path, make(marker))
    assert first.status_code == 200, first.text
    assert [first.headers["x-ai-cache-status"], second.headers["x-ai-cache-status"]] == ["MISS", "HIT"]
    assert second.content == first.content
    assert second.headers["content-type"].startswith("application/json")
    assert upstream.count(marker) == 1


def test_key_order_and_whitespace_do_not_split_the_key(shared_proxy, upstream, marker):
    body = chat_body(marker, temperature=0.5)
    compact = json.dumps(body, separators=(",", ":")).encode()
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=3).encode()
    assert post(shared_proxy, upstream, CHAT, None, raw=compact).headers["x-ai-cache-status"] == "MISS"
    assert post(shared_proxy, upstream, CHAT, None, raw=reordered).headers["x-ai-cache-status"] == "HIT"


VARIANTS = {
    "model": ({"model": "gpt-4o"}, {}),
    "temperature": ({"temperature": 0.2}, {}),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, {}),
    "tool_choice": ({"tool_choice": "none"}, {}),
    "response_format": ({"response_format": {"type": "json_object"}}, {}),
    "stream": ({"stream": True}, {}),
    "empty list vs absent": ({"stop": []}, {}),
    "null vs absent": ({"stop": None}, {}),
    "anthropic-version": ({}, {"anthropic-version": "2023-06-01"}),
    "anthropic-beta": ({}, {"anthropic-beta": "tools-2024"}),
    "openai-beta": ({}, {"openai-beta": "assistants=v2"}),
}


@pytest.mark.parametrize("extra,headers", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_answer_determining_input_splits_the_key(shared_proxy, upstream, marker, extra, headers):
    base = post(shared_proxy, upstream, CHAT, chat_body(marker))
    variant = post(shared_proxy, upstream, CHAT, chat_body(marker, **extra), headers)
    assert base.headers["x-ai-cache-status"] == "MISS"
    assert variant.headers["x-ai-cache-status"] == "MISS"
    assert variant.headers["x-ai-cache-key"] != base.headers["x-ai-cache-key"]


def test_path_query_and_host_split_the_key(shared_proxy, upstream, marker):
    body = {"messages": [{"role": "user", "content": marker}]}
    paths = [
        "/openai/deployments/a/chat/completions?api-version=1",
        "/openai/deployments/a/chat/completions?api-version=2",
        "/openai/deployments/b/chat/completions?api-version=1",
    ]
    keys = {post(shared_proxy, upstream, p, body).headers["x-ai-cache-key"] for p in paths}
    with shared_proxy.client() as client:
        other_host = client.post(upstream.url.replace("127.0.0.1", "localhost") + paths[0], json=body)
    keys.add(other_host.headers["x-ai-cache-key"])
    assert len(keys) == 4


def test_credentials_and_noise_never_split_the_key(shared_proxy, upstream, marker):
    post(
        shared_proxy,
        upstream,
        CHAT + "?key=one",
        chat_body(marker),
        {"authorization": "Bearer sk-one", "x-api-key": "one", "user-agent": "a", "x-request-id": "1"},
    )
    second = post(
        shared_proxy,
        upstream,
        CHAT + "?key=two",
        chat_body(marker),
        {"authorization": "Bearer sk-two", "x-api-key": "two", "user-agent": "b", "x-request-id": "2"},
    )
    assert second.headers["x-ai-cache-status"] == "HIT"
    assert upstream.count(marker) == 1


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_error_answers_are_never_stored(shared_proxy, upstream, marker, status):
    for _ in range(2):
        answer = post(shared_proxy, upstream, CHAT, chat_body(marker), {"x-fake-scenario": f"status-{status}"})
        assert answer.status_code == status
        assert answer.headers["x-ai-cache-status"] == "MISS"
    assert upstream.count(marker) == 2


def test_non_json_200_is_not_stored(shared_proxy, upstream, marker):
    for _ in range(2):
        assert post(shared_proxy, upstream, CHAT, chat_body(marker), {"x-fake-scenario": "not-json"}).status_code == 200
    assert upstream.count(marker) == 2


def test_bypass_header_skips_the_cache_and_never_reaches_upstream(shared_proxy, upstream, marker):
    for _ in range(2):
        answer = post(shared_proxy, upstream, CHAT, chat_body(marker), {"X-AI-Cache-Bypass": "1"})
        assert answer.headers["x-ai-cache-status"] == "BYPASS"
    assert upstream.count(marker) == 2
    assert all("x-ai-cache-bypass" not in r.headers for r in upstream.requests if r.contains(marker))
    # Nothing was stored either.
    assert post(shared_proxy, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "MISS"


def test_no_store_bypasses(shared_proxy, upstream, marker):
    answer = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "no-store"})
    assert answer.headers["x-ai-cache-status"] == "BYPASS"
    assert post(shared_proxy, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "MISS"


def test_no_cache_refreshes_and_overwrites(shared_proxy, upstream, marker):
    first = post(shared_proxy, upstream, CHAT, chat_body(marker))
    refreshed = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "no-cache"})
    assert refreshed.headers["x-ai-cache-status"] == "REFRESH"
    assert refreshed.json()["id"] != first.json()["id"]
    wait_for_status(shared_proxy, upstream, chat_body(marker), "HIT")
    assert post(shared_proxy, upstream, CHAT, chat_body(marker)).json()["id"] == refreshed.json()["id"]


def test_max_age_refetches_older_entries(shared_proxy, upstream, marker):
    first = post(shared_proxy, upstream, CHAT, chat_body(marker))
    fresh_enough = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "max-age=3600"})
    assert fresh_enough.headers["x-ai-cache-status"] == "HIT"
    too_old = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "max-age=0"})
    assert too_old.headers["x-ai-cache-status"] == "MISS"
    assert too_old.json()["id"] != first.json()["id"]


def test_only_if_cached(shared_proxy, upstream, marker):
    miss = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "only-if-cached"})
    assert miss.status_code == 504
    assert "no recording" in miss.json()["error"]["message"]
    assert upstream.count(marker) == 0
    post(shared_proxy, upstream, CHAT, chat_body(marker))
    hit = post(shared_proxy, upstream, CHAT, chat_body(marker), {"cache-control": "only-if-cached"})
    assert hit.status_code == 200 and hit.headers["x-ai-cache-status"] == "HIT"


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"\xff\xfe\x00garbage", b'{"model": "x", "messa', b"[1, 2]", b"null"],
    ids=["empty", "text", "non-utf8", "truncated", "array", "null"],
)
def test_bad_bodies_pass_through_untouched(shared_proxy, upstream, marker, raw):
    for _ in range(2):
        answer = post(shared_proxy, upstream, CHAT + f"?m={marker}", None, raw=raw)
        assert answer.status_code == 400  # the provider's own answer reaches the client
        assert answer.headers.get("x-ai-cache-status") == "BYPASS"
    received = [r for r in upstream.requests if r.contains(marker)]
    assert [r.body for r in received] == [raw, raw]


def test_other_traffic_passes_through_without_headers(shared_proxy, upstream):
    with shared_proxy.client() as client:
        answer = client.get(upstream.url + "/v1/models")
    assert answer.status_code == 200
    assert not [h for h in answer.headers if h.startswith("x-ai-cache")]


def test_gzip_answers_are_stored_decoded_and_replay(shared_proxy, upstream, marker):
    headers = {"x-fake-scenario": "gzip", "accept-encoding": "gzip"}
    first = post(shared_proxy, upstream, CHAT, chat_body(marker), headers)
    second = post(shared_proxy, upstream, CHAT, chat_body(marker), headers)
    assert second.headers["x-ai-cache-status"] == "HIT"
    assert second.json() == first.json()
    assert upstream.count(marker) == 1


def test_ttl_expiry(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_ttl="1")
    first = post(proxy, upstream, CHAT, chat_body(marker))
    assert post(proxy, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "HIT"
    time.sleep(1.2)  # let the entry expire: a functional wait, nothing is timed
    expired = post(proxy, upstream, CHAT, chat_body(marker))
    assert expired.headers["x-ai-cache-status"] == "MISS"
    assert expired.json()["id"] != first.json()["id"]


def test_entries_survive_a_restart(start_proxy, upstream, marker):
    proxy = start_proxy()
    first = post(proxy, upstream, CHAT, chat_body(marker))
    wait_for_status(proxy, upstream, chat_body(marker), "HIT")
    proxy.restart()
    again = post(proxy, upstream, CHAT, chat_body(marker))
    assert again.headers["x-ai-cache-status"] == "HIT"
    assert again.json()["id"] == first.json()["id"]
    assert upstream.count(marker) == 1


def test_answers_above_the_size_cap_are_served_but_not_stored(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_max_body="200")
    for _ in range(2):
        answer = post(proxy, upstream, CHAT, chat_body(marker))
        assert answer.json()["choices"][0]["message"]["content"] == f"echo: hello {marker}"
    assert upstream.count(marker) == 2
    assert "not stored: larger than ai_cache_max_body" in proxy.logs()


def test_headers_can_be_turned_off(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_headers="false")
    post(proxy, upstream, CHAT, chat_body(marker))
    second = post(proxy, upstream, CHAT, chat_body(marker))
    assert not [h for h in second.headers if h.startswith("x-ai-cache")]
    assert upstream.count(marker) == 1


def test_ignore_fields_and_scope_headers(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_ignore_fields="user,metadata.trace", ai_cache_scope_headers="authorization")
    alice = {"authorization": "Bearer alice"}
    post(proxy, upstream, CHAT, chat_body(marker, user="u1", metadata={"trace": "1", "keep": 1}), alice)
    same = post(proxy, upstream, CHAT, chat_body(marker, user="u2", metadata={"trace": "2", "keep": 1}), alice)
    assert same.headers["x-ai-cache-status"] == "HIT"
    kept = post(proxy, upstream, CHAT, chat_body(marker, metadata={"keep": 2}), alice)
    assert kept.headers["x-ai-cache-status"] == "MISS"
    bob = post(
        proxy,
        upstream,
        CHAT,
        chat_body(marker, user="u1", metadata={"trace": "1", "keep": 1}),
        {"authorization": "Bearer bob"},
    )
    assert bob.headers["x-ai-cache-status"] == "MISS"


def test_unusable_cache_directory_degrades_to_pass_through(start_proxy, upstream, marker, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proxy = start_proxy(ai_cache_dir=str(blocker / "cache"))
    for _ in range(2):
        answer = post(proxy, upstream, CHAT, chat_body(marker))
        assert answer.status_code == 200
        assert answer.headers["x-ai-cache-status"] == "BYPASS"
    assert upstream.count(marker) == 2
    assert proxy.logs().count("cannot use cache directory") == 1


def test_logs_one_line_per_flow_and_a_summary(start_proxy, upstream, marker):
    proxy = start_proxy()
    post(proxy, upstream, CHAT, chat_body(marker))
    wait_for_status(proxy, upstream, chat_body(marker), "HIT")
    proxy.stop()
    logs = proxy.logs()
    assert "ai-cache: mode=record" in logs
    assert f"MISS openai-chat gpt-4o-mini 127.0.0.1:{upstream.port}/v1/chat/completions" in logs
    assert ": stored" in logs
    assert "HIT l1 openai-chat gpt-4o-mini" in logs and "tokens" in logs
    assert re.search(r"ai-cache: \d+ LLM calls: \d+ hits?, 1 miss; 1 stored, 0 not stored;", logs)


def mitmdump_startup(tmp_path, *settings: str) -> subprocess.CompletedProcess:
    """Start the real mitmdump with the addon and these `--set`s; it must stop on its own."""
    args = mitmdump_command(0, {"confdir": str(tmp_path), "ai_cache_dir": str(tmp_path / "c")}, ADDON)
    for setting in settings:
        args += ["--set", setting]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "option,value",
    [
        ("ai_cache_ttl", "abc"),
        ("ai_cache_mode", "bogus"),
        ("ai_cache_max_body", "-5"),
        ("ai_cache_replay_speed", "fast"),
        ("ai_cache_redis_timeout", "0"),
        ("ai_cache_redis_url", "http://x"),
    ],
)
def test_bad_option_values_stop_startup_naming_the_option(tmp_path, option, value):
    result = mitmdump_startup(tmp_path, f"{option}={value}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert [line for line in output.splitlines() if f"{option}:" in line and "ai-cache: " in line]
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "settings,message",
    [
        (["ai_cache_tll=7d"], "ai-cache: unknown option ai_cache_tll (did you mean ai_cache_ttl?)"),
        (
            ["ai_cache_mode=replay", "ai_cache_mode=record"],
            "ai-cache: ai_cache_mode is set 2 times; set each option once",
        ),
    ],
)
def test_misspelt_or_repeated_options_stop_startup(tmp_path, settings, message):
    result = mitmdump_startup(tmp_path, *settings)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output and "Traceback" not in output


# mitmproxy reads the confdir's config.yaml after --set: a developer's config.yaml turned
# the replay mode a test runner asked for back into record, without a word.
def test_a_setting_the_confdirs_config_yaml_overrides_stops_startup(tmp_path):
    (tmp_path / "config.yaml").write_text("ai_cache_mode: record\n")
    result = mitmdump_startup(tmp_path, "ai_cache_mode=replay")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ai-cache: ai_cache_mode: --set ai_cache_mode=replay is overridden by config.yaml" in output


# A body is keyed only when every JSON reader reads it the same way: duplicate
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


# Entries are bounded: a large request keeps a preview and a hash, and the whole encoded
# value stays within ai_cache_max_body.
def test_a_large_request_keeps_a_preview_and_a_hash(shared_proxy, upstream, marker, cli):
    proxy = shared_proxy
    body = chat_body(marker)
    body["messages"].insert(0, {"role": "system", "content": "lorem ipsum " * 100_000})  # 1.2 MB
    first = post(proxy, upstream, CHAT, body)
    assert wait_for_status(proxy, upstream, body, "HIT").content == first.content
    entry = on_disk(proxy.options["ai_cache_dir"], first.headers["x-ai-cache-key"])
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
