"""End to end: single flight across proxies sharing a real redis-server (issue 15, item 2)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from helpers import CHAT, chat_body, post

SLOW = {"x-fake-scenario": "delay-1000"}


def lease_holder(client: redis.Redis) -> bytes | None:
    """The token of the one fleet lease in Redis, None if there is none."""
    keys = client.keys("*:lease")
    return client.get(keys[0]) if keys else None


def wait_for_lease(client: redis.Redis) -> bytes:
    for _ in range(200):
        if (token := lease_holder(client)) is not None:
            return token
        time.sleep(0.02)
    raise AssertionError("no proxy took a fleet lease")


def lease_released(client: redis.Redis) -> bool:
    for _ in range(200):
        if lease_holder(client) is None:
            return True
        time.sleep(0.02)
    return False


def test_two_proxies_make_one_upstream_call_for_identical_requests(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    proxies = [start_proxy(ai_cache_redis_url=server.url) for _ in range(2)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post(proxies[i % 2], upstream, CHAT, chat_body(marker), SLOW), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert upstream.count(marker) == 1
    assert len({a.content for a in answers}) == 1
    statuses = sorted(a.headers["x-ai-cache-status"] for a in answers)
    assert statuses == ["HIT"] * 5 + ["MISS"]
    assert lease_released(redis.Redis(port=server.port))  # once its answer was written


def test_a_waiter_takes_over_when_the_leaders_proxy_dies(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    leader_proxy, other = (start_proxy(ai_cache_redis_url=server.url) for _ in range(2))
    client = redis.Redis(port=server.port)
    headers = {"x-fake-scenario": "delay-3000"}

    def lead() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its proxy is killed mid-answer
            post(leader_proxy, upstream, CHAT, chat_body(marker), headers)

    threading.Thread(target=lead, daemon=True).start()
    dead_token = wait_for_lease(client)
    answers: list = []
    waiter = threading.Thread(target=lambda: answers.append(post(other, upstream, CHAT, chat_body(marker), SLOW)))
    waiter.start()
    leader_proxy.proc.kill()  # kill -9: no release, the lease must expire
    last_seen = time.monotonic()
    while lease_holder(client) == dead_token:
        last_seen = time.monotonic()
        time.sleep(0.01)
    waiter.join(30)
    (answer,) = answers
    assert answer.status_code == 200 and answer.headers["x-ai-cache-status"] == "MISS"
    arrivals = upstream.arrivals(marker)
    assert len(arrivals) == 2
    assert arrivals[1] > last_seen  # the waiter went upstream only once the dead leader's lease was gone


def test_requests_are_answered_when_redis_dies_mid_flight(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    proxies = [start_proxy(ai_cache_redis_url=server.url) for _ in range(2)]
    client = redis.Redis(port=server.port)
    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(post, proxies[i % 2], upstream, CHAT, chat_body(marker), SLOW) for i in range(6)]
        wait_for_lease(client)
        server.proc.kill()
        answers = [f.result(timeout=30) for f in pending]
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
    # Without Redis each proxy falls back to its own single flight: one call each, at most.
    assert upstream.count(marker) <= 2


def test_waiters_of_a_leader_that_stored_nothing_go_upstream_at_once(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    proxies = [start_proxy(ai_cache_redis_url=server.url) for _ in range(2)]
    failing = {"x-fake-scenario": "status-503,delay-1000"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post(proxies[i % 2], upstream, CHAT, chat_body(marker), failing), range(6)))
    assert [a.status_code for a in answers] == [503] * 6
    arrivals = upstream.arrivals(marker)
    assert len(arrivals) == 6  # the leader, then every waiter of both proxies once
    # They waited for the leader's answer, then all went within one round trip of each
    # other: a chain of leaders (one per proxy) would space them a whole answer apart.
    assert arrivals[1] - arrivals[0] >= 0.9
    assert arrivals[-1] - arrivals[1] < 1.0, [round(a - arrivals[0], 2) for a in arrivals]
