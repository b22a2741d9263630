"""End to end: identical requests in flight while the first is answered (single flight).
A leader that lands without a usable entry releases all its followers at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from helpers import CHAT, chat_body, post

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
