"""End to end: streams are captured as they pass, stored only when complete, replayed byte for byte."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest

from helpers import CHAT, STREAMS, chat_body, openai_client, post, stream_raw, wait_for_status


def try_stream(proxy, upstream, path: str, body: dict, headers: dict) -> bytes:
    """Reads what it can: a stream the upstream aborts raises in the client, as it should."""
    try:
        return stream_raw(proxy, upstream, path, body, headers)[1]
    except httpx.HTTPError:
        return b""


def assert_not_stored(proxy, upstream, path: str, body: dict) -> None:
    proxy_answer = post(proxy, upstream, path, body, {"cache-control": "only-if-cached"})
    assert proxy_answer.status_code == 504


@pytest.mark.parametrize("path,make,content_type", STREAMS.values(), ids=STREAMS.keys())
def test_stream_hit_is_byte_identical(shared_proxy, upstream, marker, path, make, content_type):
    miss, recorded = stream_raw(shared_proxy, upstream, path, make(marker))
    assert miss.headers["x-ai-cache-status"] == "MISS"
    assert miss.headers["content-type"].startswith(content_type)
    assert len(recorded) > 100
    wait_for_status(shared_proxy, upstream, make(marker), "HIT", path)
    hit, replayed = stream_raw(shared_proxy, upstream, path, make(marker))
    assert hit.headers["x-ai-cache-status"] == "HIT"
    assert hit.headers["content-type"].startswith(content_type)
    assert replayed == recorded
    assert upstream.count(marker) == 1


def test_openai_sdk_stream_replays_text_tool_calls_and_usage(shared_proxy, upstream, marker):
    client = openai_client(shared_proxy, upstream)
    ask = dict(
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"weather {marker}"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )

    def collect() -> tuple[set, str, list, object]:
        chunks = list(client.chat.completions.create(**ask))
        calls = [tc.model_dump() for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return {c.id for c in chunks}, text, calls, chunks[-1].usage

    first = collect()
    wait_for_status(shared_proxy, upstream, ask, "HIT")
    second = collect()
    assert second == first
    assert first[2] and first[2][0]["function"]["name"] == "get_weather"
    assert first[3] is not None and first[3].total_tokens > 0
    assert upstream.count(marker) == 1


def test_openai_sdk_text_stream(shared_proxy, upstream, marker):
    client = openai_client(shared_proxy, upstream)
    ask = dict(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": f"tell {marker}"}])
    first = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask) if c.choices)
    wait_for_status(shared_proxy, upstream, ask, "HIT")
    second = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask) if c.choices)
    assert first == second == f"echo: tell {marker}"


def test_anthropic_sdk_stream_replays_the_same_message(shared_proxy, upstream, marker):
    client = anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url=upstream.url,
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(proxy=shared_proxy.url),
    )
    ask = dict(model="claude-sonnet-4", max_tokens=64, messages=[{"role": "user", "content": f"tell {marker}"}])

    def collect(**extra):
        with client.messages.stream(**ask, **extra) as stream:
            text = "".join(stream.text_stream)
            return text, stream.get_final_message()

    text, message = collect()
    for _ in range(50):  # the stored stream becomes visible once its background write ends
        try:
            collect(extra_headers={"cache-control": "only-if-cached"})
            break
        except anthropic.APIStatusError:
            time.sleep(0.05)
    text2, message2 = collect()
    assert text2 == text == f"echo: tell {marker}"
    assert message2.id == message.id and message2.usage.output_tokens == message.usage.output_tokens
    assert upstream.count(marker) == 1


def test_streaming_and_json_requests_never_share_an_entry(shared_proxy, upstream, marker):
    post(shared_proxy, upstream, CHAT, chat_body(marker))
    streamed, body = stream_raw(shared_proxy, upstream, CHAT, chat_body(marker, stream=True))
    assert streamed.headers["x-ai-cache-status"] == "MISS"
    assert body.startswith(b"data: ")


NEVER_STORED = {
    "upstream aborts": ("openai-chat", "abort"),
    "no terminal event": ("openai-chat", "no-terminal"),
    "cut final frame": ("openai-chat", "cut-frame"),
    "[DONE] only in content": ("openai-chat", "done-in-content"),
    "openai error chunk": ("openai-chat", "error-event"),
    "anthropic error event": ("anthropic-messages", "error-event"),
    "anthropic no message_stop": ("anthropic-messages", "no-terminal"),
    "anthropic aborted": ("anthropic-messages", "abort"),
    "responses failed": ("openai-responses", "failed"),
    "responses incomplete": ("openai-responses", "incomplete"),
    "responses error event": ("openai-responses", "error-event"),
    "gemini without finishReason": ("gemini", "no-terminal"),
    "ollama without done": ("ollama", "no-terminal"),
    "ollama error line": ("ollama", "error-event"),
    "non-200 stream": ("openai-chat", "status-500"),
}


@pytest.mark.parametrize("protocol,scenario", NEVER_STORED.values(), ids=NEVER_STORED.keys())
def test_broken_streams_are_never_stored(shared_proxy, upstream, marker, protocol, scenario):
    path, make, _ = STREAMS[protocol]
    try_stream(shared_proxy, upstream, path, make(marker), {"x-fake-scenario": scenario})
    time.sleep(0.2)  # give a (wrongly) scheduled background write the time to land
    assert_not_stored(shared_proxy, upstream, path, make(marker))


@pytest.mark.parametrize("scenario", ["keepalive", "crlf"])
def test_keepalive_and_crlf_streams_are_stored(shared_proxy, upstream, marker, scenario):
    _, recorded = stream_raw(
        shared_proxy, upstream, CHAT, chat_body(marker, stream=True), {"x-fake-scenario": scenario}
    )
    assert (b": keepalive" in recorded) if scenario == "keepalive" else (b"\r\n\r\n" in recorded)
    hit = wait_for_status(shared_proxy, upstream, chat_body(marker, stream=True), "HIT")
    assert hit.content == recorded


def test_client_disconnect_mid_stream_is_not_stored(shared_proxy, upstream, marker):
    body = chat_body(marker, stream=True)
    with shared_proxy.client() as client:
        with client.stream("POST", upstream.url + CHAT, json=body, headers={"x-fake-scenario": "slow"}) as r:
            next(r.iter_raw())
    time.sleep(1.5)  # the upstream finishes its slow stream to a proxy whose client is gone
    assert_not_stored(shared_proxy, upstream, CHAT, body)


def test_oversized_stream_reaches_the_client_whole_and_is_not_stored(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_max_body="64KiB")
    body = chat_body(marker, stream=True)
    headers = {"x-fake-scenario": "big", "x-fake-size": "300000"}
    _, received = stream_raw(proxy, upstream, CHAT, body, headers)
    assert len(received) > 300_000 and received.endswith(b"data: [DONE]\n\n")
    _, direct = stream_raw(proxy, upstream, CHAT, body, {**headers, "x-ai-cache-bypass": "1"})
    assert len(direct) == len(received)
    assert upstream.count(marker) == 2
    assert "not stored: larger than ai_cache_max_body" in proxy.logs()


def test_server_forced_stream_is_tagged_by_its_answer(shared_proxy, upstream, marker):
    answer = post(shared_proxy, upstream, CHAT, chat_body(marker), {"x-fake-scenario": "sse-forced"})
    assert answer.headers["content-type"].startswith("text/event-stream")
    hit = wait_for_status(shared_proxy, upstream, chat_body(marker), "HIT")
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert hit.content == answer.content


def test_json_answer_to_a_stream_request_is_tagged_json(shared_proxy, upstream, marker):
    body = chat_body(marker, stream=True)
    _, recorded = stream_raw(shared_proxy, upstream, CHAT, body, {"x-fake-scenario": "json-for-stream"})
    hit = wait_for_status(shared_proxy, upstream, body, "HIT")
    assert hit.headers["content-type"].startswith("application/json")
    assert json.loads(hit.content) == json.loads(recorded)


def timed_stream(proxy, upstream, body: dict, headers: dict | None = None) -> tuple[float, float, bytes]:
    start = time.monotonic()
    first = None
    parts = []
    with proxy.client() as client:
        with client.stream("POST", upstream.url + CHAT, json=body, headers=headers or {}) as response:
            for chunk in response.iter_raw():
                first = first or time.monotonic() - start
                parts.append(chunk)
    return first or 0.0, time.monotonic() - start, b"".join(parts)


def test_paced_replay_keeps_the_recorded_rhythm(start_proxy, upstream, marker):
    body = chat_body(marker, stream=True)
    paced = start_proxy(ai_cache_replay_speed="1")
    _, recorded_total, recorded = timed_stream(paced, upstream, body, {"x-fake-scenario": "slow"})
    wait_for_status(paced, upstream, body, "HIT")
    first, total, replayed = timed_stream(paced, upstream, body)
    assert replayed == recorded
    assert total >= 0.7 * recorded_total  # it really waited between chunks
    assert first < total / 3  # and the first bytes came at once, not after the whole duration
    instant = start_proxy(ai_cache_dir=paced.options["ai_cache_dir"])
    paced.stop()
    _, instant_total, instant_bytes = timed_stream(instant, upstream, body)
    assert instant_bytes == recorded
    assert instant_total < recorded_total / 2
    assert upstream.count(marker) == 1


def test_client_leaving_a_paced_replay_costs_nothing(start_proxy, upstream, marker):
    body = chat_body(marker, stream=True)
    proxy = start_proxy(ai_cache_replay_speed="1")
    timed_stream(proxy, upstream, body, {"x-fake-scenario": "slow"})
    wait_for_status(proxy, upstream, body, "HIT")
    with proxy.client() as client:
        with client.stream("POST", upstream.url + CHAT, json=body) as response:
            assert response.headers["x-ai-cache-status"] == "HIT"
            next(response.iter_raw())
    _, _, again = timed_stream(proxy, upstream, body)
    assert again.endswith(b"data: [DONE]\n\n")
    logs = proxy.logs()
    assert "Traceback" not in logs and "Addon error" not in logs
