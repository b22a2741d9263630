"""Comments, metrics and commands (comments.py, metrics.py, commands.py) through taddons on a real diskcache."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client import generate_latest

from ai_cache.addon import AICache
from ai_cache.commands import Commands
from ai_cache.comments import HIT_MARKER, Comments
from ai_cache.launch import free_port
from ai_cache.metrics import Metrics, reason_class
from ai_cache.options import parse_listen
from helpers import chat_flow, upstream_answers

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def addons(tmp_path):
    cache = AICache()
    comments, metrics, commands = Comments(cache), Metrics(cache), Commands(cache)
    with taddons.context(cache, metrics, commands) as tctx:
        tctx.configure(cache, ai_cache_dir=str(tmp_path / "cache"))
        yield tctx, cache, comments, metrics
        await cache.cache.close()


async def through(cache: AICache, body: dict = BODY, **headers: str):
    """One flow through the hooks (AICache tells the others)."""
    flow = chat_flow(body, **headers)
    await cache.request(flow)
    if flow.response is None:
        upstream_answers(cache, flow)
    cache.response(flow)
    await cache.cache.drain()
    return flow


async def test_flows_get_their_cache_outcome_as_comment_and_hits_a_marker(addons):
    tctx, cache, comments, metrics = addons
    miss = await through(cache)
    assert miss.comment == "ai-cache MISS stored" and not miss.marked
    hit = await through(cache)
    assert hit.comment == "ai-cache HIT l1 age 0s, saved 7 tokens" and hit.marked == HIT_MARKER
    bypass = await through(cache, x_ai_cache_bypass="1")
    assert bypass.comment == "ai-cache BYPASS client asked"
    assert (await through(cache, {**BODY, "n": 2})).comment == "ai-cache MISS stored"
    broken = chat_flow({**BODY, "n": 3})
    await cache.request(broken)
    upstream_answers(cache, broken, status=500)
    cache.response(broken)
    await asyncio.sleep(0)  # the recording concludes once the answer was sent
    assert broken.comment == "ai-cache MISS not stored: upstream answered 500"

    numbers = await metrics.stats()
    assert numbers["requests"] == {"MISS": 3, "HIT": 1, "BYPASS": 1}
    assert numbers["stored"] == {"json": 2} and numbers["not_stored"] == {"status": 1}
    assert numbers["tokens_saved"] == {"openai-chat": 7}
    assert numbers["entries"] == {"l1": 2}
    text = (await metrics.prometheus()).decode()
    assert 'ai_cache_requests_total{layer="l1",protocol="openai-chat",status="HIT"} 1.0' in text
    assert 'ai_cache_not_stored_total{reason="status"} 1.0' in text
    assert 'ai_cache_entries{layer="l1"} 2' in text


async def test_a_second_metrics_addon_has_its_own_registry(addons):
    _, cache, _, metrics = addons
    other = Metrics(cache)
    assert other.registry is not metrics.registry
    assert (await other.prometheus()).count(b"# TYPE ai_cache_requests_total counter") == 1


async def test_the_model_label_is_opt_in(addons):
    tctx, cache, comments, metrics = addons
    await through(cache)
    assert b'model="' not in await metrics.prometheus()
    tctx.configure(cache, ai_cache_metrics_models=True)
    await through(cache, {**BODY, "model": "gpt-4o-mini"})
    assert b'model="gpt-4o-mini"' in await metrics.prometheus()


async def test_stats_clear_and_delete_commands(addons, caplog):
    tctx, cache, comments, metrics = addons
    first = await through(cache)
    second = await through(cache, {**BODY, "n": 2})
    summary = tctx.master.commands.execute("ai_cache.stats")
    assert summary.startswith("ai-cache: 2 LLM calls: 0 hits, 2 misses; 2 stored")
    key = first.metadata["ai_cache"]["key"]
    tctx.master.commands.execute(f"ai_cache.delete {key[:20]}")
    await cache.cache.drain()
    assert cache.cache.disk.keys_sync() == [second.metadata["ai_cache"]["key"]]
    tctx.master.commands.execute("ai_cache.delete nosuchkey")
    await cache.cache.drain()
    assert "ai_cache.delete nosuchkey: 0 keys match, none deleted" in caplog.text
    assert len(cache.cache.disk.keys_sync()) == 1
    tctx.master.commands.execute("ai_cache.clear")
    await cache.cache.drain()
    assert cache.cache.disk.keys_sync() == []


async def test_delete_and_clear_commands_drop_semantic_questions_too(addons):
    tctx, cache, comments, metrics = addons
    tctx.configure(cache, ai_cache_semantic="on", ai_cache_embed_url="http://127.0.0.1:9/v1/embeddings")
    first, second = await through(cache), await through(cache, {**BODY, "n": 2})
    keys = [flow.metadata["ai_cache"]["key"] for flow in (first, second)]
    local = cache.semantic.local
    for n, key in enumerate([*keys, "f" * 64]):  # the last: a question whose entry went by itself
        local.add_sync(key, "partition", f"question {n}", 1.0, np.eye(4, dtype=np.float32)[n])
    tctx.master.commands.execute(f"ai_cache.delete {keys[0][:20].upper()}")  # keys are hex: any case
    await cache.cache.drain()
    assert cache.cache.disk.keys_sync() == [keys[1]] and local.counts_sync()[0] == 2
    tctx.master.commands.execute("ai_cache.clear")
    await cache.cache.drain()
    assert cache.cache.disk.keys_sync() == [] and local.counts_sync()[0] == 0


@pytest.mark.parametrize(
    "reason,expected",
    [
        ("stream ended without its terminal event", "incomplete"),
        ("stream cut off mid-frame", "incomplete"),
        ('error event in stream: {"error": 1}', "error_event"),
        ("upstream answered 429", "status"),
        ("larger than ai_cache_max_body (10 bytes)", "too_large"),
        ("too large: the entry has 20 bytes, above ai_cache_max_body", "too_large"),
        ("br-encoded, which cannot be decoded within a size bound here", "encoded"),
        ("Client disconnected.", "client_gone"),
        ("the store write failed: OSError()", "write_failed"),
        ("L1 write failed", "write_failed"),
        ("something new", "other"),
    ],
)
def test_not_stored_reasons_fall_into_a_small_fixed_set(reason, expected):
    assert reason_class(reason) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("", None), ("9464", ("127.0.0.1", 9464)), ("0.0.0.0:9464", ("0.0.0.0", 9464)), ("[::1]:9464", ("::1", 9464))],
)
def test_metrics_listen_address(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["x", "host:", "70000", "0", "a:b"])
def test_bad_metrics_address_is_refused_naming_the_option(tmp_path, text):
    cache = AICache()
    with taddons.context(cache) as tctx:
        tctx.configure(cache, ai_cache_dir=str(tmp_path / "cache"))
        with pytest.raises(exceptions.OptionsError, match="ai_cache_metrics"):
            tctx.configure(cache, ai_cache_metrics=text)


async def test_lookups_are_timed_by_layer(addons):
    tctx, cache, comments, metrics = addons
    await through(cache)
    await through(cache)
    numbers = await metrics.stats()
    assert numbers["lookups"]["l1"]["count"] == 2  # the miss's and the hit's
    assert 'ai_cache_lookup_seconds_count{layer="l1"} 2.0' in (await metrics.prometheus()).decode()


def test_lookup_histogram_buckets_are_cumulative_and_hold_their_bound(addons):
    metrics = addons[3]
    for seconds in (0.0005, 0.0007, 0.3, 5.0):  # on a bound, between two, above them all
        metrics.looked_up("l2", seconds)
    text = generate_latest(metrics.registry).decode()
    for le, count in (("0.0005", 1), ("0.001", 2), ("0.25", 2), ("1.0", 3), ("+Inf", 4)):
        assert f'ai_cache_lookup_seconds_bucket{{layer="l2",le="{le}"}} {count}.0' in text
    assert 'ai_cache_lookup_seconds_sum{layer="l2"} 5.3012' in text


async def test_redis_failures_are_counted_by_op_and_l2_is_down(addons):
    tctx, cache, comments, metrics = addons
    tctx.configure(cache, ai_cache_redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    metrics.configure({"ai_cache_redis_url"})
    await through(cache)
    numbers = await metrics.stats()
    assert numbers["l2_errors"]["get"] == 1
    assert numbers["l2_up"] == 0
    text = (await metrics.prometheus()).decode()
    assert 'ai_cache_l2_errors_total{op="get"} 1.0' in text and "ai_cache_l2_up 0.0" in text
