"""protocols.py: one class per provider family owns recognition, streams, usage, prompt
text and headers; the key of every request is what it was before the families were classes."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from ai_cache.keys import KeyPolicy, cacheable_request, header_map, path_of
from ai_cache.protocols import (
    BASE_CREDENTIAL_HEADERS,
    BY_NAME,
    PROTOCOLS,
    AnthropicMessages,
    Protocol,
    Question,
    answer_headers,
    credential_headers,
    forget_families,
    recognise,
    register,
)
from ai_cache.sse import Event
from fake_upstream import RecordedRequest, answer_chunks

SCOPED = KeyPolicy(ignore_fields=("user", "metadata.user_id"), scope_headers=("x-tenant",), include_host=False)

# (path, headers, body) → (family, key, key under SCOPED, preview), the keys computed on main
# before the restructuring (commit 651d6e5): existing caches must go on hitting.
KEYS = [
    (
        ("/v1/chat/completions", {}, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        (
            "openai-chat",
            "1e5ca6508d2a1221cbab2d3d1e9df3eaef71bc08b3b66ac750dcc82fef9ebb57",
            "a677e50d7f9035e766024be190a99cc7209d7a32d23e1185ddf7ca20be75df32",
            "hi",
        ),
    ),
    (
        (
            "/v1/chat/completions?key=s&x=1",
            {"authorization": "Bearer a", "openai-beta": "assistants=v2"},
            {
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            },
        ),
        (
            "openai-chat",
            "d3aacbce5b97f6e5d9f3adb338acd80202c90683dddc901a62cd968dc3fdb2a4",
            "0e48a98b75dfd2286ac8cadd3eaaeda38535e954e0f648749b8d92fd8d3a1b8e",
            "hi",
        ),
    ),
    (
        (
            "/v1/chat/completions",
            {"anthropic-version": "2023-06-01", "anthropic-beta": "x"},
            {"model": "claude", "messages": [{"role": "user", "content": "cross-family headers"}]},
        ),
        (
            "openai-chat",
            "0949fa9a570cf2f471fc7d0d44cdf56580e83d986b33a4ed0cc5ae3cebd4b2e9",
            "4e97b6bafe7748f34ec9a9fc7452e3e84ab5aa36addcc17ce92a89f439f2fdf4",
            "cross-family headers",
        ),
    ),
    (
        (
            "/openai/deployments/dep1/chat/completions?api-version=2024-02-01",
            {"api-key": "k"},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "azure"}]}]},
        ),
        (
            "openai-chat",
            "86f34306502ee4e102aadb9fe96464d5a899513402d807cb951d6ec398c0d03b",
            "fdfb59146368ef0318f9a84a98795535d57ba9e82d61275b263eb875d1a4ac87",
            "azure",
        ),
    ),
    (
        (
            "/v1/completions",
            {"authorization": "Bearer a"},
            {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this", "stream": True},
        ),
        (
            "openai-completions",
            "c79fa415cffbb141a3747645456b26c2b41f0f4666affe642d26e371e90d02aa",
            "e4bb32d1853683cd72938996c21fa589c0bc1c2016d0eb9980aed903351c69ee",
            "Say this",
        ),
    ),
    (
        ("/v1/responses", {"openai-beta": "responses=v1"}, {"model": "gpt-4o", "input": "tell me", "stream": True}),
        (
            "openai-responses",
            "482807078489bb2e5b1f2dac06cf58c55eeef2fa7123aacff94701d80fde1301",
            "74c1709462a170853ef5bb06bca0c0df3e6182ec8a32344108a1313de74380a2",
            "tell me",
        ),
    ),
    (
        (
            "/v1/responses",
            {},
            {"model": "gpt-4o", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}]},
        ),
        (
            "openai-responses",
            "92ecf854a1be79915882e73e226015ca47548d8576ca24538fea46f01bf59c2c",
            "eb49b06c2c328211c9f15b67dfc4cf0fd9df785ffe7ea245539563315caa5bdb",
            "a",
        ),
    ),
    (
        (
            "/v1/embeddings",
            {"cookie": "c=1"},
            {"model": "text-embedding-3-small", "input": ["one", "two"], "stream": True},
        ),
        (
            "openai-embeddings",
            "b2fef46f873a82d9969f470623398c7bae5ca798c8fbfd1216e4df4f5ea7e6f5",
            "73ac225dce4d4b450bff4777020da1616bb9ffa5ff721e04c1089f57c9915d77",
            "two",
        ),
    ),
    (
        (
            "/v1/messages",
            {"x-api-key": "k", "anthropic-version": "2023-06-01"},
            {
                "model": "claude-3-5-sonnet",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hello"}],
                "stream": True,
            },
        ),
        (
            "anthropic-messages",
            "969f61072184e97a0425ac4b9e852a1fc3307e5b043342708bf8f5d579f336d1",
            "8fd125fb6a407554becbdee141cfab1ce08a00f493f30f94c956a5fece994b96",
            "hello",
        ),
    ),
    (
        (
            "/v1/messages",
            {"anthropic-beta": "tools-2024", "openai-beta": "odd"},
            {
                "model": "claude-3-5-sonnet",
                "max_tokens": 64,
                "system": "s",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            },
        ),
        (
            "anthropic-messages",
            "543dcb51c631dfd6811df1a4b9d124b50b96f05ad558f83ada5c16d1319d69b6",
            "dc44316e6d8369ba9920a87409698148af22fda4edf9f7b1c6ad0345a65533dd",
            "x",
        ),
    ),
    (
        (
            "/v1beta/models/gemini-2.0-flash:generateContent?key=secret",
            {"x-goog-api-key": "g"},
            {"contents": [{"role": "user", "parts": [{"text": "gem"}]}]},
        ),
        (
            "gemini",
            "96981efeef39cb35fe0532e716bf6248ff7074ca8349b4ae98bfe0fb10d01e21",
            "5a56f7981d60ac129af2f7a192b81c34b9dc784f87f763ad82616dd8864d2063",
            "gem",
        ),
    ),
    (
        (
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            {},
            {"contents": [{"parts": [{"text": "gem stream"}]}]},
        ),
        (
            "gemini",
            "a0090dfc4e437825472ef81a4b344d52889f0cd7303eed7fddc117d1c374d0ec",
            "bfd7fca14f8c5e5c791a7014d55ee73c14bd1cfc6cfe2b58d932185a1c9d7c82",
            "gem stream",
        ),
    ),
    (
        ("/api/chat", {}, {"model": "llama3", "messages": [{"role": "user", "content": "ollama"}]}),
        (
            "ollama",
            "4a3bc1beb0e2598ffd08652a44615812a74b072753ad4882fb655ac901f04201",
            "f3109af650e86cd5246f879c7c8e907d2857ca904bd7904f753194b18e98fde9",
            "ollama",
        ),
    ),
    (
        ("/api/generate", {"proxy-authorization": "p"}, {"model": "llama3", "prompt": "why", "stream": False}),
        (
            "ollama",
            "e1994e68f2e7c1d5491c1bcda421b4a553bc2c18c56a13ab4e3362f4c8b85407",
            "19c0b3b1382efb03ddc8f64c8845a4547d56e8bcfc33e9d544c9981dfaafe4cd",
            "why",
        ),
    ),
    (
        (
            "/v1/chat/completions",
            {"x-tenant": "t1"},
            {"model": "m", "messages": [], "user": "u", "metadata": {"user_id": "7"}},
        ),
        (
            "openai-chat",
            "5ef282287167c8523b3d2067839617a06c8211b2c0a953efa6a7e62197db62d1",
            "aa7bd070aae6e7c4094ce795247ba214c38dee0b4b586fe05587b1e25dc1dafc",
            '{"model": "m", "messages": [], "user": "u", "metadata": {"us',
        ),
    ),
]


def request(path: str, headers: dict[str, str], body: dict) -> http.Request:
    made = tutils.treq(
        method=b"POST",
        host="api.example.com",
        port=443,
        scheme=b"https",
        path=path.encode(),
        content=json.dumps(body).encode(),
        headers=http.Headers(((b"content-type", b"application/json"),)),
    )
    for name, value in headers.items():
        made.headers[name] = value
    return made


@pytest.mark.parametrize("sent, expected", KEYS, ids=[f"{i}-{k[1][0]}" for i, k in enumerate(KEYS)])
def test_keys_and_previews_are_those_computed_before(sent, expected):
    path, headers, body = sent
    made = request(path, headers, body)
    protocol = recognise("POST", path_of(made))
    assert protocol is not None
    keys = [cacheable_request(made, header_map(made), protocol, policy).key for policy in (KeyPolicy(), SCOPED)]
    assert (protocol.name, *keys, protocol.preview(body)) == expected


def sse(*objects: dict, done: bool = False, named: bool = False) -> bytes:
    out = b""
    for obj in objects:
        out += f"event: {obj['type']}\n".encode() if named else b""
        out += b"data: " + json.dumps(obj).encode() + b"\n\n"
    return out + (b"data: [DONE]\n\n" if done else b"")


def ndjson(*objects: dict) -> bytes:
    return b"".join(json.dumps(obj).encode() + b"\n" for obj in objects)


# (family, format, answer) → the usage token_usage() reported on main before the restructuring.
USAGE = [
    (
        "openai-chat",
        "json",
        json.dumps({"usage": {"prompt_tokens": 11, "completion_tokens": 7}}).encode(),
        {"input": 11, "output": 7},
    ),
    (
        "openai-chat",
        "sse",
        sse(
            {"choices": [{"delta": {"content": "x"}}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
            done=True,
        ),
        {"input": 5, "output": 3},
    ),
    (
        "openai-completions",
        "json",
        json.dumps({"usage": {"prompt_tokens": 4, "completion_tokens": 2}}).encode(),
        {"input": 4, "output": 2},
    ),
    (
        "openai-embeddings",
        "json",
        json.dumps({"data": [], "usage": {"prompt_tokens": 9, "total_tokens": 9}}).encode(),
        {"input": 9, "output": 0},
    ),
    (
        "openai-responses",
        "json",
        json.dumps({"usage": {"input_tokens": 12, "output_tokens": 6}}).encode(),
        {"input": 12, "output": 6},
    ),
    (
        "openai-responses",
        "sse",
        sse(
            {"type": "response.created", "response": {"usage": None}},
            {"type": "response.completed", "response": {"usage": {"input_tokens": 13, "output_tokens": 8}}},
            named=True,
        ),
        {"input": 13, "output": 8},
    ),
    (
        "anthropic-messages",
        "json",
        json.dumps({"usage": {"input_tokens": 20, "output_tokens": 10}}).encode(),
        {"input": 20, "output": 10},
    ),
    (
        "anthropic-messages",
        "sse",
        sse(
            {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
            {"type": "message_delta", "usage": {"output_tokens": 15}},
            {"type": "message_stop"},
            named=True,
        ),
        {"input": 25, "output": 15},
    ),
    (
        "gemini",
        "json",
        json.dumps({"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}).encode(),
        {"input": 3, "output": 4},
    ),
    (
        "gemini",
        "sse",
        sse(
            {"candidates": [{}], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}},
            {
                "candidates": [{"finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 9},
            },
        ),
        {"input": 3, "output": 9},
    ),
    (
        "ollama",
        "ndjson",
        ndjson({"message": {"content": "x"}, "done": False}, {"done": True, "prompt_eval_count": 26, "eval_count": 12}),
        {"input": 26, "output": 12},
    ),
    (
        "ollama",
        "json",
        json.dumps({"response": "x", "done": True, "prompt_eval_count": 6, "eval_count": 2}).encode(),
        {"input": 6, "output": 2},
    ),
    ("openai-chat", "json", b"not json", {}),
    (
        "openai-chat",
        "sse",
        sse({"choices": [{"delta": {"content": "x" * 30000}}]}) * 3
        + sse({"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 40}}, done=True),
        {"input": 50, "output": 40},
    ),
]


@pytest.mark.parametrize("name, fmt, body, expected", USAGE, ids=[f"{i}-{u[0]}-{u[1]}" for i, u in enumerate(USAGE)])
def test_usage_is_read_where_each_family_reports_it(name, fmt, body, expected):
    assert BY_NAME[name].usage(body, fmt) == expected


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/v1/chat/completions", "openai-chat"),
        ("/v1/completions", "openai-completions"),
        ("/chat/completions/x/completions", "openai-completions"),
        ("/v1/messages", "anthropic-messages"),
        ("/v1/threads/t1/messages", None),
        ("/v1/threads/t1/runs/r1/messages", None),
        ("/v1/threadsx/messages", "anthropic-messages"),
        ("/v1beta/models/g:generateContent", "gemini"),
        ("/v1beta/models/:generateContent", None),
        ("/api/chat/completions", "openai-chat"),
        ("/api/chat", "ollama"),
        ("chat/completions", "openai-completions"),
    ],
)
def test_the_most_specific_declared_shape_wins(path, expected):
    found = recognise("POST", path)
    assert (found.name if found else None) == expected


def test_recognition_does_not_depend_on_registry_order():
    shuffled = list(reversed(PROTOCOLS))
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/generate"):
        fits = {p.name: p.fit(path) for p in shuffled}
        assert max(fits, key=lambda name: fits[name]) == recognise("POST", path).name


def test_a_new_family_is_one_class_and_a_register_call(monkeypatch):
    class Cohere(Protocol):
        name = "cohere-chat"
        path_shapes = ("v2/chat",)
        required_fields = ("messages",)
        usage_fields = (("usage", "input_tokens", "output_tokens"),)
        prompt_fields = ("messages",)
        answer_headers = ("x-cohere-version",)
        own_credential_headers = frozenset({"x-cohere-key"})

        def is_terminal(self, event: Event) -> bool:
            return self.event_type(event) == "message-end"

    monkeypatch.setattr("ai_cache.protocols.PROTOCOLS", list(PROTOCOLS))
    monkeypatch.setattr("ai_cache.protocols.BY_NAME", dict(BY_NAME))
    register(Cohere())
    try:
        assert recognise("POST", "/v2/chat").name == "cohere-chat"
        assert "x-cohere-version" in answer_headers() and "x-cohere-key" in credential_headers()
        with pytest.raises(ValueError, match="registered already"):
            register(Cohere())
    finally:
        monkeypatch.undo()
        forget_families()
    assert recognise("POST", "/v2/chat") is None and "x-cohere-key" not in credential_headers()


def test_headers_each_family_declares_and_their_union():
    assert answer_headers() == ("openai-beta", "anthropic-version", "anthropic-beta")
    assert credential_headers() == frozenset(
        {"authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "proxy-authorization"}
    )
    for protocol in PROTOCOLS:
        assert BASE_CREDENTIAL_HEADERS <= protocol.credential_headers
    assert "x-api-key" in AnthropicMessages().credential_headers
    assert "x-goog-api-key" in BY_NAME["gemini"].credential_headers
    assert "api-key" in BY_NAME["openai-chat"].credential_headers


def test_the_base_is_abstract():
    with pytest.raises(TypeError):
        Protocol()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "name, body, expected",
    [
        (
            "openai-chat",
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "user", "content": [{"type": "text", "text": "d"}]},
                ]
            },
            "c\nd",
        ),
        (
            "anthropic-messages",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}]},
            "q",
        ),
        ("openai-completions", {"prompt": ["one", "two"]}, None),
        ("openai-embeddings", {"input": "embed me"}, None),
        ("openai-responses", {"input": "plain"}, "plain"),
        (
            "openai-responses",
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "r"}]},
                    {"type": "function_call_output", "output": "{}"},
                ]
            },
            None,
        ),
        ("openai-responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "r"}]}]}, "r"),
        (
            "gemini",
            {
                "contents": [
                    {"parts": [{"text": "g1"}]},
                    {"role": "model", "parts": [{"text": "m"}]},
                    {"role": "user", "parts": [{"text": "g2"}]},
                ]
            },
            "g2",
        ),
        ("ollama", {"messages": [{"role": "user", "content": "o"}]}, "o"),
        ("ollama", {"prompt": "gen"}, "gen"),
        ("openai-chat", {"messages": "not a list"}, None),
    ],
)
def test_the_question_is_the_last_user_turns(name, body, expected):
    """What a semantic lookup compares; None where the family or request allows none."""
    found = BY_NAME[name].question(body, count=10)
    assert (found.text if isinstance(found, Question) else None) == expected


def test_stream_framing_and_terminal_events():
    assert {p.name: p.stream_format for p in PROTOCOLS if p.stream_format != "sse"} == {"ollama": "ndjson"}
    assert BY_NAME["openai-chat"].is_terminal(Event("message", "[DONE]"))
    assert BY_NAME["anthropic-messages"].is_terminal(Event("message_stop", "{}"))
    assert BY_NAME["openai-responses"].is_error(Event("response.failed", "{}"))
    assert BY_NAME["ollama"].is_terminal(Event("message", '{"done": true}'))
    assert not BY_NAME["gemini"].terminal_proves_end


STREAMED = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "tell a tale"}], "stream": True}),
    ("/v1/completions", {"model": "m", "prompt": "tell a tale", "stream": True}),
    ("/v1/responses", {"model": "m", "input": "tell a tale", "stream": True}),
    (
        "/v1/messages",
        {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "tell a tale"}], "stream": True},
    ),
    ("/v1beta/models/g:streamGenerateContent", {"contents": [{"role": "user", "parts": [{"text": "tell a tale"}]}]}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "tell a tale"}]}),
    ("/api/generate", {"model": "m", "prompt": "tell a tale"}),
]


@pytest.mark.parametrize("path, body", STREAMED, ids=[path.rsplit("/", 1)[-1] for path, _ in STREAMED])
def test_a_stream_assembles_to_its_answer_text(path, body):
    """The text a fixture file shows beside a stream's frames (the fake provider echoes)."""
    recorded = RecordedRequest("POST", path, "alt=sse", {}, json.dumps(body).encode())
    _, content_type, chunks = answer_chunks(recorded, 1, frozenset())
    protocol = recognise("POST", path)
    fmt = "ndjson" if "ndjson" in content_type else "sse"
    assert protocol.stream_text(b"".join(chunks), fmt) == "echo: tell a tale"
