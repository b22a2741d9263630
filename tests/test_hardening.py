"""Regression tests for a review's findings: single flight, hook guards, robustness."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mitmproxy import http
from mitmproxy.test import taddons

from ai_cache.addon import AICache
from ai_cache.capture import StreamCapture
from ai_cache.disk import DiskStore
from ai_cache.redis_store import redact
from ai_cache.protocols import BY_NAME
from test_addon_unit import answered, chat_flow, upstream_answers
from test_e2e_streams import STREAMS, stream_raw


# 1. Single flight does not work for "suspect" streams (every OpenAI Responses stream:
#    its response objects carry `"error": null`). The leader lands before the suspect
#    entry becomes visible, so every follower misses and goes upstream.
def test_single_flight_holds_for_responses_streams(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_coalesce="60")
    path, make, _ = STREAMS["openai-responses"]
    body = make(marker)
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: stream_raw(proxy, upstream, path, body, {"x-fake-scenario": "slow"}),
                                range(5)))
    statuses = sorted(r.headers["x-ai-cache-status"] for r, _ in results)
    assert upstream.count(marker) == 1, statuses


# 2. An exception in the response path (here a RecursionError from json.loads on a deeply
#    nested 200 answer, which json_body_problem/json_object do not catch) skips
#    flights.land(): the key stays in _leaders forever, so every later identical request
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
        await addon.response(first)  # absurdly deep JSON: refused, and the leader lands
        second = chat_flow(body)
        started = time.monotonic()
        await addon.request(second)
        waited = time.monotonic() - started
        await addon.cache.close()
        # The first leader landed: the second request did not wait for it and leads now.
        assert waited < 0.5 and second.metadata["ai_cache"]["leader"] is True


# 3. Passwords given as a query parameter (redis-py accepts ?password=) are logged.
def test_redis_password_in_query_is_redacted():
    assert "hunter2" not in redact("redis://cache.internal:6379/0?password=hunter2")


# 4. WHATWG SSE allows a lone CR as line terminator; such a complete stream is refused.
def test_lone_cr_framed_stream_is_storable():
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", 10**6)
    capture(b'data: {"choices": []}\r\rdata: [DONE]\r\r')
    assert capture.incompleteness() is None


# 5. `ai-cache delete` (and purge/clear) ignore L1 delete failures: "deleted ..." and exit 0.
#    (A locked database, disk I/O error, read-only filesystem: DiskStore swallows it.)
def test_cli_delete_fails_loudly_when_the_store_cannot_delete(tmp_path, monkeypatch, capsys):
    import diskcache

    from ai_cache import cli
    from ai_cache.entry import Entry

    directory = tmp_path / "cache"
    store = DiskStore(directory)
    key = "ab" * 32
    assert store.put_sync(Entry(key, "json", b"{}", []), None)
    store.close_sync()

    def locked(self, *args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(diskcache.Cache, "delete", locked)
    status = cli.main(["--dir", str(directory), "delete", key[:8]])
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert DiskStore(directory).get_sync(key) is not None  # the entry is still there
    assert status != 0, f"exit 0 with: {out.strip()}"


# 7. A chat app's "send message" (POST .../messages, Discord, Slack-likes...) is no
#    Anthropic call: without the fields every real call has, it passes through untouched.
@pytest.mark.parametrize("path,body", [
    ("/api/v10/channels/123/messages", {"content": "hello"}),
    ("/v1/conversations/ch1/messages", {"model": "m", "messages": []}),  # no max_tokens
    ("/v1/chat/completions", {"model": "m"}),  # no messages
])
async def test_non_llm_posts_on_llm_looking_paths_pass_through_untouched(tmp_path, path, body):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        flow = chat_flow(body, path=path, x_ai_cache_bypass="1")
        before = flow.request.get_state()
        await addon.request(flow)
        await addon.cache.close()
        assert "ai_cache" not in flow.metadata and flow.request.get_state() == before


# 8. A response another addon sets in `request` after ai-cache (a mock / map-local script
#    loaded after it) is stored as if the provider had answered it.
async def test_a_response_from_another_addon_is_not_recorded(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "cache"))
        flow = chat_flow({"model": "m", "messages": [{"role": "user", "content": "mock"}]})
        await addon.request(flow)
        answered(flow, {"mocked": True})  # another addon's request hook answers locally
        addon.responseheaders(flow)  # mitmproxy emulates responseheaders for it
        await addon.response(flow)
        await addon.cache.drain()
        stored = list(addon.cache.disk.keys_sync())
        await addon.cache.close()
        assert stored == []


# 9. After a failed leader (429, 5xx, reset) its followers go upstream at once, none of
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
        await addon.response(leader)
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        infos = [f.metadata["ai_cache"] for f in followers]
        await addon.cache.close()
        assert [(i["status"], i.get("leader")) for i in infos] == [("MISS", None)] * 4


# 10. A cluster URL naming a db (or other redis-py constructor errors that are not
#     ValueError) escapes configure as a traceback instead of an OptionsError naming the option.
def test_bad_cluster_url_is_an_options_error(tmp_path):
    from mitmproxy import exceptions

    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path))  # running; at startup it is a logged error
        with pytest.raises(exceptions.OptionsError, match="ai_cache_redis_url"):
            tctx.configure(addon, ai_cache_dir=str(tmp_path), ai_cache_redis_url="redis+cluster://127.0.0.1:7000/1")
