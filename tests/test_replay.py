"""PacedReplay: redirect to the in-proxy server, stream, restore, forget."""

from __future__ import annotations

import asyncio

from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow

from ai_cache.addon import AICache
from ai_cache.entry import Entry
from ai_cache.replay import TOKEN_HEADER, PacedReplay
from ai_cache.state import FlowState, Status, attach

CHUNKS = [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
ENTRY = Entry(
    "k",
    "sse",
    b"".join(CHUNKS),
    [("content-type", "text/event-stream")],
    chunks=[(0.0, len(CHUNKS[0])), (0.01, len(CHUNKS[1]))],
)


async def fetch(port: int, token: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET / HTTP/1.1\r\n{TOKEN_HEADER}: {token}\r\ncontent-length: 0\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def paced_flow(pacer: PacedReplay) -> tuple:
    flow = tflow.tflow()
    state = FlowState("openai-chat", status=Status.HIT, key="k")
    attach(flow, state)
    url = flow.request.url
    await pacer.pace(flow, state, ENTRY, [("x-ai-cache-status", "HIT")], 1.0)
    return flow, state, url


def test_only_streams_of_several_chunks_are_paced():
    assert PacedReplay.wanted(ENTRY, 1.0)
    assert not PacedReplay.wanted(ENTRY, 0)
    assert not PacedReplay.wanted(Entry("k", "json", b"{}", [], chunks=[(0, 1), (1, 1)]), 1.0)


async def test_a_paced_hit_is_redirected_streamed_and_restored():
    pacer = PacedReplay()
    with taddons.context(pacer):
        flow, state, url = await paced_flow(pacer)
        assert (flow.request.host, flow.request.port) == ("127.0.0.1", pacer.server.port)
        assert flow.request.headers[TOKEN_HEADER] == state.token
        answer = await fetch(pacer.server.port, state.token)
        assert answer.startswith(b"HTTP/1.1 200") and b"x-ai-cache-status: HIT" in answer
        assert answer.endswith(ENTRY.body)
        flow.response = tflow.tresp()
        pacer.responseheaders(flow, state)
        assert flow.response.stream is True
        pacer.response(flow, state)
        assert flow.request.url == url and TOKEN_HEADER not in flow.request.headers
        assert state.original_url is None and "original_url" not in flow.metadata["ai_cache"]
        await pacer.done()


async def test_a_failed_paced_flow_forgets_its_token():
    pacer = PacedReplay()
    with taddons.context(pacer):
        flow, state, _ = await paced_flow(pacer)
        flow.error = Error("Client disconnected.")
        pacer.error(flow, state)
        assert (await fetch(pacer.server.port, state.token)).startswith(b"HTTP/1.1 404")
        await pacer.done()


async def test_flows_without_a_token_are_left_alone(tmp_path):
    cache = AICache()
    with taddons.context(cache) as tctx:
        tctx.configure(cache, ai_cache_dir=str(tmp_path))
        flow = tflow.tflow(resp=True)
        attach(flow, FlowState("openai-chat", status=Status.HIT))
        cache.responseheaders(flow)
        cache.response(flow)
        assert not flow.response.stream and flow.request.url == tflow.tflow().request.url
        await cache.done()
