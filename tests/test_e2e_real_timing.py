"""End to end with real-world timing: servers end the body after the terminal event, SDKs
close the response as soon as they have read it. The capture decides, not the connection."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai

from conftest import Proxy
from fake_upstream import FakeUpstream

LATE = {"x-fake-scenario": "late-end-200"}


def sdk(proxy: Proxy, upstream: FakeUpstream, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        base_url=upstream.url + "/v1",
        max_retries=0,
        default_headers=headers,
        http_client=openai.DefaultHttpxClient(proxy=proxy.url),
    )


def streamed(client: openai.OpenAI, marker: str) -> tuple[str, str, str]:
    """(status, id, text) of one `create(stream=True)` iterated the way users do."""
    response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": f"late {marker}"}]
    )
    chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return response.headers["x-ai-cache-status"], chunks[0].id, text


def test_sdk_stream_is_stored_when_the_body_ends_after_done(shared_proxy, upstream, marker):
    client = sdk(shared_proxy, upstream, **LATE)
    status, first_id, text = streamed(client, marker)
    assert (status, text) == ("MISS", f"echo: late {marker}")
    hit = wait_for_hit(client, marker)
    assert hit == ("HIT", first_id, text)
    assert upstream.count(marker) == 1
    assert "0 B" not in shared_proxy.logs()


def wait_for_hit(client: openai.OpenAI, marker: str) -> tuple[str, str, str]:
    """The write is in the background: poll with only-if-cached until it is visible."""
    for _ in range(100):
        try:
            return streamed(client.with_options(default_headers={"cache-control": "only-if-cached"}), marker)
        except openai.APIStatusError as e:
            assert e.status_code == 504
            time.sleep(0.05)
    raise AssertionError("the stream was never stored")


def test_parallel_sdk_streams_make_one_upstream_call(shared_proxy, upstream, marker):
    client = sdk(shared_proxy, upstream, **LATE)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: streamed(client, marker), range(4)))
    assert upstream.count(marker) == 1
    assert len({(i, t) for _, i, t in results}) == 1
    assert sorted(s for s, _, _ in results) == ["HIT", "HIT", "HIT", "MISS"]
