"""End to end: identical requests in flight while the first is answered (single flight).
A leader that lands without a usable entry releases all its followers at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import CHAT, STREAMS, chat_body, post, stream_raw

DELAY = 1.0  # seconds the fake provider thinks before answering, in the single-flight tests


# Single flight: a leader that lands without a usable entry releases all its followers
# upstream at once (hit-for-pass), never one after another as a chain of new leaders.
def concurrent_posts(proxy, upstream, body: dict, headers: dict, n: int) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post(proxy, upstream, CHAT, body, headers), range(n)))


def assert_followers_went_upstream_together(upstream, marker: str, n: int) -> None:
    arrivals = upstream.arrivals(marker)
    assert len(arrivals) == n  # the leader, then every follower once
    # The followers waited for the leader's answer, then all reached upstream within one
    # round trip of each other: a chain would space them a whole answer apart.
    assert arrivals[1] - arrivals[0] >= 0.9 * DELAY
    assert arrivals[-1] - arrivals[1] < DELAY, [round(a - arrivals[0], 2) for a in arrivals]


def test_followers_of_a_failed_leader_go_upstream_at_once(start_proxy, upstream, marker):
    proxy = start_proxy()
    scenario = {"x-fake-scenario": f"status-503,delay-{int(DELAY * 1000)}"}
    answers = concurrent_posts(proxy, upstream, chat_body(marker), scenario, 20)
    assert [a.status_code for a in answers] == [503] * 20
    assert_followers_went_upstream_together(upstream, marker, 20)


def test_followers_rejecting_the_leaders_entry_go_upstream_at_once(start_proxy, upstream, marker):
    proxy = start_proxy()
    headers = {"x-fake-scenario": f"delay-{int(DELAY * 1000)}", "cache-control": "max-age=0"}
    answers = concurrent_posts(proxy, upstream, chat_body(marker), headers, 10)
    assert [a.headers["x-ai-cache-status"] for a in answers] == ["MISS"] * 10
    assert_followers_went_upstream_together(upstream, marker, 10)


@pytest.mark.parametrize("coalesce,upstream_calls", [("60", 1), ("0", 6)])
def test_identical_requests_in_flight_reach_the_provider_once(start_proxy, upstream, marker, coalesce, upstream_calls):
    proxy = start_proxy(ai_cache_coalesce=coalesce)
    body = chat_body(marker, stream=True)
    with ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(lambda _: stream_raw(proxy, upstream, CHAT, body, {"x-fake-scenario": "slow"}), range(6))
        )
    assert upstream.count(marker) == upstream_calls
    statuses = sorted(r.headers["x-ai-cache-status"] for r, _ in results)
    if upstream_calls == 1:
        assert statuses == ["HIT"] * 5 + ["MISS"]
        assert len({raw for _, raw in results}) == 1  # every follower got the leader's exact stream
        assert "waited for an identical request in flight" in proxy.logs()
    else:
        assert statuses == ["MISS"] * 6


# Single flight does not work for "suspect" streams (every OpenAI Responses stream:
#    its response objects carry `"error": null`). The leader lands before the suspect
#    entry becomes visible, so every follower misses and goes upstream.
def test_single_flight_holds_for_responses_streams(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_coalesce="60")
    path, make, _ = STREAMS["openai-responses"]
    body = make(marker)
    with ThreadPoolExecutor(5) as pool:
        results = list(
            pool.map(lambda _: stream_raw(proxy, upstream, path, body, {"x-fake-scenario": "slow"}), range(5))
        )
    statuses = sorted(r.headers["x-ai-cache-status"] for r, _ in results)
    assert upstream.count(marker) == 1, statuses
