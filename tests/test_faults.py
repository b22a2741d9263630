"""Regression tests for faults an adversarial run found (issue 10): single-flight chains,
Redis pool exhaustion and breaker flapping, read-only and full disks, paced replay in
upstream mode, compressed streams. End to end with real processes where the fault is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor

import brotli
import httpx
import pytest
import redis
import redis.asyncio
import zstandard

from ai_cache.capture import StreamCapture
from ai_cache.decoders import BOUNDED_BROTLI
from ai_cache.protocols import BY_NAME
from ai_cache.redis_store import RedisStore
from conftest import BIN, Proxy
from fake_upstream import FakeUpstream, make_tls_cert
from helpers import CHAT, chat_body, post, stream_raw, wait_for_redis_key, wait_for_status

DELAY = 1.0  # seconds the fake provider thinks before answering, in the single-flight tests


# 3. Single flight: a leader that lands without a usable entry releases all its followers
#    upstream at once (hit-for-pass), never one after another as a chain of new leaders.
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


# 4. A healthy Redis must not look broken under load: redis-py's async pool refused the
#    101st concurrent call (MaxConnectionsError), which opened the breaker and dropped writes.
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


# 14. The breaker flapped: calls already in flight when it opened succeeded and closed it
#     again at once. Only the probe after the cool-down may close it.
async def test_calls_in_flight_when_the_breaker_opens_do_not_close_it(start_redis):
    server = start_redis()
    store = RedisStore(server.url, 5.0, "t:")
    admin = redis.asyncio.Redis(port=server.port)

    async def blocked_clients() -> list[int]:
        clients = (await admin.execute_command("CLIENT", "LIST")).decode().splitlines()
        return [int(c.split("id=")[1].split()[0]) for c in clients if "cmd=blpop" in c]

    async def wait_blocked(n: int) -> list[int]:
        while len(ids := await blocked_clients()) < n:  # noqa: ASYNC110 (polls Redis, nothing to await)
            await asyncio.sleep(0.01)
        return ids

    failing = asyncio.create_task(store.with_redis(lambda r: r.blpop("a", 10), "default"))
    [victim] = await wait_blocked(1)
    in_flight = asyncio.create_task(store.with_redis(lambda r: r.blpop("b", 10), "default"))
    await wait_blocked(2)
    await admin.execute_command("CLIENT", "KILL", "ID", victim)  # a real connection failure
    assert await failing == "default" and store.breaker.is_open
    await admin.lpush("b", "x")  # the call that was already in flight succeeds
    assert list(await in_flight) == [b"b", b"x"]
    assert store.breaker.is_open
    await store.close()
    await admin.aclose()


# 14. A Redis that refuses writes (out of memory, a read-only replica) still serves reads:
#     the refusal is not an outage of the whole store.
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


# 5. A read-only cache directory (a read-only checkout of recorded fixtures) turned L1
#    off entirely, because diskcache writes its settings when it opens: replay answered
#    504 for recorded entries and `ai-cache stats` failed. Tests run as root, for whom
#    chmod changes nothing: a read-only bind mount in a private mount namespace is real.
def namespace_problem() -> str | None:
    """Why this machine cannot mount in a private namespace, or None."""
    if not (shutil.which("unshare") and shutil.which("mount")):
        return "unshare or mount missing"
    with tempfile.TemporaryDirectory() as probe:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, text=True
        )
    return f"cannot mount in a private mount namespace: {done.stderr.strip()}" if done.returncode else None


needs_mounts = pytest.mark.skipif(bool(problem := namespace_problem()), reason=problem or "")


def in_namespace(setup: str, command: list[str]) -> list[str]:
    """`command` in a private mount namespace prepared by the shell line `setup`."""
    return ["unshare", "-m", "sh", "-c", f'{setup} && exec "$@"', "sh", *command]


class NamespacedProxy(Proxy):
    """The real mitmdump, started inside a private mount namespace (see `in_namespace`)."""

    def __init__(self, setup: str, *args) -> None:
        super().__init__(*args)
        self.setup = setup

    def command(self) -> list[str]:
        return in_namespace(self.setup, super().command())


@pytest.fixture
def start_namespaced_proxy(tmp_path, confdir):
    started: list[Proxy] = []

    def start(setup: str, **options: str) -> Proxy:
        proxy = NamespacedProxy(setup, tmp_path, confdir, options, []).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def read_only(directory) -> str:
    return f"mount --bind -o ro {directory} {directory}"


@needs_mounts
@pytest.mark.parametrize("writer_ended", ["cleanly", "killed"])  # killed: its WAL is left behind
def test_a_read_only_cache_directory_still_answers(start_proxy, start_namespaced_proxy, upstream, marker, writer_ended):
    recorder = start_proxy()
    directory = recorder.options["ai_cache_dir"]
    recorded = post(recorder, upstream, CHAT, chat_body(marker))
    wait_for_status(recorder, upstream, chat_body(marker), "HIT")
    if writer_ended == "killed":
        recorder.proc.kill()
        recorder.proc.wait()
    recorder.stop()
    replay = start_namespaced_proxy(read_only(directory), ai_cache_dir=directory, ai_cache_mode="replay")
    hit = post(replay, upstream, CHAT, chat_body(marker))
    assert (hit.status_code, hit.headers["x-ai-cache-status"]) == (200, "HIT")
    assert hit.content == recorded.content
    record = start_namespaced_proxy(read_only(directory), ai_cache_dir=directory)
    for _ in range(2):  # a new question passes through, and is never stored
        new = post(record, upstream, CHAT, chat_body(f"{marker} new"))
        assert (new.status_code, new.headers["x-ai-cache-status"]) == (200, "MISS")
    assert post(record, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "HIT"
    assert upstream.count(marker) == 3
    record.stop()
    assert record.logs().count("cannot write to cache directory") == 1
    stats = subprocess.run(
        in_namespace(read_only(directory), [str(BIN / "ai-cache"), "--dir", directory, "stats", "--json"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["entries"] == 1


# 8. A full disk made the log lie: every flow said "stored" before its write failed, the
#    summary counted those, and the "L1 write failed" / "works again" warnings alternated
#    with every lookup that still worked. A real full disk: a small tmpfs.
def rows_in(proxy: Proxy, directory: str) -> int:
    """Entries in the proxy's cache database, read inside its mount namespace."""
    count = (
        "import sqlite3, sys; print(sqlite3.connect(f'file:{sys.argv[1]}/cache.db?mode=ro', uri=True)"
        ".execute('SELECT count(*) FROM Cache').fetchone()[0])"
    )
    done = subprocess.run(
        ["nsenter", "-t", str(proxy.proc.pid), "-m", sys.executable, "-c", count, directory],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(done.stdout)


@needs_mounts
def test_a_full_disk_never_makes_the_log_say_stored(start_namespaced_proxy, upstream, marker, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    directory = str(mount / "cache")
    proxy = start_namespaced_proxy(f"mount -t tmpfs -o size=512k tmpfs {mount}", ai_cache_dir=directory)
    n = 60
    for i in range(n):  # 2 KiB prompts: the disk is full after a few dozen entries
        answer = post(proxy, upstream, CHAT, chat_body(f"{marker} {i} " + "x" * 2048))
        assert (answer.status_code, answer.headers["x-ai-cache-status"]) == (200, "MISS")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proxy.logs().count("MISS openai-chat") < n:
        time.sleep(0.05)  # each flow's line comes once its write finished
    rows = rows_in(proxy, directory)
    proxy.stop()
    logs = proxy.logs()
    assert 0 < rows < n  # the disk did fill up
    assert logs.count("json: stored") == rows
    assert f"; {rows} stored, {n - rows} not stored (L1 write failed: {n - rows});" in logs  # the summary
    assert logs.count("L1 write failed in") == 1 and "work again" not in logs  # one warning


# 6. A paced replay is served by a small server inside the proxy, at 127.0.0.1:<port>. In
#    `--mode upstream:...` that rewritten flow was sent to the parent proxy, which saw the
#    replay token and the cached answer. Paced replays must never leave the machine.
@pytest.fixture
def parent_proxy():
    """A TCP listener standing in for an upstream proxy: counts connections, answers none."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    accepted: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, peer = sock.accept()
                accepted.append(peer)
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join()
    sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_paced_replay_in_upstream_mode_never_reaches_the_parent_proxy(
    start_proxy, confdir, tmp_path, upstream, marker, parent_proxy, scheme
):
    provider, options, verify = upstream, {}, True
    if scheme == "https":  # through CONNECT, the flow mitmproxy forwards as a tunnel in upstream mode
        cert, key = make_tls_cert(str(tmp_path / "tls"))
        provider = FakeUpstream(tls=(cert, key)).start()
        options = {"ssl_verify_upstream_trusted_ca": cert}
        verify = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    body = chat_body(marker, stream=True)

    def stream(proxy, headers: dict | None = None) -> tuple[httpx.Response, bytes]:
        with httpx.Client(proxy=proxy.url, verify=verify, timeout=30) as client:
            with client.stream("POST", provider.url + CHAT, json=body, headers=headers or {}) as response:
                return response, b"".join(response.iter_raw())

    recorder = start_proxy(**options)
    _, recorded = stream(recorder, {"x-fake-scenario": "slow"})
    for _ in range(50):  # the write finishes in the background
        if stream(recorder)[0].headers["x-ai-cache-status"] == "HIT":
            break
    recorder.stop()
    port, connections = parent_proxy
    proxy = start_proxy(
        f"--mode=upstream:http://127.0.0.1:{port}",
        ai_cache_replay_speed="1",
        ai_cache_dir=recorder.options["ai_cache_dir"],
        **options,
    )
    answer, replayed = stream(proxy)
    assert (answer.status_code, answer.headers.get("x-ai-cache-status")) == (200, "HIT")
    assert replayed == recorded
    assert connections == []
    if provider is not upstream:
        provider.stop()


# 15. An upstream that compresses its stream although asked for `identity` had it passed
#     through and never cached. The capture decodes what it records (bounded by
#     ai_cache_max_body, whatever the compression ratio); a hit replays it uncompressed.
DECODERS = {
    "gzip": lambda b: zlib.decompress(b, 31),
    "deflate": zlib.decompress,
    "br": brotli.decompress,
    "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
}


@pytest.mark.parametrize("encoding", DECODERS)
def test_compressed_streams_are_stored_decoded(shared_proxy, upstream, marker, encoding):
    body = chat_body(marker, stream=True)
    first, raw = stream_raw(shared_proxy, upstream, CHAT, body, {"x-fake-scenario": f"encode-{encoding}"})
    assert (first.headers["x-ai-cache-status"], first.headers["content-encoding"]) == ("MISS", encoding)
    sent = DECODERS[encoding](raw)  # the client got the upstream's bytes as they were
    assert sent.endswith(b"data: [DONE]\n\n")
    if encoding == "br" and not BOUNDED_BROTLI:
        pytest.skip("this brotli cannot decode within a bound (Brotli < 1.2): br streams pass uncached")
    hit = wait_for_status(shared_proxy, upstream, body, "HIT")
    _, replayed = stream_raw(shared_proxy, upstream, CHAT, body)
    assert "content-encoding" not in hit.headers
    assert replayed == sent and upstream.count(marker) == 1


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_compressed_json_answers_are_stored_decoded(shared_proxy, upstream, marker, encoding):
    first = post(shared_proxy, upstream, CHAT, chat_body(marker), {"x-fake-scenario": f"encode-{encoding}"})
    hit = wait_for_status(shared_proxy, upstream, chat_body(marker), "HIT")
    assert "content-encoding" not in hit.headers
    assert hit.json()["choices"] == first.json()["choices"] and upstream.count(marker) == 1


def test_a_compressed_stream_over_the_size_cap_is_passed_on_not_stored(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_max_body="64KiB")
    body = chat_body(marker, stream=True)
    headers = {"x-fake-scenario": "encode-gzip,big", "x-fake-size": "2000000"}  # ~2 MB in ~20 KB of gzip
    first, raw = stream_raw(proxy, upstream, CHAT, body, headers)
    assert len(raw) < 64 * 1024 < len(zlib.decompress(raw, 31))
    assert post(proxy, upstream, CHAT, body, {"cache-control": "only-if-cached"}).status_code == 504
    proxy.stop()
    assert "not stored: larger than ai_cache_max_body" in proxy.logs()


def test_a_zip_bomb_never_expands_past_the_size_cap():
    bomb = zlib.compressobj(wbits=31)
    chunk = bomb.compress(b"\0" * 100_000_000) + bomb.flush()  # 100 MB in ~100 KB
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", 1_000_000, "gzip")
    tracemalloc.start()
    assert capture(chunk) is chunk  # the client's bytes pass untouched
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert capture.incompleteness() == "larger than ai_cache_max_body (1000000 bytes)"
    assert peak < 4_000_000  # the decoder stopped at the cap, it did not expand 100 MB
