"""Self-tests for the fake upstream, talking to it directly with the official SDKs and httpx."""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_upstream import FakeUpstream, make_tls_cert

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def oai(up: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.url + "/v1", api_key="sk-fake", max_retries=0)


def test_openai_chat_json_and_fresh_ids(up: FakeUpstream, oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hello json-marker"}]
    first = oai.chat.completions.create(model="gpt-4o-mini", messages=msgs)  # type: ignore[arg-type]
    second = oai.chat.completions.create(model="gpt-4o-mini", messages=msgs)  # type: ignore[arg-type]
    assert first.choices[0].message.content == "echo: hello json-marker"
    assert first.id != second.id and first.id.startswith("chatcmpl-fake-")
    assert up.count("json-marker") == 2
    raw = oai.chat.completions.with_raw_response.create(model="m", messages=msgs)  # type: ignore[arg-type]
    assert raw.headers["x-request-id"].startswith("req_") and "__cf_bm" in raw.headers["set-cookie"]


def test_openai_chat_stream_usage_and_tools(oai: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "one two three"}]}]
    chunks = list(
        oai.chat.completions.create(model="m", messages=msgs, stream=True, stream_options={"include_usage": True})
    )  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: one two three"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    with oai.chat.completions.stream(model="m", messages=msgs, tools=TOOLS) as s:  # type: ignore[arg-type]
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    plain = oai.chat.completions.create(model="m", messages=msgs, tools=TOOLS)  # type: ignore[arg-type]
    assert plain.choices[0].finish_reason == "tool_calls"


def test_openai_responses_and_embeddings(oai: openai.OpenAI) -> None:
    assert oai.responses.create(model="m", input="hi there").output_text == "echo: hi there"
    with oai.responses.stream(model="m", input=[{"role": "user", "content": "streamed words"}]) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "echo: streamed words"
    emb = oai.embeddings.create(model="e", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8


def test_anthropic_messages_and_stream(up: FakeUpstream) -> None:
    client = anthropic.Anthropic(base_url=up.url, api_key="sk-ant-fake", max_retries=0)
    msgs = [{"role": "user", "content": "bonjour le monde"}]
    msg = client.messages.create(model="claude-x", max_tokens=50, messages=msgs)  # type: ignore[arg-type]
    assert msg.content[0].text == "echo: bonjour le monde"  # type: ignore[union-attr]
    with client.messages.stream(model="claude-x", max_tokens=50, messages=msgs) as s:  # type: ignore[arg-type]
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "echo: bonjour le monde" and final.stop_reason == "end_turn" and final.id.startswith("msg_fake_")
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    with client.messages.stream(model="c", max_tokens=5, messages=msgs, tools=tools) as s:  # type: ignore[arg-type]
        block = s.get_final_message().content[0]
    assert block.type == "tool_use" and block.input == {"city": "Paris"}


def test_gemini_sse_and_ollama_ndjson(up: FakeUpstream) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "ciao mondo"}]}]}
    with httpx.stream("POST", up.url + "/v1beta/models/gemini-x:streamGenerateContent?alt=sse", json=body) as r:
        raw = r.read().decode()
    events = [json.loads(f[len("data: ") :]) for f in raw.split("\r\n\r\n") if f]
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == "echo: ciao mondo"
    assert events[-1]["candidates"][0]["finishReason"] == "STOP" and "usageMetadata" in events[-1]
    chat = {"model": "llama", "messages": [{"role": "user", "content": "x y"}]}
    with httpx.stream("POST", up.url + "/api/chat", json=chat) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(d["message"]["content"] for d in lines) == "echo: x y" and lines[-1]["done"] is True
    one = httpx.post(up.url + "/api/generate", json={"model": "l", "prompt": "p", "stream": False}).json()
    assert one["response"] == "echo: p" and one["done"] is True


def test_scenarios(up: FakeUpstream) -> None:
    url = up.url + "/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(url, json=body, headers={"x-fake-scenario": "abort"})
    r = httpx.post(url, json=body, headers={"x-fake-scenario": "gzip,crlf,keepalive,no-terminal"})
    assert r.headers["content-encoding"] == "gzip" and ": keepalive\r\n\r\n" in r.text and "[DONE]" not in r.text
    raw = httpx.post(url, json=body, headers={"x-fake-scenario": "cut-frame", "accept-encoding": "identity"}).text
    assert raw.endswith("data: [DONE]\n")
    raw = httpx.post(url, json=body, headers={"x-fake-scenario": "done-in-content"}).text
    assert "data: [DONE]\\n" in raw and not raw.endswith("data: [DONE]\n\n")
    r = httpx.post(url, json={**body, "stream": False}, headers={"x-fake-scenario": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.json()["object"] == "chat.completion"
    r = httpx.post(up.url + "/v1/messages", json=body, headers={"x-fake-scenario": "status-429"})
    assert r.status_code == 429 and r.json()["type"] == "error"
    r = httpx.post(url, json=body, headers={"x-fake-scenario": "big", "x-fake-size": "200000"})
    assert len(r.content) > 200_000 and r.text.endswith("data: [DONE]\n\n")
    assert httpx.post(url, content=b"{nope").status_code == 400
    assert httpx.get(up.url + "/v1/models").json()["object"] == "list"
    assert httpx.post(up.url + "/nowhere", json={}).status_code == 404


def test_tls(tmp_path: Path) -> None:
    cert, key = make_tls_cert(str(tmp_path))
    with FakeUpstream(tls=(cert, key)) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "s"}]},
                       verify=ssl.create_default_context(cafile=cert))  # fmt: skip
    assert r.json()["choices"][0]["message"]["content"] == "echo: s"


def test_h2_upstream_ends_the_stream_in_a_later_empty_data_frame(tmp_path: Path) -> None:
    """The HTTP/2 fake really sends END_STREAM on its own, after the last event's frame."""
    import itertools
    import socket

    import h2.connection
    import h2.events

    from h2_upstream import H2Upstream

    cert, key = make_tls_cert(str(tmp_path))
    server = H2Upstream((cert, key), scenarios="late-end-100").start()
    try:
        context = ssl.create_default_context(cafile=cert)
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="localhost")
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}]})
        conn.send_headers(1, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
                              (":authority", "localhost")])  # fmt: skip
        conn.send_data(1, body.encode(), end_stream=True)
        sock.sendall(conn.data_to_send())
        frames: list[tuple[int, bytes, bool]] = []  # (which read brought it, data, END_STREAM)
        for read in itertools.count():
            events = conn.receive_data(sock.recv(65536))
            data = [e for e in events if isinstance(e, h2.events.DataReceived)]
            frames += [(read, e.data, e.stream_ended is not None) for e in data]
            sock.sendall(conn.data_to_send())
            if frames and frames[-1][2]:
                break
        sock.close()
    finally:
        server.stop()
    *events, (read, last, end) = frames
    assert last == b"" and end and not any(e for _, _, e in events)
    assert events[-1][1].endswith(b"data: [DONE]\n\n") and read > events[-1][0]  # it came later
    assert [r.http_version for r in server.requests] == ["HTTP/2"]
