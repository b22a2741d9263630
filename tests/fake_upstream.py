"""A local fake LLM provider speaking the providers' real wire formats.

Serves OpenAI (chat, legacy completions, responses, embeddings, models),
Anthropic messages, Gemini generateContent / streamGenerateContent and Ollama
native endpoints from a daemon thread, records every request it receives and
misbehaves on demand through the ``x-fake-scenario`` request header (see
``SCENARIOS``), or on every request (``FakeUpstream(scenarios=...)``).  Every
answer carries a fresh id from a global counter; the rest of the answer is
deterministic from the request ("echo: <prompt>"; a tool in the request makes
it a call of that tool with ``TOOL_ARGS``).  `h2_upstream` serves the same
answers over HTTP/2.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
import json
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import brotli  # mitmproxy's dependencies, like zstandard
import zstandard

SCENARIOS = (
    "status-NNN", "gzip", "abort", "no-terminal", "cut-frame", "done-in-content",
    "error-event", "failed", "incomplete", "keepalive", "crlf", "slow", "big",
    "sse-forced", "json-for-stream", "not-json", "late-end-MS", "delay-MS", "encode-NAME", "pace-MS",
)  # fmt: skip
CREATED = 1_700_000_000
CREATED_AT = "2023-11-14T22:13:20Z"
TOOL_ARGS = '{"city": "Paris"}'
TOOL_ARG_PIECES = ['{"city": ', '"Paris"', "}"]
KEEPALIVE = ": keepalive\n\n"
SLOW_DELAY = 0.15
BIG_DEFAULT = 4_000_000
BIG_BATCH = 64

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def next_id() -> int:
    """Next value of the process-wide answer counter."""
    with _ids_lock:
        return next(_ids)


@dataclass
class RecordedRequest:
    """One request as received by the fake upstream."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    http_version: str = "HTTP/1.1"
    received: float = field(default_factory=time.monotonic)  # when it arrived (time.monotonic)
    last_sent: float | None = None  # when the last chunk of a streamed answer was sent

    def contains(self, marker: str) -> bool:
        """Whether the body or path+query contains ``marker``."""
        target = f"{self.path}?{self.query}" if self.query else self.path
        return marker in target or marker in self.body.decode("utf-8", "replace")


@dataclass
class _Stream:
    """A streamed answer: body frames, the protocol's terminal frame(s), a mid-stream error frame."""

    content_type: str
    frames: list[str]
    terminal: list[str]
    error: str
    sse: bool = True


@dataclass
class _Call:
    """What a builder needs to know about one request."""

    k: int
    rec: RecordedRequest
    req: dict[str, Any]
    scn: frozenset[str]
    stream: bool

    @property
    def model(self) -> str:
        """Requested model (body, Azure deployment or Gemini path), else a default."""
        if m := re.search(r"/models/([^/:]+):", self.rec.path) or re.search(r"/deployments/([^/]+)/", self.rec.path):
            return self.req.get("model") or m.group(1)
        return self.req.get("model") or "fake-model"


# ---------------------------------------------------------------- helpers


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p if isinstance(p, str) else p.get("text") for p in content if isinstance(p, (str, dict))]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _last_content(items: Any) -> str:
    """Text of the last element of a message list (or the value itself if not a list)."""
    if not isinstance(items, list):
        return _text_of(items)
    if not items:
        return ""
    last = items[-1]
    if isinstance(last, dict) and "content" in last:
        return _text_of(last["content"])
    if isinstance(last, dict) and "parts" in last:
        return _text_of(last["parts"])
    return _text_of([last])


def _words(text: str) -> list[str]:
    """Split ``text`` into stream pieces that concatenate back to it."""
    return re.findall(r"\S+\s*", text) or [text]


def _tokens(text: str) -> int:
    """A deterministic stand-in for a token count."""
    return max(1, len(text.split()))


def _sse(data: Any, event: str | None = None) -> str:
    """One SSE frame with a JSON (or literal string) data line."""
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _typed(kind: str, **fields: Any) -> str:
    """An SSE frame whose event name equals the payload's ``type``."""
    return _sse({"type": kind, **fields}, kind)


def _accepts_gzip(value: str) -> bool:
    """Whether an accept-encoding header value allows gzip."""
    for item in value.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "*"):
            return not re.fullmatch(r"q=0(\.0*)?", params.replace(" ", "").lower())
    return False


class _Encoder:
    """Incremental content-encoding: each chunk is flushed, as a streaming server does."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name in ("gzip", "deflate"):
            self._z = zlib.compressobj(wbits=31 if name == "gzip" else 15)
        elif name == "br":
            self._br = brotli.Compressor()
        elif name == "zstd":
            self._zstd = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(f"unknown encoding {name}")

    def chunk(self, data: bytes) -> bytes:
        if self.name == "br":
            return self._br.process(data) + self._br.flush()
        if self.name == "zstd":
            return self._zstd.compress(data) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        if self.name == "br":
            return self._br.finish()
        return self._zstd.flush() if self.name == "zstd" else self._z.flush()


def _error_body(status: int, anthropic: bool) -> dict[str, Any]:
    """A provider-style JSON error body for ``status``."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")  # fmt: skip
    message = f"fake upstream status {status}"
    if anthropic:
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}


# ---------------------------------------------------------------- OpenAI


_OPENAI_ERROR = _sse({"error": {"message": "overloaded", "type": "server_error"}})
_DONE = "data: [DONE]\n\n"


def _injected(c: _Call) -> list[str]:
    """Extra content delta for the done-in-content scenario."""
    return [" data: [DONE]\n\n"] if "done-in-content" in c.scn else []


def _usage_frames(c: _Call, chunk: Callable[[dict[str, Any]], dict[str, Any]], usage: dict[str, int]) -> list[str]:
    """The usage chunk that ends an OpenAI stream body when ``stream_options.include_usage`` is set."""
    if (c.req.get("stream_options") or {}).get("include_usage"):
        return [_sse({**chunk({}), "choices": [], "usage": usage})]
    return []


def _chat(c: _Call) -> dict[str, Any] | _Stream:
    """OpenAI chat completions (also Azure deployments)."""
    prompt = _last_content(c.req.get("messages"))
    text = "echo: " + prompt
    tools = c.req.get("tools") or []
    tool = (tools[0].get("function") or tools[0]).get("name") if tools else None
    words = _words(text)
    usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": len(words),
             "total_tokens": _tokens(prompt) + len(words)}  # fmt: skip
    call = {"id": f"call_fake_{c.k}", "type": "function", "function": {"name": tool, "arguments": TOOL_ARGS}}
    finish = "tool_calls" if tool else "stop"
    cid = f"chatcmpl-fake-{c.k}"
    if not c.stream:
        message = {"role": "assistant", "content": None if tool else text, "refusal": None}
        if tool:
            message["tool_calls"] = [call]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"id": cid, "object": "chat.completion", "created": CREATED, "model": c.model,
                "system_fingerprint": "fp_fake", "choices": [choice], "usage": usage}  # fmt: skip

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": c.model,
                "system_fingerprint": "fp_fake", "choices": [choice]}  # fmt: skip

    frames = [_sse(chunk({"role": "assistant", "content": ""}))]
    if tool:
        first = {**call, "index": 0, "function": {"name": tool, "arguments": ""}}
        frames.append(_sse(chunk({"tool_calls": [first]})))
        frames += [_sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})) for p in TOOL_ARG_PIECES]
    elif "big" in c.scn:
        size = int(c.rec.headers.get("x-fake-size") or BIG_DEFAULT)
        block = ("lorem ipsum " * 90)[:1023] + " "
        frames += [_sse(chunk({"content": block}))] * max(1, size // len(block))
    else:
        frames += [_sse(chunk({"content": w})) for w in words + _injected(c)]
    frames.append(_sse(chunk({}, finish)))
    frames += _usage_frames(c, chunk, usage)
    terminal = [] if "done-in-content" in c.scn else [_DONE]
    return _Stream("text/event-stream; charset=utf-8", frames, terminal, _OPENAI_ERROR)


def _legacy(c: _Call) -> dict[str, Any] | _Stream:
    """OpenAI legacy text completions."""
    prompt = _text_of(c.req.get("prompt"))
    text = "echo: " + prompt
    words = _words(text)
    usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": len(words),
             "total_tokens": _tokens(prompt) + len(words)}  # fmt: skip
    head = {"id": f"cmpl-fake-{c.k}", "object": "text_completion", "created": CREATED, "model": c.model}
    if not c.stream:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        return {**head, "choices": [choice], "usage": usage}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        choice = {"text": delta.get("content", ""), "index": 0, "logprobs": None, "finish_reason": reason}
        return {**head, "choices": [choice]}

    frames = [_sse(chunk({"content": w})) for w in words + _injected(c)]
    frames.append(_sse(chunk({}, "stop")))
    frames += _usage_frames(c, chunk, usage)
    terminal = [] if "done-in-content" in c.scn else [_DONE]
    return _Stream("text/event-stream; charset=utf-8", frames, terminal, _OPENAI_ERROR)


def _responses(c: _Call) -> dict[str, Any] | _Stream:
    """OpenAI Responses API; a function tool in the request makes the answer a function call."""
    prompt = _last_content(c.req.get("input"))
    text = "echo: " + prompt
    tool = next((t.get("name") for t in c.req.get("tools") or [] if t.get("type") == "function"), None)
    pieces = TOOL_ARG_PIECES if tool else _words(text)
    usage = {"input_tokens": _tokens(prompt), "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": len(pieces), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": _tokens(prompt) + len(pieces)}  # fmt: skip
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item: dict[str, Any] = (
        {"type": "function_call", "id": f"fc_fake_{c.k}", "call_id": f"call_fake_{c.k}", "name": tool,
         "arguments": TOOL_ARGS, "status": "completed"}
        if tool else
        {"type": "message", "id": f"msg_fake_{c.k}", "status": "completed", "role": "assistant", "content": [part]}
    )  # fmt: skip

    def response(status: str, output: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "id": f"resp_fake_{c.k}", "object": "response", "created_at": CREATED, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": c.req.get("instructions"), "max_output_tokens": c.req.get("max_output_tokens"),
            "model": c.model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": None, "user": None, "metadata": {}, **extra,
        }  # fmt: skip

    if not c.stream:
        return response("completed", [item], usage=usage)
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> str:
        return _typed(kind, sequence_number=next(seq), **fields)

    at = {"item_id": item["id"], "output_index": 0}
    where = {**at, "content_index": 0}
    if tool:
        added = {**item, "status": "in_progress", "arguments": ""}
        body = [
            *(event("response.function_call_arguments.delta", **at, delta=p) for p in pieces),
            event("response.function_call_arguments.done", **at, name=tool, arguments=TOOL_ARGS),
        ]
    else:
        added = {**item, "status": "in_progress", "content": []}
        body = [
            event("response.content_part.added", **where, part={**part, "text": ""}),
            *(event("response.output_text.delta", **where, delta=w, logprobs=[]) for w in pieces),
            event("response.output_text.done", **where, text=text, logprobs=[]),
            event("response.content_part.done", **where, part=part),
        ]
    frames = [
        event("response.created", response=response("in_progress", [])),
        event("response.in_progress", response=response("in_progress", [])),
        event("response.output_item.added", output_index=0, item=added),
        *body,
        event("response.output_item.done", output_index=0, item=item),
    ]
    error = event("error", code="server_error", message="overloaded", param=None)
    if "failed" in c.scn:
        failure = {"code": "server_error", "message": "fake failure"}
        final = event("response.failed", response=response("failed", [], usage=usage, error=failure))
    elif "incomplete" in c.scn:
        details = {"reason": "max_output_tokens"}
        final = event("response.incomplete",
                      response=response("incomplete", [item], usage=usage, incomplete_details=details))  # fmt: skip
    else:
        final = event("response.completed", response=response("completed", [item], usage=usage))
    return _Stream("text/event-stream; charset=utf-8", frames, [final], error)


def _vector(value: Any) -> list[float]:
    """Eight deterministic floats in [-1, 1] derived from ``value``."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return [round(b / 127.5 - 1, 4) for b in digest[:8]]


def _embeddings(c: _Call) -> dict[str, Any]:
    """OpenAI embeddings; honours ``encoding_format: base64`` (the SDK's default)."""
    raw = c.req.get("input")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    data = []
    for i, value in enumerate(inputs):
        vec: list[float] | str = _vector(value)
        if c.req.get("encoding_format") == "base64":
            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = sum(_tokens(_text_of(v) or json.dumps(v)) for v in inputs)
    return {"object": "list", "data": data, "model": c.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def _models() -> dict[str, Any]:
    """OpenAI model list."""
    names = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    data = [{"id": n, "object": "model", "created": CREATED, "owned_by": "fake"} for n in names]
    return {"object": "list", "data": data}


# ---------------------------------------------------------------- Anthropic


def _anthropic(c: _Call) -> dict[str, Any] | _Stream:
    """Anthropic messages."""
    prompt = _last_content(c.req.get("messages"))
    text = "echo: " + prompt
    tools = c.req.get("tools") or []
    tool = tools[0].get("name") if tools else None
    words = _words(text)
    pieces = TOOL_ARG_PIECES if tool else words
    usage = {"input_tokens": _tokens(prompt), "output_tokens": len(pieces),
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}  # fmt: skip
    stop = "tool_use" if tool else "end_turn"
    block: dict[str, Any] = (
        {"type": "tool_use", "id": f"toolu_fake_{c.k}", "name": tool, "input": json.loads(TOOL_ARGS)}
        if tool else {"type": "text", "text": text}
    )  # fmt: skip
    message = {"id": f"msg_fake_{c.k}", "type": "message", "role": "assistant", "model": c.model,
               "content": [block], "stop_reason": stop, "stop_sequence": None, "usage": usage}  # fmt: skip
    if not c.stream:
        return message
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    empty = {**block, "input": {}} if tool else {**block, "text": ""}
    kind, key = ("input_json_delta", "partial_json") if tool else ("text_delta", "text")
    frames = [
        _typed("message_start", message=start),
        _typed("content_block_start", index=0, content_block=empty),
        _typed("ping"),
        *(_typed("content_block_delta", index=0, delta={"type": kind, key: p}) for p in pieces),
        _typed("content_block_stop", index=0),
        _typed("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
               usage={"output_tokens": len(pieces)}),
    ]  # fmt: skip
    error = _typed("error", error={"type": "overloaded_error", "message": "Overloaded"})
    return _Stream("text/event-stream; charset=utf-8", frames, [_typed("message_stop")], error)


# ---------------------------------------------------------------- Gemini


def _gemini(c: _Call) -> dict[str, Any] | list[Any] | _Stream:
    """Gemini generateContent / streamGenerateContent (SSE with ``alt=sse``, else a JSON array).

    A function declared in the request makes the answer one functionCall part, in one event."""
    prompt = _last_content(c.req.get("contents"))
    text = "echo: " + prompt
    declared = [f for t in c.req.get("tools") or [] for f in t.get("functionDeclarations") or []]
    call = {"name": declared[0].get("name"), "args": json.loads(TOOL_ARGS)} if declared else None
    words = [""] if call else _words(text)
    usage = {"promptTokenCount": _tokens(prompt), "candidatesTokenCount": len(words),
             "totalTokenCount": _tokens(prompt) + len(words)}  # fmt: skip

    def answer(piece: str, final: bool) -> dict[str, Any]:
        part = {"functionCall": call} if call else {"text": piece}
        candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        out: dict[str, Any] = {"candidates": [candidate]}
        if final:
            candidate["finishReason"] = "STOP"
            out["usageMetadata"] = usage
        return {**out, "modelVersion": c.model, "responseId": f"fake-resp-{c.k}"}

    if not c.stream:
        return answer(text, True)
    finish_last = "no-terminal" not in c.scn
    chunks = [answer(w, finish_last and i == len(words) - 1) for i, w in enumerate(words)]
    if "alt=sse" not in c.rec.query:
        return chunks
    frames = [f"data: {json.dumps(ch)}\r\n\r\n" for ch in chunks]
    error = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    return _Stream("text/event-stream", frames, [], f"data: {json.dumps(error)}\r\n\r\n")


# ---------------------------------------------------------------- Ollama


def _ollama(c: _Call) -> dict[str, Any] | _Stream:
    """Ollama native /api/chat and /api/generate (NDJSON unless ``stream: false``).

    A chat tool in the request makes the answer a tool call, streamed in one chunk."""
    is_chat = c.rec.path.endswith("/api/chat")
    prompt = _last_content(c.req.get("messages")) if is_chat else _text_of(c.req.get("prompt"))
    text = "echo: " + prompt
    words = _words(text)
    tools = (c.req.get("tools") or []) if is_chat else []
    tool = (tools[0].get("function") or tools[0]).get("name") if tools else None
    call = {"function": {"name": tool, "arguments": json.loads(TOOL_ARGS)}}

    def line(piece: str, done: bool, with_call: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": c.model, "created_at": CREATED_AT}
        if is_chat:
            out["message"] = {"role": "assistant", "content": piece}
            if with_call:
                out["message"]["tool_calls"] = [call]
        else:
            out["response"] = piece
        if not done:
            return {**out, "done": False}
        return {**out, "done": True, "done_reason": "stop", "total_duration": 123_000_000,
                "load_duration": 1_000_000, "prompt_eval_count": _tokens(prompt),
                "prompt_eval_duration": 2_000_000, "eval_count": len(words), "eval_duration": 100_000_000}  # fmt: skip

    if not c.stream:
        return line("" if tool else text, True, bool(tool))
    pieces = [line("", False, True)] if tool else [line(w, False) for w in words]
    frames = [json.dumps(p) + "\n" for p in pieces]
    terminal = [json.dumps(line("", True)) + "\n"]
    return _Stream("application/x-ndjson", frames, terminal, '{"error": "boom"}\n', sse=False)


_Builder = Callable[[_Call], "dict[str, Any] | list[Any] | _Stream"]
_ROUTES: tuple[tuple[str, _Builder], ...] = (
    (":streamGenerateContent", _gemini),
    (":generateContent", _gemini),
    ("/chat/completions", _chat),
    ("/completions", _legacy),
    ("/responses", _responses),
    ("/embeddings", _embeddings),
    ("/messages", _anthropic),
    ("/api/chat", _ollama),
    ("/api/generate", _ollama),
)


def _wants_stream(suffix: str, req: dict[str, Any], scn: frozenset[str]) -> bool:
    """Whether to stream, per endpoint convention and the sse-forced/json-for-stream scenarios."""
    if "sse-forced" in scn:
        return True
    if "json-for-stream" in scn:
        return False
    if suffix.startswith(":"):
        return suffix == ":streamGenerateContent"
    if suffix.startswith("/api/"):
        return req.get("stream", True) is not False
    return req.get("stream") is True


def _shape(stream: _Stream, scn: frozenset[str]) -> list[str]:
    """Apply the generic stream scenarios to a built stream; returns the frames to send."""
    frames = list(stream.frames)
    if "error-event" in scn:
        frames = frames[: max(1, len(frames) // 2)] + [stream.error]
    frames += [] if "no-terminal" in scn else stream.terminal
    if stream.sse and "keepalive" in scn:
        frames = [KEEPALIVE, *frames[:1], KEEPALIVE, *frames[1:], KEEPALIVE]
    if stream.sse and "crlf" in scn:
        frames = [re.sub(r"\r?\n", "\r\n", f) for f in frames]
    if "cut-frame" in scn and frames:
        last = frames[-1]
        frames[-1] = last[:-2] if last.endswith("\r\n") else last[:-1]
    return frames


def parse_scenarios(value: str) -> frozenset[str]:
    """The scenarios in an ``x-fake-scenario`` header value: ``"late-end-150,crlf"``."""
    return frozenset(s.strip() for s in value.split(",") if s.strip())


def late_end(scn: frozenset[str]) -> float:
    """Seconds between the last byte of an answer and the end of its body (``late-end-MS``)."""
    return next((int(s[9:]) for s in scn if re.fullmatch(r"late-end-\d+", s)), 0) / 1000


def pace(scn: frozenset[str]) -> float:
    """Seconds between the frames of a stream (``pace-MS``), 0 for at once."""
    return next((int(s[5:]) for s in scn if re.fullmatch(r"pace-\d+", s)), 0) / 1000


def answer(rec: RecordedRequest, k: int, scn: frozenset[str]) -> tuple[int, Any] | _Stream:
    """What the provider answers to ``rec``: ``(status, JSON payload or raw bytes)``, or a stream."""
    route = next(((s, b) for s, b in _ROUTES if rec.path.endswith(s)), None)
    if rec.method == "GET" or route is None:
        if rec.method == "GET" and rec.path.endswith("/models"):
            return 200, _models()
        return 404, {"error": {"message": "not found"}}
    suffix, builder = route
    try:
        req = json.loads(rec.body)
        if not isinstance(req, dict):
            raise ValueError(req)
    except ValueError:
        return 400, {"error": {"message": "invalid json"}}
    status = next((int(s[7:]) for s in scn if re.fullmatch(r"status-\d{3}", s)), None)
    if status:
        return status, _error_body(status, anthropic=suffix == "/messages")
    if "not-json" in scn:
        return 200, b"<html>oops</html>"
    result = builder(_Call(k, rec, req, scn, _wants_stream(suffix, req, scn)))
    return result if isinstance(result, _Stream) else (200, result)


def answer_chunks(rec: RecordedRequest, k: int, scn: frozenset[str]) -> tuple[int, str, list[bytes]]:
    """Status, content type and body chunks of the answer, for servers other than `_Handler`:
    the scenarios that shape a stream's frames apply; gzip, abort and slow are `_Handler`'s."""
    result = answer(rec, k, scn)
    if isinstance(result, _Stream):
        return 200, result.content_type, [frame.encode() for frame in _shape(result, scn)]
    status, payload = result
    return status, "application/json", [payload if isinstance(payload, bytes) else json.dumps(payload).encode()]


# ---------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    """Records each request and answers it like the matching provider would."""

    protocol_version = "HTTP/1.1"
    server: _Server
    k: int
    scn: frozenset[str]

    def do_GET(self) -> None:
        """Handle GET."""
        self._handle()

    def do_POST(self) -> None:
        """Handle POST."""
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _handle(self) -> None:
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        rec = RecordedRequest(self.command, url.path, url.query, headers, self._read_body())
        self.server.upstream._record(rec)
        self.k = next_id()
        self.scn = parse_scenarios(headers.get("x-fake-scenario", "")) | self.server.upstream.scenarios
        if delay := next((int(s[6:]) for s in self.scn if re.fullmatch(r"delay-\d+", s)), 0):
            time.sleep(delay / 1000)  # a provider that thinks before answering (any status)
        try:
            self._answer(rec)
        except OSError:  # client went away mid-answer
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("transfer-encoding", "").lower():
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _answer(self, rec: RecordedRequest) -> None:
        result = answer(rec, self.k, self.scn)
        if isinstance(result, _Stream):
            self._send_stream(result)
            rec.last_sent = time.monotonic()
        else:
            self._send_json(*result)

    def _common_headers(self, status: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("x-request-id", f"req_{self.k}")
        self.send_header("openai-processing-ms", "42")
        if status == 429:
            self.send_header("retry-after", "1")

    def _encoder(self) -> _Encoder | None:
        """gzip when asked and accepted; encode-NAME forces NAME whatever the client accepts."""
        if forced := next((s[7:] for s in self.scn if s.startswith("encode-")), None):
            return _Encoder(forced)
        if "gzip" in self.scn and _accepts_gzip(self.headers.get("accept-encoding", "")):
            return _Encoder("gzip")
        return None

    def _send_json(self, status: int, payload: Any) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        encoder = self._encoder()
        if encoder:
            body = encoder.chunk(body) + encoder.end()
        # With late-end the body is chunked and its terminator comes late, as behind real gateways.
        late = late_end(self.scn) and "abort" not in self.scn
        self._common_headers(status, "application/json")
        self.send_header(*(("transfer-encoding", "chunked") if late else ("content-length", str(len(body)))))
        self.send_header("set-cookie", "__cf_bm=fake; path=/")
        if encoder:
            self.send_header("content-encoding", encoder.name)
        self.end_headers()
        if "abort" in self.scn:
            self.wfile.write(body[: len(body) // 2])
            self._abort()
        elif late:
            self._write_chunk(body)
            self._end_chunks()
        else:
            self.wfile.write(body)

    def _send_stream(self, stream: _Stream) -> None:
        data = [f.encode() for f in _shape(stream, self.scn)]
        encoder = self._encoder()
        self._common_headers(200, stream.content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        if encoder:
            self.send_header("content-encoding", encoder.name)
        self.end_headers()
        end = len(data) // 2 if "abort" in self.scn else len(data)
        batch = BIG_BATCH if "big" in self.scn else 1
        gap = SLOW_DELAY if "slow" in self.scn else pace(self.scn)
        for i in range(0, end, batch):
            if gap and i:
                time.sleep(gap)  # a provider that streams as it generates
            chunk = b"".join(data[i : min(i + batch, end)])
            if encoder:
                chunk = encoder.chunk(chunk)
            self._write_chunk(chunk)
        if "abort" in self.scn:
            self._abort()
            return
        if encoder:
            self._write_chunk(encoder.end())
        self._end_chunks()

    def _end_chunks(self) -> None:
        if late := late_end(self.scn):
            time.sleep(late)  # real servers end the body a moment after the last byte
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, chunk: bytes) -> None:
        if chunk:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()

    def _abort(self) -> None:
        """Close the socket abruptly, mid-answer."""
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()


class _Server(ThreadingHTTPServer):
    """Threading HTTP server that knows its FakeUpstream and stays quiet on client errors."""

    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 drops bursts of parallel connections

    def __init__(self, upstream: FakeUpstream) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore errors such as failed TLS handshakes or resets."""


class FakeUpstream:
    """The fake provider: ``start()`` it, point clients at ``url``, inspect ``requests``.

    ``scenarios`` (e.g. ``"late-end-150"``) apply to every request, as if each asked for them."""

    def __init__(self, tls: tuple[str, str] | None = None, scenarios: str = "") -> None:
        self.tls = tls
        self.scenarios = parse_scenarios(scenarios)  # for every request
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self.url = ""
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeUpstream:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        server = _Server(self)
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            ctx.set_alpn_protocols(["http/1.1"])
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self.port = server.server_address[1]
        self.url = f"https://localhost:{self.port}" if self.tls else f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=server.serve_forever, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def count(self, marker: str) -> int:
        """Number of received requests whose body or path+query contains ``marker``."""
        with self._lock:
            return sum(r.contains(marker) for r in self.requests)

    def arrivals(self, marker: str) -> list[float]:
        """Arrival times (time.monotonic) of the requests containing ``marker``, in order."""
        with self._lock:
            return sorted(r.received for r in self.requests if r.contains(marker))

    def reset(self) -> None:
        """Forget all recorded requests."""
        with self._lock:
            self.requests.clear()


def make_tls_cert(directory: str) -> tuple[str, str]:
    """CA-signed cert for 'localhost' + 127.0.0.1 via mitmproxy.certs; returns (certfile, keyfile).

    The certfile holds the leaf followed by its CA, so it also works as a trust bundle.
    """
    from mitmproxy import certs

    store = certs.CertStore.from_store(directory, "fake-upstream", 2048)
    sans = [certs.x509.DNSName("localhost"), certs.x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    entry = store.get_cert("localhost", sans)
    certfile = Path(directory) / "fake-upstream-localhost.pem"
    certfile.write_bytes(entry.cert.to_pem() + store.default_ca.to_pem())
    return str(certfile), str(Path(directory) / "fake-upstream-ca.pem")
