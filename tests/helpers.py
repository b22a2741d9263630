"""Helpers shared by the test modules: requests through a proxy, flows for the hooks, sample entries.

Fixtures live in conftest.py; the plain functions and data they and the tests use live here.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import redis
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from ai_cache.disk import DiskStore
from ai_cache.entry import Entry

if TYPE_CHECKING:
    from ai_cache.addon import AICache

# Requests through a running proxy (end-to-end tests)

CHAT = "/v1/chat/completions"


def post(proxy, upstream, path: str, body, headers: dict | None = None, raw: bytes | None = None) -> httpx.Response:
    with proxy.client() as client:
        return client.post(
            upstream.url + path,
            content=raw if raw is not None else json.dumps(body),
            headers={"content-type": "application/json", **(headers or {})},
        )


def chat_body(marker: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {marker}"}], **extra}


def openai_client(proxy, upstream) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url=upstream.url + "/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=proxy.url),
    )


def wait_for_status(
    proxy, upstream, body, status: str, path: str = CHAT, headers: dict | None = None, tries: int = 50
) -> httpx.Response:
    """Stores are written in the background: poll until the entry is visible."""
    for _ in range(tries):
        answer = post(proxy, upstream, path, body, {"cache-control": "only-if-cached", **(headers or {})})
        if answer.headers.get("x-ai-cache-status") == status:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"never saw {status}")


def log_lines(proxy, pattern: str, count: int = 1, tries: int = 200) -> list[str]:
    """The proxy's log lines matching `pattern`, once there are `count`: a MISS line is
    written when its answer's write ended, which may be after the client returned."""
    for _ in range(tries):
        lines = [line for line in proxy.logs().splitlines() if re.search(pattern, line)]
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    return lines


def wait_for(probe, tries: int = 100, what: str = "it happen"):
    """Stores are written in the background: poll until `probe()` is truthy, and return it."""
    for _ in range(tries):
        if found := probe():
            return found
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def read_entry(directory, key: str) -> Entry | None:
    store = DiskStore(directory)
    try:
        return store.get_sync(key)
    finally:
        store.close_sync()


def on_disk(directory, key: str) -> Entry:
    """The entry under `key` once the proxy's batch write put it in the cache directory."""
    return wait_for(lambda: read_entry(directory, key), what=f"{key[:12]} reach {directory}")


def stored_lines(proxy) -> int:
    """How many answers the proxy's log says it wrote (also `stored in l1 only (...)`)."""
    return len(re.findall(r": stored\b", proxy.logs()))


def wait_for_stored(proxy, count: int = 1) -> None:
    """Until the log says `count` answers were written: a lookup already serves an entry
    that waits for its batch write, so a HIT does not prove it is on disk or in Redis."""
    wait_for(lambda: stored_lines(proxy) >= count, what=f"{count} stored")


STREAMS = {
    "openai-chat": (
        CHAT,
        lambda m: chat_body(m, stream=True, stream_options={"include_usage": True}),
        "text/event-stream",
    ),
    "openai-completions": (
        "/v1/completions",
        lambda m: {"model": "i", "prompt": f"say {m}", "stream": True},
        "text/event-stream",
    ),
    "openai-responses": (
        "/v1/responses",
        lambda m: {"model": "gpt-4o", "input": f"say {m}", "stream": True},
        "text/event-stream",
    ),
    "anthropic-messages": (
        "/v1/messages",
        lambda m: {
            "model": "claude",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": f"say {m}"}],
        },
        "text/event-stream",
    ),
    "gemini": (
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        lambda m: {"contents": [{"role": "user", "parts": [{"text": f"say {m}"}]}]},
        "text/event-stream",
    ),
    "ollama": (
        "/api/chat",
        lambda m: {"model": "llama3", "messages": [{"role": "user", "content": f"say {m}"}]},
        "application/x-ndjson",
    ),
}


def stream_raw(proxy, upstream, path: str, body: dict, headers: dict | None = None) -> tuple[httpx.Response, bytes]:
    with proxy.client() as client:
        with client.stream("POST", upstream.url + path, json=body, headers=headers or {}) as response:
            return response, b"".join(response.iter_raw())


def redis_key(answer) -> str:
    return "ai-cache:" + answer.headers["x-ai-cache-key"]


def wait_for_redis_key(client: redis.Redis, key: str) -> None:
    wait_for(lambda: client.exists(key), what=f"{key} reach Redis")


# Flows for the addon's hooks (unit tests, mitmproxy's tflow)

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4},
}


def chat_flow(body: bytes | dict, path: str = "/v1/chat/completions", **headers: str) -> http.HTTPFlow:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = tutils.treq(
        method=b"POST",
        host="api.openai.com",
        port=443,
        scheme=b"https",
        path=path.encode(),
        content=content,
        headers=http.Headers(((b"content-type", b"application/json"),)),
    )
    for name, value in headers.items():
        request.headers[name.replace("_", "-")] = value
    return tflow.tflow(req=request)


def answered(flow: http.HTTPFlow, body: dict = ANSWER, status: int = 200) -> http.HTTPFlow:
    """A complete response in place, as another addon's `request` hook would set it."""
    flow.response = http.Response.make(status, json.dumps(body), {"content-type": "application/json"})
    return flow


def upstream_answers(addon: AICache, flow: http.HTTPFlow, body: dict = ANSWER, status: int = 200) -> None:
    """As mitmproxy does for a server's answer: headers (and the hook) first, then the body."""
    answered(flow, body, status)
    content, flow.response.raw_content = flow.response.raw_content, None
    addon.responseheaders(flow)
    flow.response.raw_content = content


# A cache directory with one entry of each format (the CLI and its inputs)

SSE_CHUNKS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":20}}}\n\n',
    'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"héllo ✓'.encode(),
    # A read that split "✓" would not be UTF-8 on its own; here a whole one, then a split one.
    '"}}\n\nevent: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"✓'.encode()[:-1],
    b'\x93"}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n',
]
NDJSON_CHUNKS = [b'{"message":{"content":"hi"},"done":false}\n', b'{"done":true,"eval_count":4}\n']
JSON_BODY = (
    b'{\n  "id": "c1",\n  "choices": [{"message": {"content": "hello"}}],\n'
    b'  "usage": {"prompt_tokens": 10, "completion_tokens": 5}\n}\n'
)


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def request(host: str, path: str, model: str, **extra) -> dict:
    return {
        "method": "POST",
        "scheme": "https",
        "host": host,
        "path": path,
        "query": [],
        "headers": {},
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        **extra,
    }


def timed(chunks: list[bytes], gap: float) -> list[tuple[float, int]]:
    return [(round(i * gap, 6), len(c)) for i, c in enumerate(chunks)]


def sample_entries() -> list[Entry]:
    """Aged from the moment they are made: a long run must not age them past a test's bounds."""
    now = time.time()
    json_entry = Entry(
        key=key_of("json"),
        format="json",
        body=JSON_BODY,
        created_at=now - 10,
        headers=[
            ("content-type", "application/json"),
            ("x-request-id", "req-1"),
            ("set-cookie", "session=SECRET-COOKIE"),
            ("x-api-key", "sk-SECRET-KEY"),
        ],
        chunks=[(0.0, len(JSON_BODY))],
        meta={
            "protocol": "openai-chat",
            "model": "gpt-4o",
            "stream": False,
            "request": request(
                "api.openai.com",
                "/v1/chat/completions",
                "gpt-4o",
                headers={"authorization": "Bearer sk-SECRET-AUTH", "openai-beta": "x"},
                query=[["key", "SECRET-QUERY"], ["alt", "json"]],
            ),
            "usage": {"input": 10, "output": 5},
            "preview": "hello json",
        },
    )
    sse_entry = Entry(
        key=key_of("sse"),
        format="sse",
        body=b"".join(SSE_CHUNKS),
        created_at=now - 3 * 3600,
        headers=[("content-type", "text/event-stream")],
        chunks=timed(SSE_CHUNKS, 0.25),
        meta={
            "protocol": "anthropic-messages",
            "model": "claude-sonnet-4",
            "stream": True,
            "request": request("api.anthropic.com", "/v1/messages", "claude-sonnet-4"),
            "usage": {"input": 20, "output": 7},
            "preview": "hello sse",
        },
    )
    ndjson_entry = Entry(
        key=key_of("ndjson"),
        format="ndjson",
        body=b"".join(NDJSON_CHUNKS),
        created_at=now - 5 * 86400,
        headers=[("content-type", "application/x-ndjson")],
        chunks=timed(NDJSON_CHUNKS, 0.125),
        meta={
            "protocol": "ollama",
            "model": "llama3.2",
            "stream": True,
            "request": request("localhost:11434", "/api/chat", "llama3.2"),
            "usage": {"input": 3, "output": 4},
            "preview": "hello ndjson",
        },
    )
    return [json_entry, sse_entry, ndjson_entry]


def fill(directory: Path, entries: list[Entry]) -> Path:
    store = DiskStore(directory)
    for entry in entries:
        assert store.put_sync(entry, None)
    store.close_sync()
    return directory


def stored(directory: Path) -> dict[str, Entry]:
    store = DiskStore(directory)
    try:
        return {key: store.get_sync(key) for key in store.keys_sync()}
    finally:
        store.close_sync()


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels
