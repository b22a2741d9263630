"""The completeness gate, protocol by protocol, fed the way mitmproxy feeds it: in arbitrary chunks."""

from __future__ import annotations

import json
import tracemalloc
import zlib

import pytest

from ai_cache.capture import StreamCapture
from ai_cache.protocols import BY_NAME
from ai_cache.sse import parse_sse

DONE = b"data: [DONE]\n\n"


def openai_chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"id": "c1", "choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


def event(name: str, **data) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


def gemini(finish: str | None) -> bytes:
    candidate = {"content": {"parts": [{"text": "hi"}]}}
    if finish:
        candidate["finishReason"] = finish
    return b"data: " + json.dumps({"candidates": [candidate]}).encode() + b"\r\n\r\n"


def ollama(done: bool, **extra) -> bytes:
    return json.dumps({"message": {"content": "hi"}, "done": done, **extra}).encode() + b"\n"


def verdict(protocol: str, body: bytes, fmt: str = "sse", step: int = 7, max_body: int = 10**6) -> str | None:
    capture = StreamCapture(BY_NAME[protocol], fmt, max_body)
    forwarded = b"".join(capture(body[i : i + step]) for i in range(0, len(body), step))
    assert forwarded == body  # the tee never alters what the client gets
    # The tail check runs at once; the event-by-event error search only for suspects.
    return capture.incompleteness() or (capture.full_check() if capture.needs_full_check else None)


ANTHROPIC_OK = event("message_start", message={"id": "msg_1"}) + event("content_block_delta") + event("message_stop")
RESPONSES_OK = event("response.created") + event("response.output_text.delta", delta="hi") + event("response.completed")

COMPLETE = {
    "openai chat": ("openai-chat", openai_chunk("hi") + DONE, "sse"),
    "openai legacy": ("openai-completions", openai_chunk("hi") + DONE, "sse"),
    "keepalive after done": ("openai-chat", openai_chunk("hi") + DONE + b": keepalive\n\n", "sse"),
    "crlf framing": ("openai-chat", (openai_chunk("hi") + DONE).replace(b"\n", b"\r\n"), "sse"),
    "trailing whitespace": ("openai-chat", openai_chunk("hi") + DONE + b"\n  ", "sse"),
    "anthropic": ("anthropic-messages", ANTHROPIC_OK + b": ping\n\n", "sse"),
    "responses": ("openai-responses", RESPONSES_OK, "sse"),
    "responses without event lines": (
        "openai-responses",
        b"data: " + json.dumps({"type": "response.completed"}).encode() + b"\n\n",
        "sse",
    ),
    "gemini": ("gemini", gemini(None) + gemini("STOP"), "sse"),
    "lone CR framing": ("openai-chat", (openai_chunk("hi") + DONE).replace(b"\n", b"\r"), "sse"),
    "error: null is no error": ("openai-chat", b'data: {"choices": [], "error": null}\n\n' + DONE, "sse"),
    "ollama": ("ollama", ollama(False) + ollama(True), "ndjson"),
    "ollama without final newline": ("ollama", ollama(False) + ollama(True)[:-1], "ndjson"),
}

INCOMPLETE = {
    "no terminal event": ("openai-chat", openai_chunk("hi"), "sse", "terminal"),
    "[DONE] inside content": ("openai-chat", openai_chunk("data: [DONE]\n\n"), "sse", "terminal"),
    "cut-off final frame": ("openai-chat", openai_chunk("hi") + b"data: [DONE]\n", "sse", "mid-frame"),
    "half a frame": ("openai-chat", openai_chunk("hi") + b'data: {"id": "x', "sse", "mid-frame"),
    "openai error chunk": (
        "openai-chat",
        openai_chunk("hi") + b'data: {"error": {"message": "overloaded"}}\n\n' + DONE,
        "sse",
        "error",
    ),
    "anthropic error event": (
        "anthropic-messages",
        event("message_start") + event("error", error={"type": "overloaded_error"}) + event("message_stop"),
        "sse",
        "error",
    ),
    "anthropic without message_stop": ("anthropic-messages", event("message_start"), "sse", "terminal"),
    "responses failed": ("openai-responses", event("response.created") + event("response.failed"), "sse", "error"),
    "responses incomplete": ("openai-responses", event("response.incomplete"), "sse", "error"),
    "responses error then completed": (
        "openai-responses",
        event("error", message="boom") + event("response.completed"),
        "sse",
        "error",
    ),
    "gemini without finishReason": ("gemini", gemini(None) + gemini(None), "sse", "terminal"),
    "ollama without done": ("ollama", ollama(False) + ollama(False), "ndjson", "terminal"),
    "ollama cut line": ("ollama", ollama(False) + ollama(True)[:20], "ndjson", "terminal"),
    "ollama error line": ("ollama", ollama(False) + b'{"error": "boom"}\n' + ollama(True), "ndjson", "error"),
    "keepalive only": ("openai-chat", b": keepalive\n\n", "sse", "terminal"),
}


@pytest.mark.parametrize("protocol,body,fmt", COMPLETE.values(), ids=COMPLETE.keys())
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_complete_streams_are_storable(protocol, body, fmt, step):
    assert verdict(protocol, body, fmt, step) is None


@pytest.mark.parametrize("protocol,body,fmt,why", INCOMPLETE.values(), ids=INCOMPLETE.keys())
@pytest.mark.parametrize("step", [1, 7, 4096])
def test_incomplete_streams_are_refused(protocol, body, fmt, why, step):
    reason = verdict(protocol, body, fmt, step)
    assert reason is not None and why in reason


def test_oversized_stream_is_forwarded_whole_and_not_stored():
    body = b"".join(openai_chunk("x" * 100) for _ in range(50)) + DONE
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", max_body=1000)
    forwarded = b"".join(capture(body[i : i + 300]) for i in range(0, len(body), 300))
    assert forwarded == body
    assert "max_body" in capture.incompleteness()
    assert capture.parts == []  # the copy was dropped, not kept growing


def test_only_streams_carrying_an_error_needle_are_searched_event_by_event():
    def suspect(protocol: str, body: bytes) -> bool:
        capture = StreamCapture(BY_NAME[protocol], "sse", 10**6)
        for i in range(0, len(body), 5):  # needles split across chunks are found too
            capture(body[i : i + 5])
        return capture.suspect

    assert not suspect("openai-chat", openai_chunk('no "error" here, error, errors') + DONE)
    assert suspect("openai-chat", b'data: {"error": {"message": "x"}}\n\n' + DONE)
    assert suspect("anthropic-messages", event("error", error={}) + event("message_stop"))
    assert not suspect("anthropic-messages", ANTHROPIC_OK)
    assert not suspect("openai-responses", event("response.completed", response={"error": None}))


def test_capture_records_chunk_timing_that_adds_up():
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", 10**6)
    for part in (openai_chunk("a"), b"", openai_chunk("b"), DONE):
        capture(part)
    assert [n for _, n in capture.chunks] == [len(openai_chunk("a")), len(openai_chunk("b")), len(DONE)]
    assert capture.chunks[0][0] == 0.0
    assert capture.body == openai_chunk("a") + openai_chunk("b") + DONE


def test_capture_never_raises_into_mitmproxy():
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", 10**6)
    capture.parts = None  # type: ignore[assignment]  # break the capture's internals
    assert capture(b"data: x\n\n") == b"data: x\n\n"
    assert "capture failed" in capture.incompleteness()


def test_sse_parsing_joins_data_lines_and_skips_comments():
    events, at_boundary = parse_sse(b": hello\nevent: a\ndata: one\ndata:two\n\ndata: x\r\n\r\n")
    assert [(e.name, e.data) for e in events] == [("a", "one\ntwo"), ("message", "x")]
    assert at_boundary
    events, at_boundary = parse_sse(b"data: x\n\ndata: cut")
    assert [e.data for e in events] == ["x"] and not at_boundary


# WHATWG SSE allows a lone CR as line terminator; such a complete stream is refused.
def test_lone_cr_framed_stream_is_storable():
    capture = StreamCapture(BY_NAME["openai-chat"], "sse", 10**6)
    capture(b'data: {"choices": []}\r\rdata: [DONE]\r\r')
    assert capture.incompleteness() is None


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
