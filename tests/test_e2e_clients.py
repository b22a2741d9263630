"""Conformance matrix: real Python clients through the real proxy, against a provider with
real-world timing. Every call must go MISS then HIT with identical parsed output (ids, text,
tool calls, usage) and reach the upstream once.

The upstreams end every body 150 ms after its last byte, as real servers do: plain HTTP/1.1
(through `HTTP_PROXY`), HTTPS (through `HTTPS_PROXY`, the client trusting mitmproxy's CA
from `SSL_CERT_FILE`), and HTTP/2 (hypercorn) whose END_STREAM comes in a later, empty DATA
frame. mitmproxy offers a server the protocols its client offered, so the HTTP/2 variant
runs the clients with HTTP/2 enabled; httpx then still prefers HTTP/1.1 towards the proxy,
and `H2Client` covers HTTP/2 on the client's side, with the RST_STREAM of an early close.

SDKs that stop reading at the terminal event (openai's chat streams and what is built on
them) must leave an entry whose log line says so: the real-timing path, not the happy path.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from conftest import Proxy
from fake_upstream import FakeUpstream, make_tls_cert
from h2_upstream import H2Upstream

# litellm fetches its model price map from the internet on import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

LATE = "late-end-150"
TOOL = {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
CALL = ("get_weather", {"city": "Paris"})
Output = dict[str, Any]


@dataclass(frozen=True)
class Env:
    """Where a client sends its calls, and whether it enables HTTP/2."""

    upstream: FakeUpstream
    http2: bool

    @property
    def url(self) -> str:
        return self.upstream.url


# ---------------------------------------------------------------- client adapters
# Each runs one call the way the SDK's users write it and returns what they would compare.


def openai_sdk(env: Env) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=env.url + "/v1", max_retries=0,
                         http_client=openai.DefaultHttpxClient(http2=env.http2))  # fmt: skip


def openai_chat(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    if tools:
        kwargs["tools"] = [{"type": "function", "function": TOOL}]
    with openai_sdk(env) as client:
        if not stream:
            r = client.chat.completions.create(**kwargs)
            message = r.choices[0].message
            calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
            return {"id": r.id, "text": message.content, "calls": calls, "usage": r.usage.to_dict()}
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    pieces = [t for d in deltas for t in d.tool_calls or []]  # of one call: the first has its id and name
    arguments = "".join(p.function.arguments or "" for p in pieces)
    calls = [(pieces[0].id, pieces[0].function.name, json.loads(arguments))] if pieces else []
    return {"id": chunks[0].id, "text": text or None, "calls": calls, "usage": chunks[-1].usage.to_dict()}


def openai_responses(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    kwargs: dict[str, Any] = {"model": "gpt-4o-mini", "input": prompt}
    if tools:
        kwargs["tools"] = [{"type": "function", **TOOL}]
    with openai_sdk(env) as client:
        if stream:
            with client.responses.stream(**kwargs) as events:
                r = events.get_final_response()
        else:
            r = client.responses.create(**kwargs)
    calls = [(o.call_id, o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
    return {"id": r.id, "text": r.output_text or None, "calls": calls, "usage": r.usage.to_dict()}


def openai_embeddings(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    with openai_sdk(env) as client:
        r = client.embeddings.create(model="text-embedding-3-small", input=[prompt, "second"])
    vectors = [d.embedding for d in r.data]
    return {"id": None, "text": None, "calls": [], "vectors": vectors, "usage": r.usage.to_dict()}


def anthropic_messages(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    kwargs: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100,
                              "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    if tools:
        kwargs["tools"] = [{"name": TOOL["name"], "description": TOOL["description"],
                            "input_schema": TOOL["parameters"]}]  # fmt: skip
    with anthropic.Anthropic(api_key="sk-ant-test", base_url=env.url, max_retries=0,
                             http_client=anthropic.DefaultHttpxClient(http2=env.http2)) as client:  # fmt: skip
        if stream:
            with client.messages.stream(**kwargs) as events:
                m = events.get_final_message()
        else:
            m = client.messages.create(**kwargs)
    text = "".join(b.text for b in m.content if b.type == "text")
    calls = [(b.id, b.name, b.input) for b in m.content if b.type == "tool_use"]
    return {"id": m.id, "text": text or None, "calls": calls, "usage": m.usage.to_dict()}


def gemini(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    from google import genai
    from google.genai import types

    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(**TOOL)])] if tools else None
    )
    options = types.HttpOptions(base_url=env.url, client_args={"http2": env.http2})
    with genai.Client(api_key="AIza-test", http_options=options) as client:
        call = client.models.generate_content_stream if stream else client.models.generate_content
        answer = call(model="gemini-2.5-flash", contents=prompt, config=config)
        parts = list(answer) if stream else [answer]
    text = "".join(p.text or "" for p in parts)
    calls = [(c.id, c.name, c.args) for p in parts for c in p.function_calls or []]
    return {"id": parts[0].response_id, "text": text or None, "calls": calls,
            "usage": parts[-1].usage_metadata.model_dump(exclude_none=True)}  # fmt: skip


def ollama_chat(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    import ollama

    kwargs: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": prompt}]}
    if tools:
        kwargs["tools"] = [{"type": "function", "function": TOOL}]
    with ollama.Client(host=env.url, http2=env.http2) as client:
        parts = list(client.chat(stream=True, **kwargs)) if stream else [client.chat(**kwargs)]
    text = "".join(p.message.content or "" for p in parts)
    calls = [(None, c.function.name, dict(c.function.arguments)) for p in parts for c in p.message.tool_calls or []]
    last = parts[-1]
    return {"id": None, "text": text or None, "calls": calls,  # Ollama answers carry no id
            "usage": (last.prompt_eval_count, last.eval_count, last.total_duration)}  # fmt: skip


def langchain_chat(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
    from langchain_openai import ChatOpenAI

    http_client = openai.DefaultHttpxClient(http2=True) if env.http2 else None
    llm: Any = ChatOpenAI(model="gpt-4o-mini", base_url=env.url + "/v1", api_key="sk-test", max_retries=0,
                          stream_usage=True, http_client=http_client)  # fmt: skip
    if tools:
        llm = llm.bind_tools([{"type": "function", "function": TOOL}])
    m = reduce(add, llm.stream(prompt)) if stream else llm.invoke(prompt)
    calls = [(c["id"], c["name"], c["args"]) for c in m.tool_calls]
    # A streamed message carries LangChain's run id, not the provider's.
    return {"id": m.response_metadata.get("id"), "text": m.content or None, "calls": calls,
            "usage": dict(m.usage_metadata)}  # fmt: skip


def litellm_completion(provider: str) -> Callable[[Env, str, bool, bool], Output]:
    def run(env: Env, prompt: str, tools: bool, stream: bool) -> Output:
        import litellm
        from litellm.llms.custom_httpx.http_handler import HTTPHandler

        # litellm keeps its HTTP clients for the whole process, with the proxy variables, CA
        # and HTTP/2 setting of their first call; here each variant changes them.
        litellm.http2 = env.http2
        litellm.in_memory_llm_clients_cache.flush_cache()
        litellm.module_level_client = HTTPHandler()  # Anthropic streams use this one
        model, base = {"openai": ("openai/gpt-4o-mini", env.url + "/v1"),
                       "anthropic": ("anthropic/claude-sonnet-4-5", env.url)}[provider]  # fmt: skip
        kwargs: dict[str, Any] = {"model": model, "api_base": base, "api_key": "sk-test", "max_retries": 0,
                                  "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        if tools:
            kwargs["tools"] = [{"type": "function", "function": TOOL}]
        if stream:
            chunks = list(litellm.completion(stream=True, stream_options={"include_usage": True}, **kwargs))
            r = litellm.stream_chunk_builder(chunks, messages=kwargs["messages"])
        else:
            r = litellm.completion(**kwargs)
        message = r.choices[0].message
        calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        usage = r.usage
        # litellm names Anthropic answers with ids of its own making.
        return {"id": r.id if provider == "openai" else None, "text": message.content or None, "calls": calls,
                "usage": (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)}  # fmt: skip

    return run


Adapter = Callable[[Env, str, bool, bool], Output]  # (env, prompt, tools, stream) -> output
# name, adapter, whether the API has streams and tools, whether the SDK stops reading a
# stream at its terminal event and closes the response (checked against the proxy's log)
ADAPTERS: tuple[tuple[str, Adapter, bool, bool], ...] = (
    ("openai-chat", openai_chat, True, True),
    ("openai-responses", openai_responses, True, False),
    ("openai-embeddings", openai_embeddings, False, False),
    ("anthropic", anthropic_messages, True, False),
    ("gemini", gemini, True, False),
    ("ollama", ollama_chat, True, False),
    ("langchain", langchain_chat, True, True),
    ("litellm-openai", litellm_completion("openai"), True, True),
    ("litellm-anthropic", litellm_completion("anthropic"), True, True),
)


@dataclass(frozen=True)
class Client:
    """One call of the matrix: an adapter, streaming or not, with a tool or not."""

    name: str
    adapter: Adapter
    stream: bool
    tools: bool
    closes_early: bool  # with a late end the proxy sees the client leave after a complete stream

    def run(self, env: Env, prompt: str) -> Output:
        return self.adapter(env, prompt, self.tools, self.stream)


def matrix() -> list[Client]:
    return [
        Client(f"{name}-{'stream' if stream else 'json'}{'-tool' if tools else ''}", adapter, stream, tools,
               early and stream)
        for name, adapter, full, early in ADAPTERS
        for stream in (False, True)[: 1 + full]
        for tools in (False, True)[: 1 + full]
    ]  # fmt: skip


# ---------------------------------------------------------------- upstreams and the proxy


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory) -> tuple[str, str]:
    return make_tls_cert(str(tmp_path_factory.mktemp("upstream-tls")))


@pytest.fixture(scope="module")
def upstreams(tls_cert) -> Iterator[dict[str, FakeUpstream]]:
    servers = {"http": FakeUpstream(scenarios=LATE), "https": FakeUpstream(tls=tls_cert, scenarios=LATE),
               "h2": H2Upstream(tls_cert, scenarios=LATE)}  # fmt: skip
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, confdir, tls_cert) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("clients-proxy")
    options = {"ai_cache_dir": str(workdir / "cache"), "ssl_verify_upstream_trusted_ca": tls_cert[0]}
    proxy = Proxy(workdir, confdir, options, []).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def warm_clients() -> Iterator[None]:
    """One direct call per client first: a first call pays lazy imports and model builds
    (openai's takes ~0.5 s), which would let the late end arrive before the SDK read the
    terminal event, and the early close under test would not happen."""
    with pytest.MonkeyPatch.context() as env, FakeUpstream() as direct:
        for name in PROXY_VARIABLES:
            env.delenv(name, raising=False)
        for case in matrix():
            if case.stream and not case.tools:
                case.run(Env(direct, http2=False), "warm up")
    yield


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")  # fmt: skip


@pytest.fixture(params=["http", "https", "h2"])
def env(request, upstreams, proxy, confdir, monkeypatch) -> Iterator[Env]:
    """The client's environment, as `with-ai-cache` sets it: proxy variables and the CA."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(Path(confdir) / "mitmproxy-ca-cert.pem"))
    yield Env(upstreams[request.param], http2=request.param == "h2")


# ---------------------------------------------------------------- the matrix


def ai_cache_lines(proxy: Proxy, start: int, count: int) -> list[str]:
    """The addon's log lines after offset `start`; a MISS line is written when the flow
    ended and its write finished, which may be just after the client returned."""
    deadline = time.monotonic() + 10
    while True:
        lines = re.findall(r"ai-cache: (?:MISS|HIT|BYPASS|REFRESH) .*", proxy.logs()[start:])
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.mark.usefixtures("warm_clients")
@pytest.mark.parametrize("client", matrix(), ids=lambda c: c.name)
def test_miss_then_hit(client: Client, env: Env, proxy: Proxy, marker: str):
    start = len(proxy.logs())
    prompt = f"What is the weather in Paris? {marker}"
    first = client.run(env, prompt)
    second = client.run(env, prompt)

    # The MISS line comes once its write finished, which may be after the HIT it served.
    lines = sorted(ai_cache_lines(proxy, start, 2), key=lambda line: line.startswith("ai-cache: HIT"))
    assert len(lines) == 2 and lines[1].startswith("ai-cache: HIT l1"), lines
    early = " (complete; then Client disconnected)" if client.closes_early else ""  # it left before the end
    assert lines[0].startswith("ai-cache: MISS") and lines[0].endswith(f": stored{early}"), lines[0]
    received = [r for r in env.upstream.requests if r.contains(marker)]
    assert [r.http_version for r in received] == ["HTTP/2" if env.http2 else "HTTP/1.1"]
    assert first == second
    if client.tools:
        assert [call[1:] for call in first["calls"]] == [CALL]
    elif first["text"] is not None:
        assert first["text"] == f"echo: {prompt}"


# ---------------------------------------------------------------- HTTP/2 from the client


class H2Client:
    """An HTTP/2 client as curl, browsers or an HTTP/2 SDK are (httpx offers http/1.1 first,
    so mitmproxy speaks HTTP/1.1 to it): CONNECT through the proxy, TLS with ALPN h2, one
    connection for all streams, and a stream cancelled (RST_STREAM CANCEL) once its terminal
    event was read, which is how an HTTP/2 client closes a response early."""

    def __init__(self, proxy: Proxy, upstream: FakeUpstream, cafile: str) -> None:
        import h2.config
        import h2.connection

        self.authority = f"localhost:{upstream.port}"
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=cafile)
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def post_until(self, path: str, body: dict[str, Any], terminal: bytes) -> tuple[dict[str, str], bytes, bool]:
        """(headers, body, whether END_STREAM came): reads until `terminal`, then cancels."""
        import h2.errors
        import h2.events

        sid = self.conn.get_next_available_stream_id()
        payload = json.dumps(body).encode()
        self.conn.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "https"),
                                     (":authority", self.authority), ("content-type", "application/json"),
                                     ("authorization", "Bearer sk-test")])  # fmt: skip
        self.conn.send_data(sid, payload, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        headers: dict[str, str] = {}
        data, ended = b"", False
        while not ended and terminal not in data:
            for event in self.conn.receive_data(self.sock.recv(65536)):
                if getattr(event, "stream_id", None) != sid:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            self.sock.sendall(self.conn.data_to_send())
        if not ended:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self.sock.sendall(self.conn.data_to_send())
        return headers, data, ended

    def close(self) -> None:
        self.conn.close_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.sock.close()


def test_http2_client_cancels_the_stream_after_done(proxy, upstreams, confdir, marker):
    """HTTP/2 on both legs; the client resets the stream after `[DONE]`, before END_STREAM."""
    upstream = upstreams["h2"]
    client = H2Client(proxy, upstream, str(Path(confdir) / "mitmproxy-ca-cert.pem"))
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": f"h2 {marker}"}]}
    try:
        start = len(proxy.logs())
        miss = client.post_until("/v1/chat/completions", body, b"data: [DONE]\n\n")
        (line,) = ai_cache_lines(proxy, start, 1)
        hit = client.post_until("/v1/chat/completions", body, b"data: [DONE]\n\n")
    finally:
        client.close()
    assert (miss[0]["x-ai-cache-status"], miss[2]) == ("MISS", False)  # cancelled before END_STREAM
    assert line.endswith("stored (complete; then stream reset by client (CANCEL))"), line
    assert hit[0]["x-ai-cache-status"] == "HIT" and hit[1] == miss[1]
    assert [r.http_version for r in upstream.requests if r.contains(marker)] == ["HTTP/2"]
    assert "Lowercased" not in proxy.logs()[start:]  # HTTP/2 forbids upper-case header names
