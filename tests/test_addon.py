"""The addon's hooks (ai_cache.addon) through mitmproxy's own taddons/tflow helpers, on a real diskcache."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from mitmproxy import http
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow
from redis import Redis

from ai_cache.addon import AICache
from ai_cache.lease import FleetLeases
from helpers import ANSWER, answered, chat_flow, upstream_answers


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
    addon.response(first)
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
        addon.response(flow)
    await addon.cache.drain()
    assert list(addon.cache.disk.keys_sync()) == []


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


@pytest.mark.parametrize(
    "hosts,cached",
    [
        ("", True),
        ("api.openai.com", True),
        ("*.openai.com", True),
        ("api.openai.com:443", True),
        ("api.anthropic.com", False),
        ("localhost:11434,*.anthropic.com", False),
    ],
)
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


@pytest.mark.parametrize(
    "frames,path,body,stored",
    [
        (SSE_CHAT, "/v1/chat/completions", CHAT_STREAM, True),
        (SSE_CHAT[:1], "/v1/chat/completions", CHAT_STREAM, False),
        (GEMINI_FINAL, GEMINI_PATH, {"contents": []}, False),  # no sentinel: needs a clean end
    ],
    ids=["complete", "cut-before-terminal", "gemini-without-clean-end"],
)
async def test_a_stream_that_ended_in_error_is_judged_by_its_capture(addon, frames, path, body, stored):
    flow = await streamed_flow(addon, body, path, frames)
    flow.error = Error("Client disconnected.")
    addon.error(flow)
    await addon.cache.drain()
    entry = addon.cache.disk.get_sync(flow.metadata["ai_cache"]["key"])
    assert (entry is not None) == stored
    if stored:
        assert entry.body == b"".join(frames)


# An exception in the response path (here a RecursionError from json.loads on a deeply
#    nested 200 answer, which json_body_problem/json_object do not catch) skips
#    flights.land(): the key stays in the flights forever, so every later identical request
#    waits the whole ai_cache_coalesce and no request ever leads again.
async def test_leader_is_released_even_if_the_response_hook_fails(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"), ai_cache_coalesce="1")
        body = {"model": "m", "messages": [{"role": "user", "content": "deep"}]}
        first = chat_flow(body)
        await addon.request(first)
        assert first.metadata["ai_cache"]["leader"] is True
        first.response = http.Response.make(200, b"", {"content-type": "application/json"})
        first.response.raw_content = None  # headers first, as from upstream
        addon.responseheaders(first)
        first.response.raw_content = b"[" * 100_000 + b"]" * 100_000
        addon.response(first)  # absurdly deep JSON: refused, and the leader lands
        await asyncio.sleep(0)  # the recording concludes once the answer was sent
        second = chat_flow(body)
        started = time.monotonic()
        await addon.request(second)
        waited = time.monotonic() - started
        await addon.cache.close()
        # The first leader landed: the second request did not wait for it and leads now.
        assert waited < 0.5 and second.metadata["ai_cache"]["leader"] is True


# A chat app's "send message" (POST .../messages, Discord, Slack-likes...) is no
#    Anthropic call: without the fields every real call has, it passes through untouched.
@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/v10/channels/123/messages", {"content": "hello"}),
        ("/v1/conversations/ch1/messages", {"model": "m", "messages": []}),  # no max_tokens
        ("/v1/chat/completions", {"model": "m"}),  # no messages
    ],
)
async def test_non_llm_posts_on_llm_looking_paths_pass_through_untouched(tmp_path, path, body):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        flow = chat_flow(body, path=path, x_ai_cache_bypass="1")
        before = flow.request.get_state()
        await addon.request(flow)
        await addon.cache.close()
        assert "ai_cache" not in flow.metadata and flow.request.get_state() == before


# A response another addon sets in `request` after ai-cache (a mock / map-local script
#    loaded after it) is stored as if the provider had answered it.
async def test_a_response_from_another_addon_is_not_recorded(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        flow = chat_flow({"model": "m", "messages": [{"role": "user", "content": "mock"}]})
        await addon.request(flow)
        answered(flow, {"mocked": True})  # another addon's request hook answers locally
        addon.responseheaders(flow)  # mitmproxy emulates responseheaders for it
        addon.response(flow)
        await addon.cache.drain()
        stored = list(addon.cache.disk.keys_sync())
        await addon.cache.close()
        assert stored == []


# After a failed leader (429, 5xx, reset) its followers go upstream at once, none of
#    them leading (hit-for-pass): a chain of new leaders made the last one wait for every
#    answer before it (issue 10, item 3; end to end in test_faults.py).
async def test_followers_of_a_failed_leader_pass_together(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        body = {"model": "m", "messages": [{"role": "user", "content": "herd"}]}
        leader = chat_flow(body)
        await addon.request(leader)
        followers = [chat_flow(body) for _ in range(4)]
        waiting = [asyncio.create_task(addon.request(f)) for f in followers]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)  # they wait for the leader
        upstream_answers(addon, leader, {"error": {"message": "rate limited"}}, status=429)
        addon.response(leader)
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        infos = [f.metadata["ai_cache"] for f in followers]
        await addon.cache.close()
        assert [(i["status"], i.get("leader")) for i in infos] == [("MISS", None)] * 4


# The leader's fleet lease is released once its answer's write ended: a proxy stopped
# right after an answer must release it before it closes its Redis client, or the other
# proxies of the fleet wait the lease's life for an answer that is already stored.
async def test_a_stopping_proxy_releases_its_fleet_leases_before_closing_redis(tmp_path, start_redis, monkeypatch):
    server = start_redis()
    release = FleetLeases._release

    async def slow_release(self, lease, stored):  # as over a slower network than loopback
        await asyncio.sleep(0.1)
        await release(self, lease, stored)

    monkeypatch.setattr(FleetLeases, "_release", slow_release)
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"), ai_cache_redis_url=server.url)
        flow = chat_flow({"model": "m", "messages": [{"role": "user", "content": "lease"}]})
        await addon.request(flow)
        assert flow.metadata["ai_cache"]["leader"] is True
        key = flow.metadata["ai_cache"]["key"]
        lease = "{" + addon.settings.redis_prefix + key + "}:lease"
        redis = Redis.from_url(server.url)
        assert redis.exists(lease) == 1  # taken in Redis
        upstream_answers(addon, flow)
        addon.response(flow)
        await addon.done()  # at once: the write and the release are still to come
        assert redis.exists(addon.settings.redis_prefix + key) == 1 and redis.exists(lease) == 0
        redis.close()
