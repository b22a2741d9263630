"""The per-flow lines, the shutdown summary and the connection-line filter of the proxy's log."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from ai_cache.report import SUMMARY, FlowLines, Tally, show_connection_lines
from ai_cache.state import FlowState, Status


def routed(tally: Tally, status: Status, **fields) -> None:
    tally.routed(FlowState("openai-chat", status=status, model="gpt-4o", **fields))


def test_requests_are_counted_by_status_layer_protocol_and_model_and_hits_by_what_they_saved():
    tally = Tally()
    routed(tally, Status.HIT, layer="l1", saved_tokens=30, size=1000)
    routed(tally, Status.HIT, layer="l2", saved_tokens=12, size=24, coalesced=True)
    for status in (Status.MISS, Status.REFRESH, Status.BYPASS):
        routed(tally, status)
    assert tally.by_status() == {"HIT": 2, "MISS": 1, "REFRESH": 1, "BYPASS": 1}
    assert tally.requests[("HIT", "l2", "openai-chat", "gpt-4o")] == 1
    assert tally.requests[("MISS", "none", "openai-chat", "gpt-4o")] == 1
    assert (tally.tokens_saved, tally.bytes_served, tally.coalesced) == ({"openai-chat": 42}, 1024, 1)


def test_summary_counts_calls_and_groups_not_stored_reasons():
    tally = Tally(stored=Counter(json=1))
    routed(tally, Status.HIT, layer="l1", saved_tokens=1, size=1024)
    routed(tally, Status.HIT, layer="l1", size=1024)
    for status in [Status.MISS] * 5 + [Status.BYPASS]:
        routed(tally, status)
    for why in (
        "upstream answered 500",
        'error event in stream: {"error": {"message": "overloaded"}}',
        "upstream answered 500",
        "larger than ai_cache_max_body (1024 bytes)",
    ):
        tally.not_storing(why)
    line = f"ai-cache: {tally.summary()}"
    assert line == (
        "ai-cache: 8 LLM calls: 2 hits, 5 misses, 1 bypass; 1 stored, 4 not stored (upstream answered 500: 2, "
        "error event in stream: 1, larger than ai_cache_max_body: 1); served from cache 2.0 KiB and 1 token"
    )
    assert SUMMARY.fullmatch(line).group(1) == "8"  # what with-ai-cache reads


@pytest.fixture
def server_log(caplog):
    """mitmproxy.proxy.server's records as a handler sees them."""
    caplog.set_level(logging.DEBUG, logger="mitmproxy.proxy.server")
    yield lambda: [(r.levelname, r.getMessage()) for r in caplog.records]
    show_connection_lines(True)


def test_connection_lines_are_dropped_and_everything_else_kept(server_log):
    log = logging.getLogger("mitmproxy.proxy.server")
    show_connection_lines(False)
    show_connection_lines(False)  # idempotent, as configure runs on every option change
    for message in (
        "client connect",
        "server connect api.openai.com:443 (1.2.3.4:443)",
        "server disconnect api.openai.com:443 (1.2.3.4:443)",
        "client disconnect",
        "error establishing server connection: [Errno 111] Connection refused",
        "server connection to api.openai.com:443 killed before connect: x",
    ):
        log.info(message)
    log.warning("client connect")  # never hides a warning
    show_connection_lines(True)
    log.info("client connect")
    assert server_log() == [
        ("INFO", "error establishing server connection: [Errno 111] Connection refused"),
        ("INFO", "server connection to api.openai.com:443 killed before connect: x"),
        ("WARNING", "client connect"),
        ("INFO", "client connect"),
    ]


# A record costs mitmproxy 40-80 µs: the lines of one loop turn (a batch write's) share one.
async def test_flow_lines_of_one_loop_turn_are_one_record_each_line_prefixed(caplog):
    caplog.set_level(logging.INFO, logger="ai_cache.report")
    lines = FlowLines()
    lines.add("MISS openai-chat m a/b 1 B json: stored")
    lines.add("MISS openai-chat m a/c 1 B json: stored")
    assert caplog.records == []  # not before the turn ends
    await asyncio.sleep(0)
    lines.add("HIT l1 openai-chat m a/b 1 B json: age 0s")
    await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records] == [
        "ai-cache: MISS openai-chat m a/b 1 B json: stored\nai-cache: MISS openai-chat m a/c 1 B json: stored",
        "ai-cache: HIT l1 openai-chat m a/b 1 B json: age 0s",
    ]
    lines.add("BYPASS openai-chat m a/b 1 B: client asked")
    lines.flush()  # shutdown: what waits is logged at once, and only once
    await asyncio.sleep(0)
    assert caplog.records[-1].getMessage() == "ai-cache: BYPASS openai-chat m a/b 1 B: client asked"
    assert len(caplog.records) == 3


def test_flow_lines_without_a_loop_are_logged_at_once(caplog):
    caplog.set_level(logging.INFO, logger="ai_cache.report")
    FlowLines().add("MISS openai-chat m a/b 1 B json: stored")
    assert [r.getMessage() for r in caplog.records] == ["ai-cache: MISS openai-chat m a/b 1 B json: stored"]
