"""nearest.py: which recording is closest to a request that missed, and where they part."""

from __future__ import annotations

import threading

import pytest

from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.keys import KeyPolicy
from ai_cache.nearest import compare, differences, explain_miss, find_nearest

HOST, PATH = "api.openai.com", "/v1/chat/completions"


def described(body: dict, host: str = HOST, path: str = PATH, **headers: str) -> dict:
    return {
        "method": "POST",
        "scheme": "https",
        "host": host,
        "path": path,
        "query": [],
        "headers": headers,
        "body": body,
    }


def chat(*contents: str, model: str = "gpt-4o", **extra) -> dict:
    roles = ["system", "user", "assistant", "user"]
    return {"model": model, "messages": [{"role": roles[i % 4], "content": c} for i, c in enumerate(contents)], **extra}


def recording(key_digit: str, request: dict, created_at: float = 1_700_000_000.0, body: bytes = b"{}") -> Entry:
    return Entry(
        key_digit * 64,
        "json",
        body,
        [],
        created_at=created_at,
        meta={"model": request["body"].get("model", ""), "request": request},
    )


@pytest.fixture
def store(tmp_path):
    store = DiskStore(tmp_path / "cache")
    yield store
    store.close_sync()


def test_differences_name_json_paths_in_request_order():
    wanted = chat("be brief", "hello", temperature=0)
    recorded = chat("be brief", "hello there", temperature=0.5)
    assert list(differences(wanted, recorded)) == [("messages[1].content", 1), ("temperature", 1)]


def test_missing_and_extra_fields_count_their_leaves():
    assert list(differences(chat("a", "b", "c"), chat("a", "b"))) == [("messages[2]", 2)]
    assert list(differences({"model": "m"}, {"model": "m", "tools": [{"name": "x", "kind": "f"}]})) == [("tools", 2)]
    assert list(differences({"a": {"b.c": 1}}, {"a": {"b.c": 2}})) == [('a["b.c"]', 1)]


def test_json_types_stay_distinct_as_in_keys():
    assert list(differences({"n": 1}, {"n": True})) == [("n", 1)]
    assert list(differences({"n": 1}, {"n": 1.0})) == [("n", 1)]
    assert list(differences({"n": [], "o": {}}, {"n": [], "o": {}})) == []


def test_compare_reaches_query_and_headers_and_skips_ignored_fields():
    wanted = described(chat("a", user="alice"), **{"anthropic-version": "2023-06-01"})
    recorded = described(chat("a", user="bob"), **{"anthropic-version": "2024-01-01"})
    assert compare(wanted, recorded, KeyPolicy()) == ("user", 2)
    assert compare(wanted, recorded, KeyPolicy(ignore_fields=("user",))) == ("header anthropic-version", 1)
    wanted["query"], recorded["query"] = [("api-version", "1")], [["api-version", "2"]]
    assert compare(wanted, recorded, KeyPolicy(ignore_fields=("user",))) == ("query api-version", 2)
    recorded["headers"] = wanted["headers"]
    assert compare(wanted, recorded, KeyPolicy(ignore_fields=("user",))) == ("query api-version", 1)


def test_the_nearest_recording_of_the_same_call_is_found(store):
    request = described(chat("be brief", "what is 2+2?"))
    for entry in [
        recording("a", described(chat("be long", "what is 3+3?"))),  # two leaves differ
        recording("b", described(chat("be brief", "what is 2+3?"))),  # one leaf differs
        recording("c", described(chat("be brief", "what is 2+2?", model="gpt-4o-mini"))),  # other model
        recording("d", described(chat("be brief", "what is 2+2?"), host="other.example")),  # other host
        recording("e", described(chat("be brief", "what is 2+2?"), path="/v1/completions")),  # other path
    ]:
        assert store.put_sync(entry, None)
    nearest = find_nearest(store, request, "gpt-4o", KeyPolicy())
    assert (nearest.key, nearest.field, nearest.differences) == ("b" * 64, "messages[1].content", 1)
    # Without the host in the key, a recording made against another host counts.
    nearest = find_nearest(store, request, "gpt-4o", KeyPolicy(include_host=False))
    assert (nearest.key, nearest.field, nearest.differences) == ("d" * 64, "", 0)
    assert find_nearest(store, described(chat("x"), path="/v1/embeddings"), "gpt-4o", KeyPolicy()) is None


def test_ties_go_to_the_newest_recording(store):
    request = described(chat("q"))
    store.put_sync(recording("a", described(chat("p")), created_at=1000.0), None)
    store.put_sync(recording("b", described(chat("r")), created_at=2000.0), None)
    assert find_nearest(store, request, "gpt-4o", KeyPolicy()).key == "b" * 64


def test_the_search_is_bounded_and_reads_large_entries_by_their_header(store):
    big = b"x" * 200_000  # diskcache keeps values this large in files of their own
    for digit in "0123456789":
        store.put_sync(recording(digit, described(chat(f"prompt {digit}")), body=big), None)
    assert len(store.headers(4)) == 4
    assert find_nearest(store, described(chat("prompt 7")), "gpt-4o", KeyPolicy(), limit=4).key != "7" * 64
    assert find_nearest(store, described(chat("prompt 7")), "gpt-4o", KeyPolicy()).key == "7" * 64
    assert {head["key"] for head in store.headers(10)} == {d * 64 for d in "0123456789"}


async def test_explain_miss_reads_off_the_event_loop(store):
    store.put_sync(recording("a", described(chat("sys", "hello"))), None)
    readers: list[str] = []
    original = store.headers

    def spy(limit):
        readers.append(threading.current_thread().name)
        return original(limit)

    store.headers = spy
    explanation = await explain_miss(store, described(chat("sys", "hello!")), "gpt-4o", KeyPolicy())
    assert readers and readers[0] != threading.main_thread().name
    assert explanation.prompt == "hello!"
    assert explanation.as_json() == {
        "prompt": "hello!",
        "nearest": {"key": "a" * 64, "differs_at": "messages[1].content"},
    }
    assert "nearest recording aaaaaaaaaaaa (same model, host and path) differs at messages[1].content" in (
        explanation.sentence()
    )


async def test_explain_miss_without_a_store_or_a_candidate():
    explanation = await explain_miss(None, described(chat("hi")), "gpt-4o", KeyPolicy())
    assert explanation.nearest is None
    assert explanation.sentence() == "prompt 'hi'; no recording of the same model, host and path"
