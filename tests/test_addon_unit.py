"""The addon's hooks through mitmproxy's own taddons/tflow helpers, on a real diskcache."""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy import exceptions, http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow, tutils

from ai_cache.addon import AICache
from ai_cache.keys import KeyPolicy, cacheable_request, header_map
from ai_cache.redis_store import CircuitBreaker, redact
from ai_cache.options import misset_options, parse_duration, parse_size
from ai_cache.protocols import recognise

ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
          "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


def chat_flow(body: bytes | dict, path: str = "/v1/chat/completions", **headers: str) -> http.HTTPFlow:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = tutils.treq(method=b"POST", host="api.openai.com", port=443, scheme=b"https", path=path.encode(),
                          content=content, headers=http.Headers(((b"content-type", b"application/json"),)))
    for name, value in headers.items():
        request.headers[name.replace("_", "-")] = value
    return tflow.tflow(req=request)


def answered(flow: http.HTTPFlow, body: dict = ANSWER, status: int = 200) -> http.HTTPFlow:
    """A complete response in place, as another addon's `request` hook would set it."""
    flow.response = http.Response.make(status, json.dumps(body), {"content-type": "application/json"})
    return flow


def upstream_answers(addon: AICache, flow: http.HTTPFlow, body: dict = ANSWER, status: int = 200) -> None:
    """As mitmproxy does for a server's answer: headers (and the hook) first, then the body."""
    answered(flow, body, status)
    content, flow.response.raw_content = flow.response.raw_content, None
    addon.responseheaders(flow)
    flow.response.raw_content = content


@pytest.fixture
async def addon(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        yield addon
        await addon.cache.close()


async def test_miss_is_stored_and_the_next_request_is_answered_from_disk(addon):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    first = chat_flow(body, authorization="Bearer sk-1")
    await addon.request(first)
    assert first.metadata["ai_cache"]["status"] == "MISS"
    assert first.request.headers["accept-encoding"] == "identity"
    upstream_answers(addon, first)
    await addon.response(first)
    await addon.cache.drain()

    second = chat_flow(body, authorization="Bearer sk-2")
    await addon.request(second)
    assert second.metadata["ai_cache"]["status"] == "HIT"
    assert json.loads(second.response.content) == ANSWER
    assert second.response.headers["X-AI-Cache-Layer"] == "l1"
    stored = addon.cache.disk.get_sync(first.metadata["ai_cache"]["key"])
    assert stored.meta["usage"] == {"input": 3, "output": 4}
    assert "sk-1" not in json.dumps(stored.header_dict())
    # Per-flow state stays plain data: flows can still be saved with -w.
    json.dumps(second.metadata)


async def test_unrecognised_traffic_is_untouched(addon):
    flow = tflow.tflow()
    before = flow.request.get_state()
    await addon.request(flow)
    assert flow.request.get_state() == before and "ai_cache" not in flow.metadata


async def test_control_headers_are_removed_before_upstream(addon):
    flow = chat_flow({"model": "m", "messages": []}, x_ai_cache_bypass="1", x_ai_cache_whatever="x")
    await addon.request(flow)
    assert flow.metadata["ai_cache"]["status"] == "BYPASS"
    assert not [h for h in flow.request.headers if h.lower().startswith("x-ai-cache")]


async def test_error_answers_and_failed_flows_are_not_stored(addon):
    for status in (429, 500):
        flow = chat_flow({"model": "m", "messages": [], "n": status})
        await addon.request(flow)
        assert flow.metadata["ai_cache"]["status"] == "MISS"
        upstream_answers(addon, flow, status=status)
        await addon.response(flow)
    await addon.cache.drain()
    assert list(addon.cache.disk.keys_sync()) == []


BAD_VALUES = [
    ("ai_cache_ttl", "abc"), ("ai_cache_mode", "bogus"), ("ai_cache_max_body", "-5"),
    ("ai_cache_max_body", "0"), ("ai_cache_replay_speed", "-1"), ("ai_cache_redis_timeout", "nan"),
    ("ai_cache_redis_url", "redis://host:notaport"), ("ai_cache_redis_pool", "0"), ("ai_cache_redis_pool", "many"),
]


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_a_bad_option_at_startup_is_one_error_line_naming_it(tmp_path, caplog, option, value):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path), **{option: value})
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"ai-cache: {option}: ") and "\n" not in errors[0]
    assert addon.settings is None and addon.cache is None  # unconfigured: passes everything through


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_a_bad_option_while_running_is_rolled_back(tmp_path, option, value):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path))
        settings = addon.settings
        with pytest.raises(exceptions.OptionsError, match=option):
            tctx.configure(addon, **{option: value})
        assert addon.settings == settings and getattr(tctx.options, option) != value
        addon.cache.disk.close_sync()


def test_misspelt_and_repeated_options_are_named():
    with taddons.context() as tctx:
        tctx.options.set("ai_cache_tll=7d", "ai_cache_mode=replay", "ai_cache_dir=a", "ai_cache_dir=b",
                         "ai_cache_zzzzzz=1", "other_addon_option=1", defer=True)
        assert sorted(misset_options(tctx.options.deferred)) == [
            "ai_cache_dir is set 2 times; set each option once",
            "unknown option ai_cache_tll (did you mean ai_cache_ttl?)",
            "unknown option ai_cache_zzzzzz",
        ]


def test_durations_and_sizes():
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("7d") == 604800
    assert parse_size("10MiB") == 10 * 1024**2 and parse_size("512kb") == 512 * 1024 and parse_size("7") == 7
    with pytest.raises(ValueError):
        parse_size("-5")


@pytest.mark.parametrize("method,path,expected", [
    ("POST", "/v1/chat/completions", "openai-chat"),
    ("POST", "/openai/deployments/x/chat/completions", "openai-chat"),
    ("POST", "/v1/completions", "openai-completions"),
    ("POST", "/v1/responses", "openai-responses"),
    ("POST", "/v1/embeddings", "openai-embeddings"),
    ("POST", "/v1/messages", "anthropic-messages"),
    ("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", "gemini"),
    ("POST", "/api/generate", "ollama"),
    ("POST", "/v1/threads/t1/messages", None),
    ("GET", "/v1/chat/completions", None),
    ("POST", "/v1/files", None),
])
def test_recognition_by_method_and_path(method, path, expected):
    found = recognise(method, path)
    assert (found.name if found else None) == expected


def test_keys_ignore_credentials_but_not_answer_headers():
    policy = KeyPolicy()
    protocol = recognise("POST", "/v1/messages")
    base = chat_flow({"model": "c"}, "/v1/messages?key=a", x_api_key="one").request
    same = chat_flow({"model": "c"}, "/v1/messages?key=b", x_api_key="two").request
    other = chat_flow({"model": "c"}, "/v1/messages", anthropic_version="2023-06-01").request
    keys = [cacheable_request(r, header_map(r), protocol, policy).key for r in (base, same, other)]
    assert keys[0] == keys[1] != keys[2]
    described = cacheable_request(base, header_map(base), protocol, policy).described
    assert "one" not in json.dumps(described) and "key" not in dict(described["query"])


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


async def test_replay_mode_never_goes_upstream_even_without_a_usable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(blocker / "cache"), ai_cache_mode="replay")
        flow = chat_flow({"model": "m", "messages": []}, x_ai_cache_bypass="1")
        await addon.request(flow)
        assert flow.response is not None and flow.response.status_code == 504
        assert flow.metadata["ai_cache"]["status"] == "MISS"


@pytest.mark.parametrize("hosts,cached", [
    ("", True), ("api.openai.com", True), ("*.openai.com", True), ("api.openai.com:443", True),
    ("api.anthropic.com", False), ("localhost:11434,*.anthropic.com", False),
])
async def test_host_allow_list(tmp_path, hosts, cached):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"), ai_cache_hosts=hosts)
        flow = chat_flow({"model": "m", "messages": []})
        await addon.request(flow)
        await addon.cache.close()
        assert ("ai_cache" in flow.metadata) is cached



async def streamed_flow(addon: AICache, body: dict, path: str, frames: list[bytes]) -> http.HTTPFlow:
    """A MISS whose answer streams in: headers through `responseheaders`, then each frame
    through the stream callable, as mitmproxy does."""
    flow = chat_flow(body, path=path)
    await addon.request(flow)
    flow.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    flow.response.raw_content = None
    addon.responseheaders(flow)
    for frame in frames:
        assert flow.response.stream(frame) == frame
    return flow


SSE_CHAT = [b'data: {"id":"c1","choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
GEMINI_PATH = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
GEMINI_FINAL = [b'data: {"candidates":[{"content":{"parts":[{"text":"hi"}]},"finishReason":"STOP"}]}\n\n']
CHAT_STREAM = {"model": "m", "messages": [], "stream": True}


@pytest.mark.parametrize("frames,path,body,stored", [
    (SSE_CHAT, "/v1/chat/completions", CHAT_STREAM, True),
    (SSE_CHAT[:1], "/v1/chat/completions", CHAT_STREAM, False),
    (GEMINI_FINAL, GEMINI_PATH, {"contents": []}, False),  # no sentinel: needs a clean end
], ids=["complete", "cut-before-terminal", "gemini-without-clean-end"])
async def test_a_stream_that_ended_in_error_is_judged_by_its_capture(addon, frames, path, body, stored):
    flow = await streamed_flow(addon, body, path, frames)
    flow.error = Error("Client disconnected.")
    addon.error(flow)
    await addon.cache.drain()
    entry = addon.cache.disk.get_sync(flow.metadata["ai_cache"]["key"])
    assert (entry is not None) == stored
    if stored:
        assert entry.body == b"".join(frames)
