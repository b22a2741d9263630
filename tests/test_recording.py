"""Recording: a finished answer becomes an entry or a reason, checked before the store."""

from __future__ import annotations

import json
import logging

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from ai_cache.capture import StreamCapture
from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.flights import SingleFlight
from ai_cache.protocols import BY_NAME
from ai_cache.recording import NotStorable, Recorder, finisher, new_capture, recorded_entry
from ai_cache.report import Tally
from ai_cache.state import FlowState, Status
from ai_cache.tiers import TieredCache

ANSWER = json.dumps(
    {"id": "c1", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
).encode()
REQUEST = {
    "host": "api.openai.com",
    "path": "/v1/chat/completions",
    "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}


async def NO_LOOKUP() -> None:
    raise AssertionError("no fleet: nothing to look up")


def recording(key: str = "ab" * 32) -> FlowState:
    return FlowState("openai-chat", status=Status.MISS, key=key, model="m", stream=False, request=dict(REQUEST))


def json_response(body: bytes = ANSWER, status: int = 200) -> http.Response:
    return http.Response.make(status, body, {"content-type": "application/json"})


def test_a_complete_json_answer_becomes_an_entry():
    state = recording()
    recorded = recorded_entry(json_response(), state, 10**6)
    assert not isinstance(recorded, str)
    entry, capture = recorded
    assert (entry.key, entry.format, entry.body) == (state.key, "json", ANSWER)
    assert entry.meta["protocol"] == "openai-chat" and state.format == "json"


@pytest.mark.parametrize(
    "response,ended_by,why",
    [
        (None, "", "no response"),
        (None, "Client disconnected.", "Client disconnected."),
        (json_response(status=500), "", "upstream answered 500"),
        (json_response(), "Client disconnected.", "Client disconnected."),  # a JSON body proves nothing
    ],
)
def test_answers_that_are_not_stored_say_why(response, ended_by, why):
    assert recorded_entry(response, recording(), 10**6, ended_by) == why


def test_a_stream_judged_by_its_capture_survives_a_broken_end():
    response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    state = recording()
    capture = new_capture(state, response, 10**6)
    assert isinstance(capture, StreamCapture) and capture.format == "sse"
    capture(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    response.stream = capture
    recorded = recorded_entry(response, state, 10**6, "Client disconnected.")
    assert not isinstance(recorded, str) and recorded[0].format == "sse"
    incomplete = StreamCapture(BY_NAME["openai-chat"], "sse", 10**6)
    incomplete(b'data: {"choices": []}\n\n')
    response.stream = incomplete
    assert isinstance(recorded_entry(response, state, 10**6), str)


def test_the_finisher_summarises_and_bounds_the_entry():
    capture = StreamCapture(BY_NAME["openai-chat"], "json", 10**6)
    capture(ANSWER)
    entry = Entry("k", "json", ANSWER, [], meta={"request": dict(REQUEST)})
    finisher(capture, 10**6)(entry)
    assert entry.meta["usage"] and entry.meta["preview"]
    too_small = Entry("k", "json", ANSWER, [], meta={"request": dict(REQUEST)})
    with pytest.raises(NotStorable, match="too large"):
        finisher(capture, 10)(too_small)


async def test_conclude_stores_then_logs_and_releases_the_leader(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = TieredCache([DiskStore(tmp_path / "cache")])
    flights, tally = SingleFlight(), Tally()
    state = recording()
    await flights.lead(state, 5, NO_LOOKUP)
    flow = tflow.tflow(resp=json_response())
    Recorder(flights, tally).conclude(flow, state, cache, 10**6)
    await cache.drain()
    follower = recording()
    await flights.lead(follower, 5, NO_LOOKUP)
    assert follower.leader is True  # the first one landed
    assert (await cache.lookup(state.key)) is not None and tally.stored == {"json": 1}
    assert any(r.getMessage().endswith(": stored") for r in caplog.records)
    await cache.close()


async def test_conclude_counts_what_it_does_not_store(tmp_path):
    cache = TieredCache([DiskStore(tmp_path / "cache")])
    tally = Tally()
    Recorder(SingleFlight(), tally).conclude(tflow.tflow(resp=json_response(status=429)), recording(), cache, 10**6)
    await cache.drain()
    assert tally.not_stored == {"upstream answered 429": 1} and list(cache.disk.keys_sync()) == []
    await cache.close()
