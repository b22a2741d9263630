"""End to end with real redis-server processes: a shared L2 that can never break a request."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from ai_cache.launch import free_port, redis_server_binary, wait_for_port
from helpers import CHAT, chat_body, post, redis_key, stored_lines, stream_raw, wait_for_redis_key, wait_for_stored


def test_two_proxies_share_l2_and_backfill_l1(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    a = start_proxy(ai_cache_redis_url=server.url)
    b = start_proxy(ai_cache_redis_url=server.url)
    first = post(a, upstream, CHAT, chat_body(marker))
    wait_for_redis_key(redis.Redis(port=server.port), redis_key(first))
    from_l2 = post(b, upstream, CHAT, chat_body(marker))
    assert (from_l2.headers["x-ai-cache-status"], from_l2.headers["x-ai-cache-layer"]) == ("HIT", "l2")
    # The back-fill is written in the background, yet the very next request is an L1 hit.
    again = post(b, upstream, CHAT, chat_body(marker))
    assert (again.headers["x-ai-cache-status"], again.headers["x-ai-cache-layer"]) == ("HIT", "l1")
    assert from_l2.content == again.content == first.content
    assert upstream.count(marker) == 1
    # The back-filled entry kept its original age: it is not younger than the first hit said.
    assert int(again.headers["x-ai-cache-age"]) >= int(from_l2.headers["x-ai-cache-age"])


def test_streams_travel_through_l2_byte_identical(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    a = start_proxy(ai_cache_redis_url=server.url)
    b = start_proxy(ai_cache_redis_url=server.url)
    miss, recorded = stream_raw(a, upstream, CHAT, chat_body(marker, stream=True))
    wait_for_redis_key(redis.Redis(port=server.port), redis_key(miss))
    hit, replayed = stream_raw(b, upstream, CHAT, chat_body(marker, stream=True))
    assert hit.headers["x-ai-cache-layer"] == "l2"
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert replayed == recorded
    assert upstream.count(marker) == 1


def test_redis_down_from_the_start(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    answers = [post(proxy, upstream, CHAT, chat_body(marker)) for _ in range(5)]
    assert all(a.status_code == 200 for a in answers)
    assert [a.headers["x-ai-cache-status"] for a in answers] == ["MISS"] + ["HIT"] * 4
    assert {a.headers["x-ai-cache-layer"] for a in answers[1:]} == {"l1"}
    assert proxy.logs().count("skipping it for a while") == 1


def test_redis_killed_mid_run_and_restarted(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    proxy = start_proxy(ai_cache_redis_url=server.url)
    client = redis.Redis(port=server.port)
    before = post(proxy, upstream, CHAT, chat_body(marker + "-a"))
    wait_for_redis_key(client, redis_key(before))
    server.stop()
    during = [post(proxy, upstream, CHAT, chat_body(marker + f"-{i}")) for i in "abc"]
    assert all(a.status_code == 200 for a in during)
    assert during[0].headers["x-ai-cache-status"] == "HIT"
    server.start()  # same port, empty
    key = None
    for i in range(60):  # the breaker probes again after its cool-down
        earlier = stored_lines(proxy)
        answer = post(proxy, upstream, CHAT, chat_body(f"{marker}-after-{i}"))
        assert answer.status_code == 200
        wait_for_stored(proxy, earlier + 1)  # this answer's write ended
        if redis.Redis(port=server.port).exists(redis_key(answer)):
            key = redis_key(answer)
            break
        time.sleep(0.1)
    assert key is not None, "L2 was never used again"
    logs = proxy.logs()
    assert logs.count("skipping it for a while") == 1 and "circuit closed" in logs


@pytest.fixture
def silent_listener():
    """A TCP server that accepts connections and never answers: the worst Redis."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(100)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def test_a_redis_that_never_answers_costs_a_bounded_time(start_proxy, upstream, marker, silent_listener):
    proxy = start_proxy(ai_cache_redis_url=f"redis://127.0.0.1:{silent_listener}/0", ai_cache_redis_timeout="500")
    post(proxy, upstream, CHAT, chat_body(marker))
    start = time.monotonic()
    answers = [post(proxy, upstream, CHAT, chat_body(marker if i % 2 else f"{marker}-{i}")) for i in range(20)]
    elapsed = time.monotonic() - start
    assert all(a.status_code == 200 for a in answers)
    # 20 x 500 ms would be 10 s: the breaker keeps it to a few timeouts at most.
    assert elapsed < 5, elapsed
    assert proxy.logs().count("skipping it for a while") == 1


def test_redis_requiring_a_password_the_url_lacks(start_proxy, start_redis, upstream, marker):
    server = start_redis("--requirepass", "s3cret-pw")
    proxy = start_proxy(ai_cache_redis_url=server.url)
    answers = [post(proxy, upstream, CHAT, chat_body(marker)) for _ in range(3)]
    assert [a.headers["x-ai-cache-status"] for a in answers] == ["MISS", "HIT", "HIT"]
    assert "skipping it for a while" in proxy.logs()
    with_password = start_proxy(ai_cache_redis_url=f"redis://:s3cret-pw@127.0.0.1:{server.port}/0")
    stored = post(with_password, upstream, CHAT, chat_body(marker + "-pw"))
    wait_for_redis_key(redis.Redis(port=server.port, password="s3cret-pw"), redis_key(stored))
    assert "s3cret-pw" not in with_password.logs()


def test_garbage_values_are_discarded_and_replaced(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    client = redis.Redis(port=server.port)
    a = start_proxy(ai_cache_redis_url=server.url)
    first = post(a, upstream, CHAT, chat_body(marker))
    key = redis_key(first)
    wait_for_redis_key(client, key)
    client.set(key, b"\x00garbage that is no entry")
    b = start_proxy(ai_cache_redis_url=server.url)
    answer = post(b, upstream, CHAT, chat_body(marker))
    assert answer.status_code == 200 and answer.headers["x-ai-cache-status"] == "MISS"
    assert "discarding unreadable L2 value" in b.logs()
    for _ in range(100):  # the garbage was dropped, and the next write replaced it
        if (client.get(key) or b"").startswith(b"AIC"):
            break
        time.sleep(0.05)
    assert client.get(key).startswith(b"AIC")


def test_ttl_is_visible_on_redis_keys(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    proxy = start_proxy(ai_cache_redis_url=server.url, ai_cache_ttl="1h")
    answer = post(proxy, upstream, CHAT, chat_body(marker))
    client = redis.Redis(port=server.port)
    wait_for_redis_key(client, redis_key(answer))
    assert 3500 < client.ttl(redis_key(answer)) <= 3600


def redis_cli() -> str | None:
    found = shutil.which("redis-cli", path="/usr/bin:/usr/local/bin")
    bundled = os.path.join(os.path.dirname(redis_server_binary()), "redis-cli")
    return found or (bundled if os.path.exists(bundled) else None)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid, free port too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def test_redis_cluster(start_proxy, upstream, marker, tmp_path):
    cli = redis_cli()
    if cli is None:
        pytest.skip("no redis-cli to create a cluster with")
    ports = [cluster_port() for _ in range(3)]
    nodes = []
    try:
        for port in ports:
            node_dir = tmp_path / f"node-{port}"
            node_dir.mkdir()
            nodes.append(
                subprocess.Popen(
                    [
                        redis_server_binary(),
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node_dir),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_for_port(port)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for _ in range(100):
            if (
                b"cluster_state:ok"
                in subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True).stdout
            ):
                break
            time.sleep(0.1)
        url = f"redis+cluster://127.0.0.1:{ports[0]}"
        a = start_proxy(ai_cache_redis_url=url, ai_cache_redis_timeout="1000")
        b = start_proxy(ai_cache_redis_url=url, ai_cache_redis_timeout="1000")
        bodies = [chat_body(f"{marker}-{i}") for i in range(6)]  # spread over the slots
        for body in bodies:
            post(a, upstream, CHAT, body)
        cluster = redis.RedisCluster(host="127.0.0.1", port=ports[0])
        for body in bodies:
            wait_for_redis_key(cluster, redis_key(post(a, upstream, CHAT, body)))
            answer = post(b, upstream, CHAT, body)
            assert (answer.headers["x-ai-cache-status"], answer.headers["x-ai-cache-layer"]) == ("HIT", "l2")
        assert sum(upstream.count(f"{marker}-{i}") for i in range(6)) == 6
        # Fleet-wide single flight on the cluster: a lease in its entry's slot, one call.
        slow, fleet = {"x-fake-scenario": "delay-1000"}, chat_body(f"{marker}-fleet")
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: post((a, b)[i % 2], upstream, CHAT, fleet, slow), range(4)))
        assert [x.status_code for x in answers] == [200] * 4 and upstream.count(f"{marker}-fleet") == 1
    finally:
        for node in nodes:
            node.kill()
            node.wait()


def test_large_streams_are_compressed_in_redis_and_replay_byte_identical(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    a = start_proxy(ai_cache_redis_url=server.url)
    b = start_proxy(ai_cache_redis_url=server.url)
    headers = {"x-fake-scenario": "big", "x-fake-size": "400000"}
    miss, recorded = stream_raw(a, upstream, CHAT, chat_body(marker, stream=True), headers)
    client = redis.Redis(port=server.port)
    wait_for_redis_key(client, redis_key(miss))
    stored = client.get(redis_key(miss))
    assert stored.startswith(b"AICZ") and len(stored) < len(recorded) / 5
    hit, replayed = stream_raw(b, upstream, CHAT, chat_body(marker, stream=True), headers)
    assert hit.headers["x-ai-cache-layer"] == "l2"
    assert replayed == recorded


# A healthy Redis must not look broken under load: redis-py's async pool refused the
# 101st concurrent call (MaxConnectionsError), which opened the breaker and dropped writes.
def test_200_concurrent_misses_all_reach_redis_and_the_breaker_stays_closed(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    # A generous timeout: on a loaded 2-core machine the proxy's own event loop lags past
    # 100 ms in a 200-flow burst, and such timeouts are real failures for the breaker.
    proxy = start_proxy(ai_cache_redis_url=server.url, ai_cache_redis_timeout="2000")
    n = 200

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(proxy=proxy.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        upstream.url + CHAT, json=chat_body(f"{marker} {i}"), headers={"x-fake-scenario": "delay-300"}
                    )
                    for i in range(n)
                )
            )

    answers = asyncio.run(burst())
    assert [a.headers["x-ai-cache-status"] for a in answers] == ["MISS"] * n
    keys = {"ai-cache:" + a.headers["x-ai-cache-key"] for a in answers}
    client = redis.Redis(port=server.port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(client.exists(k) for k in keys) < n:
        time.sleep(0.1)  # the writes finish in the background
    assert sum(client.exists(k) for k in keys) == n
    assert "skipping it for a while" not in proxy.logs()


# A Redis that refuses writes (out of memory, a read-only replica) still serves reads:
# the refusal is not an outage of the whole store.
def test_a_redis_refusing_writes_still_serves_hits(start_proxy, start_redis, upstream, marker):
    server = start_redis()
    recorder = start_proxy(ai_cache_redis_url=server.url)
    recorded = post(recorder, upstream, CHAT, chat_body(marker))
    client = redis.Redis(port=server.port)
    wait_for_redis_key(client, "ai-cache:" + recorded.headers["x-ai-cache-key"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # every write is refused now: OOM
    proxy = start_proxy(ai_cache_redis_url=server.url)  # an empty L1: everything comes from L2
    for i in range(3):
        assert post(proxy, upstream, CHAT, chat_body(f"{marker} new {i}")).headers["x-ai-cache-status"] == "MISS"
    hit = post(proxy, upstream, CHAT, chat_body(marker))
    assert (hit.headers["x-ai-cache-status"], hit.headers.get("x-ai-cache-layer")) == ("HIT", "l2")
    assert upstream.count(marker) == 4  # the recording and the three new questions
    logs = proxy.logs()
    assert "skipping it for a while" not in logs
    assert logs.count("refuses writes") == 1
