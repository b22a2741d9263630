"""End to end: followers of an in-flight stream get the leader's bytes live (issue 15, item 1).

Timing is asserted by order of events on one clock (the fake provider runs in this
process): a follower's first byte arrives before the provider sent its last chunk.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from helpers import CHAT, openai_client, post

PACE = "pace-80"  # 13 frames 80 ms apart: a stream of about one second
WORDS = "one two three four five six seven eight nine"


def stream_body(marker: str) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{WORDS} {marker}"}], "stream": True}


@dataclass
class Reader:
    """Streams one request through the proxy in a thread, noting when each chunk came."""

    proxy: object
    upstream: object
    body: dict
    scenario: str
    extra: dict = field(default_factory=dict)  # more request headers
    leave_after: int = 0  # chunks after which the client hangs up (0: reads to the end)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    headers: dict = field(default_factory=dict)
    error: Exception | None = None
    got: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Reader:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with self.proxy.client() as client:
                headers = {"x-fake-scenario": self.scenario, **self.extra}
                with client.stream("POST", self.upstream.url + CHAT, json=self.body, headers=headers) as response:
                    self.headers = dict(response.headers)
                    for data in response.iter_raw():
                        self.chunks.append((time.monotonic(), data))
                        self.got.set()
                        if len(self.chunks) == self.leave_after:
                            break
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.got.set()

    def wait_for_chunks(self, n: int) -> None:
        while len(self.chunks) < n and self.thread.is_alive():
            self.got.wait(5)
            self.got.clear()

    def join(self) -> Reader:
        self.thread.join(30)
        return self

    @property
    def body_bytes(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


def leader_and_follower(proxy, upstream, marker: str, scenario: str) -> tuple[Reader, Reader]:
    """The leader streams; a follower starts a few chunks (~0.25 s) into its stream."""
    leader = Reader(proxy, upstream, stream_body(marker), scenario).start()
    leader.wait_for_chunks(4)
    assert leader.error is None and not leader.body_bytes.endswith(b"[DONE]\n\n"), "the stream ended too soon"
    follower = Reader(proxy, upstream, stream_body(marker), scenario).start()
    return leader.join(), follower.join()


def test_a_follower_gets_the_leaders_stream_live(start_proxy, upstream, marker):
    proxy = start_proxy()
    leader, follower = leader_and_follower(proxy, upstream, marker, PACE)
    assert leader.error is None and follower.error is None
    assert upstream.count(marker) == 1
    assert follower.body_bytes == leader.body_bytes and leader.body_bytes.endswith(b"data: [DONE]\n\n")
    assert (leader.headers["x-ai-cache-status"], follower.headers["x-ai-cache-status"]) == ("MISS", "HIT")
    assert follower.headers["x-ai-cache-layer"] == "live"
    assert follower.headers["content-type"] == leader.headers["content-type"]
    # Its first byte came while the provider was still streaming: everything so far at
    # once (more than the first chunk, less than the whole), then the rest live.
    (upstream_call,) = [r for r in upstream.requests if r.contains(marker)]
    first_at, first = follower.chunks[0]
    assert first_at < upstream_call.last_sent
    assert leader.chunks[0][1] != first and leader.body_bytes.startswith(first) and first != leader.body_bytes
    # Then stored as usual: the next identical request is an L1 hit.
    again = Reader(proxy, upstream, stream_body(marker), PACE).start().join()
    assert again.headers["x-ai-cache-layer"] == "l1" and again.body_bytes == leader.body_bytes


@pytest.mark.parametrize(
    "scenario,breaks",
    [("abort", True), ("no-terminal", False)],
    ids=["connection-cut", "ends-without-terminal-event"],
)
def test_followers_of_an_incomplete_stream_end_as_the_leader_did(start_proxy, upstream, marker, scenario, breaks):
    proxy = start_proxy()
    leader, follower = leader_and_follower(proxy, upstream, marker, f"{PACE},{scenario}")
    assert upstream.count(marker) == 1
    # The same bytes, and the same ending: broken off for both, or a clean end of the
    # same incomplete stream; never a made-up ending.
    assert follower.body_bytes == leader.body_bytes and b"[DONE]" not in leader.body_bytes
    assert isinstance(leader.error, httpx.RemoteProtocolError) is breaks
    assert isinstance(follower.error, httpx.RemoteProtocolError) is breaks
    answer = post(proxy, upstream, CHAT, stream_body(marker), {"cache-control": "only-if-cached"})
    assert answer.status_code == 504  # nothing was stored
    assert "not stored" in proxy.logs()


def test_openai_sdk_followers_of_an_sdk_leader(start_proxy, upstream, marker):
    """openai-python closes the response right after `data: [DONE]`, before the provider
    ends the body: the leader's flow ends in an error, yet its followers' streams end
    cleanly, whole, and the answer is stored."""
    proxy = start_proxy()
    client = openai_client(proxy, upstream)
    scenario = {"x-fake-scenario": f"{PACE},late-end-300"}
    messages = stream_body(marker)["messages"]
    texts: dict[str, str] = {}
    started = threading.Event()

    def run(name: str) -> None:
        with client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True, extra_headers=scenario
        ) as stream:
            pieces = []
            for chunk in stream:
                started.set()
                pieces += [c.delta.content or "" for c in chunk.choices]
            texts[name] = "".join(pieces)

    leader = threading.Thread(target=run, args=("leader",))
    leader.start()
    assert started.wait(10)
    followers = [threading.Thread(target=run, args=(f"follower-{i}",)) for i in range(3)]
    for thread in followers:
        thread.start()
    for thread in [leader, *followers]:
        thread.join(30)
    assert texts["leader"] == f"echo: {WORDS} {marker}"
    assert texts == {name: texts["leader"] for name in ["leader", "follower-0", "follower-1", "follower-2"]}
    assert upstream.count(marker) == 1
    hit = post(proxy, upstream, CHAT, stream_body(marker), {"cache-control": "only-if-cached"})
    assert hit.headers["x-ai-cache-status"] == "HIT"


def test_a_stalled_follower_is_cut_off_once_a_max_body_behind_and_the_leader_goes_on(start_proxy, upstream, marker):
    """A follower whose client stops reading must not make the proxy keep the rest of the
    leader's stream for it: past ai_cache_max_body behind, its stream breaks off."""
    proxy = start_proxy(ai_cache_max_body="1m")
    scenario = "big,pace-20"
    size = 16_000_000
    body = stream_body(marker)
    leader = Reader(proxy, upstream, body, scenario, {"x-fake-size": str(size)}).start()
    leader.wait_for_chunks(1)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", proxy.port))
    data = json.dumps(body).encode()
    stalled.sendall(
        f"POST {upstream.url}{CHAT} HTTP/1.1\r\nhost: 127.0.0.1:{upstream.port}\r\n"
        f"x-fake-scenario: {scenario}\r\nx-fake-size: {size}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    leader.join()  # while the stalled follower reads nothing
    assert leader.error is None and leader.body_bytes.endswith(b"data: [DONE]\n\n")
    received = b""
    stalled.settimeout(10)
    with contextlib.suppress(ConnectionError):
        while chunk := stalled.recv(1 << 20):
            received += chunk
    stalled.close()
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"x-ai-cache-layer: live" in head.lower()
    assert upstream.count(marker) == 1
    assert not rest.endswith(b"0\r\n\r\n") and len(rest) < len(leader.body_bytes)  # cut off


def test_followers_break_off_when_the_leaders_client_leaves_mid_stream(start_proxy, upstream, marker):
    """The leader's client hanging up cuts the provider's stream short: its followers'
    streams break off too (a clean end would hand their SDKs a truncated answer)."""
    proxy = start_proxy()
    leader = Reader(proxy, upstream, stream_body(marker), PACE, leave_after=5).start()
    leader.wait_for_chunks(2)
    follower = Reader(proxy, upstream, stream_body(marker), PACE).start()
    follower.wait_for_chunks(1)
    leader.join(), follower.join()
    assert follower.headers["x-ai-cache-layer"] == "live" and upstream.count(marker) == 1
    assert b"[DONE]" not in follower.body_bytes
    assert isinstance(follower.error, httpx.RemoteProtocolError)
    answer = post(proxy, upstream, CHAT, stream_body(marker), {"cache-control": "only-if-cached"})
    assert answer.status_code == 504  # nothing was stored


def test_many_late_followers_share_the_stream_so_far(start_proxy, upstream, marker):
    """50 followers joining a long stream late: the stream so far is not copied for each
    (it was twice each: 1.3 GB more for 50 followers of a 12 MB stream so far)."""
    proxy = start_proxy(ai_cache_max_body="20m")
    size = 6_000_000
    extra = {"x-fake-size": str(size)}
    leader = Reader(proxy, upstream, stream_body(marker), "big,pace-40", extra).start()
    while sum(len(data) for _, data in leader.chunks) < size // 2 and leader.thread.is_alive():
        leader.got.wait(5)
        leader.got.clear()
    before = peak_memory(proxy)
    followers = [Reader(proxy, upstream, stream_body(marker), "big,pace-40", extra).start() for _ in range(50)]
    leader.join()
    for follower in followers:
        follower.join()
    assert leader.error is None and upstream.count(marker) == 1
    assert {(f.headers["x-ai-cache-layer"], f.body_bytes == leader.body_bytes) for f in followers} == {("live", True)}
    assert peak_memory(proxy) - before < 10 * size


def peak_memory(proxy) -> int:
    """The proxy process's peak resident memory so far, in bytes (Linux)."""
    with open(f"/proc/{proxy.proc.pid}/status") as status:
        (line,) = [line for line in status if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def test_a_followers_client_keeps_its_connection(start_proxy, upstream, marker):
    """The replay server closes its side after each answer; the client's connection to
    the proxy stays open for its next request, as after any other answer."""
    proxy = start_proxy()
    leader = Reader(proxy, upstream, stream_body(marker), PACE).start()
    leader.wait_for_chunks(2)
    with proxy.client() as client:
        ports, layers = [], []
        for body in (stream_body(marker), stream_body(f"{marker}-next")):
            with client.stream("POST", upstream.url + CHAT, json=body, headers={"x-fake-scenario": PACE}) as response:
                ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])
                layers.append(response.headers.get("x-ai-cache-layer"))
                response.read()
    leader.join()
    assert layers == ["live", None] and ports[0] == ports[1]
