"""End to end: what replay mode answers when it cannot, and how the TTL treats recordings.

Real mitmdump, the fake provider, the official openai SDK with its default retries, and
recordings made old the way a team's are: exported, committed (here: dated 9 days back)
and imported with the `ai-cache` command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from ai_cache.cli import main as ai_cache
from helpers import CHAT, post

SECRET = "sk-SECRET-replay-ux"


def conversation(marker: str, question: str) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": f"be brief {marker}"}, {"role": "user", "content": question}],
    }


def sdk(proxy, upstream) -> openai.OpenAI:
    """The official client as people use it: default retries (2)."""
    return openai.OpenAI(
        api_key=SECRET, base_url=upstream.url + "/v1", http_client=openai.DefaultHttpxClient(proxy=proxy.url)
    )


def test_replay_miss_is_answered_once_and_names_the_field_that_differs(start_proxy, upstream, marker):
    recorder = start_proxy()
    recorded = post(recorder, upstream, CHAT, conversation(marker, "what is 2+2?"))
    assert recorded.headers["x-ai-cache-status"] == "MISS"
    recorder.stop()

    replayer = start_proxy(ai_cache_dir=recorder.options["ai_cache_dir"], ai_cache_mode="replay")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(replayer, upstream).chat.completions.create(**conversation(marker, "what is 2+3?"))
    replayer.stop()

    assert raised.value.status_code == 504
    assert raised.value.response.headers["x-should-retry"] == "false"
    error = raised.value.body["error"] if "error" in raised.value.body else raised.value.body
    assert error["nearest"] == {"key": recorded.headers["x-ai-cache-key"], "differs_at": "messages[1].content"}
    assert error["prompt"] == "what is 2+3?"
    assert "differs at messages[1].content" in raised.value.message
    assert "no recording" in raised.value.message
    assert upstream.count(marker) == 1  # the recording; the replay miss never went upstream
    lines = [line for line in replayer.logs().splitlines() if "answered 504" in line]
    assert len(lines) == 1, lines  # one request reached the proxy: the SDK did not retry
    assert "no recording" in lines[0] and "'what is 2+3?'" in lines[0]
    assert f"nearest recording {recorded.headers['x-ai-cache-key'][:12]}" in lines[0]
    assert "differs at messages[1].content" in lines[0]
    assert SECRET not in replayer.logs() and SECRET not in json.dumps(error)


def test_a_request_unlike_any_recording_says_so(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_mode="replay")
    with proxy.client() as client:
        answer = client.post(
            upstream.url + CHAT, json=conversation(marker, "anything"), headers={"authorization": f"Bearer {SECRET}"}
        )
    assert answer.status_code == 504 and answer.headers["x-should-retry"] == "false"
    error = answer.json()["error"]
    assert error["nearest"] is None
    assert "no recording of the same model, host and path" in error["message"]
    proxy.stop()
    assert "no recording, answered 504 (ai_cache_mode=replay); prompt 'anything'" in proxy.logs()
    assert SECRET not in proxy.logs()


def aged_fixtures(recorder_dir: str, tmp_path: Path, days: float) -> str:
    """The cache's recordings exported, dated `days` back, and imported into a new cache."""
    exported, imported = tmp_path / "fixtures", str(tmp_path / "imported")
    assert ai_cache(["--dir", recorder_dir, "export", str(exported)]) == 0
    for path in exported.glob("*.json"):
        fixture = json.loads(path.read_text())
        fixture["created_at"] = time.time() - days * 86400
        path.write_text(json.dumps(fixture))
    assert ai_cache(["--dir", imported, "import", str(exported)]) == 0
    return imported


def test_replay_serves_recordings_past_the_ttl_and_record_mode_fetches_them_again(
    start_proxy, upstream, marker, tmp_path
):
    body = conversation(marker, "hello")
    recorder = start_proxy()
    first = post(recorder, upstream, CHAT, body)
    recorder.stop()
    old_cache = aged_fixtures(recorder.options["ai_cache_dir"], tmp_path, days=9)

    replayer = start_proxy(ai_cache_dir=old_cache, ai_cache_mode="replay", ai_cache_ttl="7d")
    replayed = post(replayer, upstream, CHAT, body)
    assert replayed.headers["x-ai-cache-status"] == "HIT" and replayed.content == first.content
    assert int(replayed.headers["x-ai-cache-age"]) >= 9 * 86400
    replayer.stop()

    proxy = start_proxy(ai_cache_dir=old_cache, ai_cache_ttl="7d")
    only_cached = post(proxy, upstream, CHAT, body, headers={"cache-control": "only-if-cached"})
    assert only_cached.status_code == 504
    assert "is expired (age 9d, ttl 7d)" in only_cached.json()["error"]["message"]
    fetched = post(proxy, upstream, CHAT, body)
    assert fetched.headers["x-ai-cache-status"] == "MISS"
    assert fetched.json()["id"] != first.json()["id"]
    assert upstream.count(marker) == 2
    proxy.stop()
    logs = proxy.logs()
    assert ": expired (age 9d, ttl 7d), fetched again; stored" in logs
    assert "recording expired (age 9d, ttl 7d), answered 504" in logs
    assert "no recording" not in logs
