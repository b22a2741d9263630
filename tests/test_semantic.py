"""The semantic layer's parts: protocol questions, partitions, the lexical guard, the
vector indexes, RediSearch answers and the embeddings client (against the fake server)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from ai_cache.addon import AICache
from ai_cache.keys import KeyPolicy, cacheable_request, header_map, partition_key, path_of
from ai_cache.launch import free_port
from ai_cache.protocols import BY_NAME, QUESTION_PLACEHOLDER, Question, recognise
from ai_cache.report import flow_line
from ai_cache.responses import cache_headers
from ai_cache.semantic import vectors
from ai_cache.semantic.embedder import Embedder, EmbedError, HTTPEndpoint, unit_vector
from ai_cache.semantic.guard import difference
from ai_cache.semantic.vectors import LocalVectors, Partition, candidates
from ai_cache.state import FlowState, Status
from fake_embedder import FakeEmbedder
from helpers import chat_flow

IDENTITY = ["http://e/v1/embeddings", "m", 16]
PLAIN = KeyPolicy()


def question(family: str, body: dict, count: int = 1) -> Question | str:
    return BY_NAME[family].question(body, count)


def user(text) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    ("family", "body", "text"),
    [
        (
            "openai-chat",
            {"messages": [{"role": "system", "content": "be brief"}, user("why is it so")]},
            "why is it so",
        ),
        (
            "openai-chat",
            {"messages": [user([{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}])]},
            "a b c",
        ),
        (
            "anthropic-messages",
            {"system": "x", "messages": [user("tell me more"), {"role": "assistant", "content": "{"}]},
            "tell me more",
        ),
        ("openai-responses", {"input": "say it twice"}, "say it twice"),
        (
            "openai-responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi you"}]}]},
            "hi you",
        ),
        ("gemini", {"contents": [{"parts": [{"text": "no role here"}]}]}, "no role here"),
        ("ollama", {"model": "l", "messages": [user("what now then")]}, "what now then"),
        ("ollama", {"model": "l", "prompt": "complete this please"}, "complete this please"),
    ],
)
def test_the_question_is_the_last_user_turn_and_the_rest_keeps_everything_else(family, body, text):
    found = question(family, body)
    assert isinstance(found, Question) and found.text == text
    rest = json.dumps(found.rest)
    assert json.dumps(QUESTION_PLACEHOLDER)[1:-1] in rest and text not in rest
    assert {k: v for k, v in found.rest.items() if k not in ("messages", "input", "contents", "prompt")} == {
        k: v for k, v in body.items() if k not in ("messages", "input", "contents", "prompt")
    }


def test_several_trailing_user_turns_when_asked_for():
    body = {"messages": [user("first part"), user("second part")]}
    assert question("openai-chat", body).text == "second part"
    assert question("openai-chat", body, 2).text == "first part\nsecond part"


@pytest.mark.parametrize(
    ("family", "body"),
    [
        (
            "openai-chat",
            {
                "messages": [
                    user("x y"),
                    {"role": "assistant", "tool_calls": [{"id": "1"}]},
                    {"role": "tool", "content": "r"},
                ]
            },
        ),
        (
            "openai-chat",
            {
                "messages": [
                    user([{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "what"}])
                ]
            },
        ),
        ("openai-chat", {"n": 2, "messages": [user("two answers please")]}),
        ("openai-chat", {"messages": []}),
        ("anthropic-messages", {"messages": [user([{"type": "tool_result", "tool_use_id": "t", "content": "r"}])]}),
        ("openai-responses", {"previous_response_id": "resp_1", "input": "and then?"}),
        ("openai-responses", {"conversation": "conv_1", "input": "and then what?"}),
        ("openai-responses", {"conversation": {"id": "conv_1"}, "input": "and then what?"}),
        ("openai-responses", {"input": [{"type": "function_call_output", "call_id": "c", "output": "r"}]}),
        ("gemini", {"contents": [{"parts": [{"functionResponse": {"name": "f"}}]}]}),
        ("gemini", {"generationConfig": {"candidateCount": 3}, "contents": [{"parts": [{"text": "hi there"}]}]}),
        ("ollama", {"messages": [{"role": "user", "content": "see this", "images": ["aGk="]}]}),
        ("ollama", {"prompt": "see this", "images": ["aGk="]}),
        ("openai-embeddings", {"input": "embed me"}),
        ("openai-completions", {"prompt": "complete me"}),
    ],
)
def test_no_question_with_tools_media_several_answers_or_foreign_history(family, body):
    assert isinstance(question(family, body), str)


@pytest.mark.parametrize(
    ("family", "answer", "calls"),
    [
        ("openai-chat", b'{"choices":[{"message":{"tool_calls":[{"id":"c"}]}}]}', True),
        ("openai-chat", b'{"choices":[{"message":{"content":"hi"}}]}', False),
        ("anthropic-messages", b'data: {"content_block":{"type":"tool_use"}}', True),
        ("anthropic-messages", b'{"content":[{"type":"mcp_tool_use"}],"stop_reason":"end_turn"}', True),
        ("gemini", b'{"candidates":[{"content":{"parts":[{"functionCall":{}}]}}]}', True),
        ("openai-responses", b'{"output":[{"type":"function_call"}],"parallel_tool_calls":true}', True),
        ("openai-responses", b'{"output":[{"type":"message"}],"parallel_tool_calls":true}', False),
    ],
)
def test_answers_that_call_tools_are_recognised(family, answer, calls):
    assert BY_NAME[family].calls_tools(answer) is calls


def partition(body: dict, path: str = "/v1/chat/completions", policy: KeyPolicy = PLAIN, **headers) -> str:
    flow = chat_flow(body, path, **headers)
    protocol = recognise("POST", path_of(flow.request))
    assert protocol is not None
    found = cacheable_request(flow.request, header_map(flow.request), protocol, policy)
    assert found is not None
    asked = protocol.question(found.body)
    assert isinstance(asked, Question)
    return partition_key(found, asked.rest, policy, IDENTITY)


def test_a_partition_holds_requests_that_differ_only_in_the_question():
    base = {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "system", "content": "s"}, user("one way")]}
    same = partition(base)
    assert partition({**base, "messages": [{"role": "system", "content": "s"}, user("another way")]}) == same
    for other in (
        {**base, "model": "gpt-4o-mini"},
        {**base, "temperature": 0.5},
        {**base, "stream": True},
        {**base, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {**base, "response_format": {"type": "json_object"}},
        {**base, "messages": [{"role": "system", "content": "t"}, user("one way")]},
        {**base, "messages": [user("earlier"), {"role": "assistant", "content": "a"}, user("one way")]},
    ):
        assert partition(other) != same, other
    assert partition(base, openai_beta="assistants=v2") != same
    scoped = KeyPolicy(scope_headers=("x-tenant",))
    assert partition(base, policy=scoped, x_tenant="a") != partition(base, policy=scoped, x_tenant="b")


@pytest.mark.parametrize(
    ("asked", "stored", "refused"),
    [
        ("How do I reverse a list in Python?", "What's the way to reverse a Python list?", False),
        ("turn on dark mode", "turn off dark mode", True),
        ("enable the cache", "disable the cache", True),
        ("what is 2+2", "what is 2+3", True),
        ("what is two plus two", "what is 2 + 2", False),
        ("sum 1,000 and 5", "sum 1000 and 5", False),
        ("I can't log in", "I can log in", True),
        ("Is it safe?", "Is it not safe?", True),
        ('rename "foo" to bar', 'rename "food" to bar', True),
        ("run `ls -la` for me", "run `ls -l` for me", True),
        ("it's John's car", "it is John's car", False),
        ("show the max value", "show the min value", True),
    ],
)
def test_the_lexical_guard(asked, stored, refused):
    assert bool(difference(asked, stored)) is refused


@pytest.mark.parametrize(
    ("asked", "stored", "refused"),
    [
        # Numbers in another order, written otherwise, or signed.
        ("What is 10 divided by 2?", "What is 2 divided by 10?", True),
        ("Is 1/2/2020 a Monday?", "Is 2/1/2020 a Monday?", True),
        ("What's new in Python 3.10?", "What's new in Python 3.1?", True),
        ("Is -3 greater than 2?", "Is 3 greater than 2?", True),
        ("what is 10% of 50", "what is 10 percent of 50", False),
        ("what is 2+2", "what is two plus two", False),
        # Arithmetic between the same numbers.
        ("what is 2+2 exactly", "what is 2*2 exactly", True),
        ("what is 7 plus 3", "what is 7 minus 3", True),
        ("what does x = y - 1 do", "what does x = y + 1 do", True),
        # Names: another one, or the same ones the other way round.
        ("Tell me the population of Paris in detail", "Tell me the population of London in detail", True),
        ("What happened on March 3, 2020?", "What happened on May 3, 2020?", True),
        ("Convert 100 Fahrenheit to Celsius", "Convert 100 Celsius to Fahrenheit", True),
        ("Translate hello from English to French", "Translate hello from French to English", True),
        ("write a parser in Python please", "write a parser in JavaScript please", True),
        ("Paris: what is the weather like this week?", "London: what is the weather like this week?", True),
        ("Kubernetes or Nomad for a small team?", "Nomad or Kubernetes for a small team?", True),
        ("Django vs Flask for a blog?", "Rails vs Flask for a blog?", True),
        ("Paris weather this week?", "What is the weather in Paris this week?", False),
        ("Explain how DNS works, briefly", "Describe how DNS works, briefly", False),
        ("Recursion: explain it simply", "Explain recursion simply", False),
        ("What is the capital of France?", "Tell me France's capital", False),
        ("What is the capital of France?", "what's the capital of france", False),
        ("How do I reverse a list in Python quickly?", "What is the fastest way to reverse a Python list?", False),
        # Code outside quotes: dotted names, snake_case, calls, file and host names.
        ("what does os.path.join do", "what does os.path.split do", True),
        ("how to parse config.yaml in a script", "how to parse config.json in a script", True),
        ("what does my_func return here", "what does my_fun return here", True),
        ("explain print() in detail", "explain input() in detail", True),
        ("How do I use os.path.join?", "What is the way to use os.path.join", False),
        ("give an example, e.g. a list", "show an example, e.g. a list", False),
        # Dates and units, however cased.
        ("what is the weather like today in town", "what is the weather like tomorrow in town", True),
        ("which holidays fall on a monday", "which holidays fall on a friday", True),
        ("how many km are 5 miles", "how many miles are 5 km", True),
        ("convert 3 pounds to kg", "convert 3 kg to pounds", True),
        ("how many days are in 3 weeks", "how many weeks are in 3 days", True),
        ("how many kilometers are 5 miles", "how many km are 5 mi", False),
        ("what is the weather like today in town", "how is the weather today in town", False),
        # The same words, the other way round around to/into/than/from/vs.
        ("How do I convert a list to a dict in Python?", "How do I convert a dict to a list in Python?", True),
        ("is a list faster than a tuple", "is a tuple faster than a list", True),
        ("how to reverse a list", "how can I reverse a list", False),
        ("how do I convert a list to a dict", "how do I turn a list into a dict", False),
        # Antonyms: refused when each side has one of a pair, not when one side has none.
        ("what is the best programming language", "what is the worst programming language", True),
        ("what are the pros of remote work", "what are the cons of remote work", True),
        ("how to switch the editor to light mode", "how to switch the editor to dark mode", True),
        ("how to read a file in rust", "how to write a file in rust", True),
        ("What's the best way to learn Rust?", "How should I learn Rust?", False),
        ("what are the advantages of remote work", "what are the benefits of remote work", False),
        ("I am unable to log in", "I am able to log in", True),
        ("how do I avoid a merge conflict", "how do I get a merge conflict", True),
        # Negation in other languages, and opposite words made with a prefix.
        ("ich kann mich nicht einloggen", "ich kann mich einloggen", True),
        ("je ne peux pas me connecter", "je peux me connecter", True),
        ("não consigo entrar agora", "consigo entrar agora", True),
        ("how do I lock the screen", "how do I unlock the screen", True),
        ("how to install the package", "how to uninstall the package", True),
        ("how to encrypt a file with gpg", "how to decrypt a file with gpg", True),
        ("is this input valid", "is this input invalid", True),
        ("sort the list ascending", "sort the list descending", True),
        ("how do I connect the printer", "how can I connect the printer", False),
        ("Hello, I'm stuck: how do I exit Vim?", "Hello, I am stuck: how do I quit Vim?", False),
        ("In Python, how do I read a file?", "How do I read a file in Python?", False),
    ],
)
def test_the_lexical_guard_sees_order_arithmetic_names_and_other_negations(asked, stored, refused):
    assert bool(difference(asked, stored)) is refused
    assert bool(difference(stored, asked)) is refused


def unit(seed: int, dims: int = 8) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_a_partition_searches_exactly_and_removes_by_moving_the_last_row():
    part = Partition(8)
    for i in range(40):  # past the first capacity (16): the matrix grows
        part.add(f"{i:064x}", f"q{i}", 1.0, unit(i))
    best = part.search(unit(7), 3)
    assert best[0].key == f"{7:064x}" and best[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert [c.similarity for c in best] == sorted((c.similarity for c in best), reverse=True)
    part.remove(f"{7:064x}")
    part.remove(f"{7:064x}")  # twice: nothing
    assert len(part) == 39 and f"{7:064x}" not in [c.key for c in part.search(unit(7), 39)]
    assert part.search(unit(39), 1)[0].key == f"{39:064x}"  # the moved row is still found
    assert part.search(unit(1, dims=4), 1) == []  # another size never compares


async def test_local_vectors_persist_and_search_large_partitions_off_the_loop(tmp_path, monkeypatch):
    index = LocalVectors(tmp_path)
    index.add_sync("a" * 64, "p", "question a", 5.0, unit(1))
    index.add_sync("b" * 64, "p", "question b", 6.0, unit(2))
    index.add_sync("c" * 64, "q", "question c", 7.0, unit(3))
    index.count_hit_sync()
    index.remove_sync(["b" * 64])
    # Another writer's values: garbage, not bytes, NaNs.
    index._disk.set("e" * 64, b"not json\n")
    index._disk.set("f" * 64, {"partition": "p"})
    index._disk.set("0" * 64, b'{"partition": "p", "text": "t", "created_at": 1}\n' + b"\xff" * 8)
    index.close()
    again = LocalVectors(tmp_path)
    assert again.load_sync() == 2
    assert again.counts_sync() == (5, 1)
    monkeypatch.setattr(vectors, "INLINE_WORK", 0)  # every search in a worker thread
    found = await again.search("p", unit(1), 4)
    assert [(c.key, c.text, c.created_at) for c in found] == [("a" * 64, "question a", 5.0)]
    assert await again.search("nowhere", unit(1), 4) == []
    again.close()


def test_local_vectors_of_expired_entries_are_dropped_as_they_are_read_back(tmp_path):
    index = LocalVectors(tmp_path)
    index.add_sync("a" * 64, "p", "an old question", 100.0, unit(1))
    index.add_sync("b" * 64, "p", "a recent question", 200.0, unit(2))
    index.close()
    again = LocalVectors(tmp_path)
    assert again.load_sync(expired_before=150.0) == 1
    assert [c.key for c in again.partitions["p"].search(unit(1), 4)] == ["b" * 64]
    again.close()
    assert LocalVectors(tmp_path).counts_sync()[0] == 1  # gone from disk too


def test_local_vectors_read_back_past_a_corrupt_vector(tmp_path):
    index = LocalVectors(tmp_path)
    index.add_sync("a" * 64, "p", "question a", 5.0, unit(1))
    head = b'{"partition": "p", "text": "t", "created_at": 1}\n'
    index._disk.set("b" * 64, head + unit(2, dims=4).tobytes())  # another size in the partition
    index._disk.set("c" * 64, head + (unit(3) * 100).tobytes())  # no unit vector (a flipped exponent)
    index.close()
    again = LocalVectors(tmp_path)
    assert again.load_sync() == 2
    found = again.partitions["p"].search(unit(3), 4)
    assert [c.key for c in found][0] == "c" * 64
    assert max(c.similarity for c in found) == pytest.approx(1.0, abs=1e-5)  # never above
    again.close()


def test_redisearch_answers_in_both_protocols_skip_documents_without_fields():
    key = "d" * 64
    fields = [b"key", key.encode(), b"text", b"hi there", b"created_at", b"12.5", b"distance", b"0.04"]
    resp2 = [2, b"doc:gone", [], b"doc:1", fields]
    resp3 = {
        b"total_results": 2,
        b"results": [
            {b"id": b"doc:gone", b"extra_attributes": {}},
            {b"id": b"doc:1", b"extra_attributes": dict(zip(fields[::2], fields[1::2], strict=True))},
        ],
    }
    for answer in (resp2, resp3):
        [found] = candidates(answer)
        assert (found.key, found.text, found.created_at) == (key, "hi there", 12.5)
        assert found.similarity == pytest.approx(0.96)
    assert candidates(None) == []


@pytest.fixture
def fake_embedder() -> Iterator[FakeEmbedder]:
    server = FakeEmbedder().start()
    yield server
    server.stop()


async def test_the_embedder_remembers_texts_and_speaks_both_dialects(fake_embedder, monkeypatch):
    monkeypatch.setenv("EMBED_TEST_KEY", "sk-e")
    for url in (fake_embedder.url, fake_embedder.ollama_url):
        embedder = Embedder(url, "m", "EMBED_TEST_KEY", 2.0)
        first = await embedder.embed("some text here")
        again = await embedder.embed("some text here")
        assert first is not None and again is first
        assert np.allclose(first, fake_embedder.vector("some text here"), atol=1e-6)
        assert embedder.identity == [url, "m", 16]
        embedder.close()
    assert fake_embedder.calls == ["some text here"] * 2
    assert {h["authorization"] for h in fake_embedder.headers} == {"Bearer sk-e"}


async def test_a_failing_embedder_answers_none_and_is_skipped_while_its_breaker_is_open(fake_embedder):
    embedder = Embedder(fake_embedder.url, "m", "", 0.2)
    assert await embedder.embed("the first text") is not None
    fake_embedder.dims = 5  # another size than the first vector's: wrong
    assert await embedder.embed("another text") is None
    assert embedder.breaker.is_open
    calls = len(fake_embedder.calls)
    assert await embedder.embed("a third text") is None
    assert len(fake_embedder.calls) == calls  # not asked while the breaker is open
    fake_embedder.dims, fake_embedder.delay = 16, 1.0
    embedder.breaker.open_until = 0  # the cool-down is over: one probe, which times out
    started = time.monotonic()
    assert await embedder.embed("a slow text") is None
    assert time.monotonic() - started < 0.9
    embedder.close()
    assert "authorization" not in fake_embedder.headers[0]


async def raw_embedder(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> tuple[asyncio.Server, str]:
    """A server answering every request with `answer` (which writes raw HTTP), and its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        await answer(writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/embeddings"


async def test_an_answer_ended_by_closing_the_connection_is_read_to_its_end():
    vector = [0.001 * (i + 1) for i in range(3072)]
    body = json.dumps({"data": [{"embedding": vector}]}).encode()

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
        writer.write(body[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest comes later, as over a real network
        writer.write(body[1000:])
        await writer.drain()

    server, url = await raw_embedder(answer)
    embedder = Embedder(url, "m", "", 2.0)
    found = await embedder.embed("a long vector please")
    server.close()
    assert found is not None and len(found) == 3072
    assert np.allclose(found, np.asarray(vector) / np.linalg.norm(vector), atol=1e-6)


async def test_a_huge_or_absurd_answer_is_refused_unread_and_teaches_no_vector_size(fake_embedder, caplog):
    huge = b'{"data": [{"embedding": [' + b"0.5, " * 400_000 + b"0.5]}]}"

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(huge) + huge)
        await writer.drain()

    server, url = await raw_embedder(answer)
    embedder = Embedder(url, "m", "", 2.0)
    assert await embedder.embed("a question to embed") is None
    server.close()
    assert "answer too large" in caplog.text
    assert embedder.dims == 0  # a later sane vector is still welcome
    with pytest.raises(EmbedError):
        unit_vector([True, False, True])


async def test_the_tls_context_is_made_once_not_on_the_event_loop_for_each_connection(monkeypatch):
    made = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(1) or real(*a, **k))
    endpoint = HTTPEndpoint(f"https://127.0.0.1:{free_port()}/v1/embeddings")  # configure time
    for _ in range(2):  # request time: reading the system's CAs took 16 ms of the loop each
        with pytest.raises(OSError):
            await endpoint.post(b"{}", {})
    assert len(made) == 1


async def test_credentials_in_the_embed_url_never_reach_a_log_line_or_the_partition(fake_embedder, caplog):
    fake_embedder.status = 500
    url = fake_embedder.url + "?api-version=2024-02-01&key=sk-in-url&api-key=sk-two"
    embedder = Embedder(url, "m", "", 0.5)
    assert await embedder.embed("a question to embed") is None
    embedder.close()
    assert "embedder at" in caplog.text
    assert "api-version=2024-02-01" in caplog.text
    assert "sk-in-url" not in caplog.text and "sk-two" not in caplog.text
    assert "sk-in-url" not in json.dumps(embedder.identity)


def test_semantic_options_are_checked_and_name_the_option(tmp_path):
    addon = AICache()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ai_cache_dir=str(tmp_path))
        for bad, option in (
            ({"ai_cache_semantic": "on"}, "ai_cache_embed_url"),
            ({"ai_cache_semantic": "yes"}, "ai_cache_semantic"),
            ({"ai_cache_semantic_threshold": "0", "ai_cache_embed_url": "http://x/e"}, "ai_cache_semantic_threshold"),
            ({"ai_cache_semantic_messages": "0", "ai_cache_embed_url": "http://x/e"}, "ai_cache_semantic_messages"),
            ({"ai_cache_embed_timeout": "-1", "ai_cache_embed_url": "http://x/e"}, "ai_cache_embed_timeout"),
        ):
            options = {"ai_cache_semantic": "on", **bad}
            with pytest.raises(exceptions.OptionsError, match=option):
                tctx.configure(addon, **options)
        tctx.configure(addon, ai_cache_semantic="on", ai_cache_embed_url="http://127.0.0.1:9/v1/embeddings")
        assert addon.semantic is not None and addon.semantic.settings.threshold == 0.95
        tctx.configure(addon, ai_cache_semantic="off")
        assert addon.semantic is None
        asyncio.run(addon.done())


def test_no_semantic_layer_with_fixtures_whatever_turned_it_on(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    addon = AICache()
    with taddons.context(addon) as tctx:
        url = "http://127.0.0.1:9/v1/embeddings"
        tctx.configure(addon, ai_cache_dir=str(tmp_path / "c"), ai_cache_semantic="on", ai_cache_embed_url=url)
        assert addon.semantic is not None
        tctx.configure(addon, ai_cache_fixtures=str(tmp_path / "fixtures"))  # the pytest plugin's, for one
        assert addon.semantic is None
        assert "no semantic lookups with ai_cache_fixtures" in caplog.text
        asyncio.run(addon.done())


def test_a_semantic_hit_shows_its_similarity_in_headers_and_log_line():
    state = FlowState("openai-chat", status=Status.HIT, key="k" * 64, layer="semantic", similarity=0.96123, age=3)
    assert ("x-ai-cache-similarity", "0.9612") in cache_headers(state)
    assert flow_line(state, "h/v1/chat/completions", 10, "age 3s").startswith("HIT semantic 0.9612 openai-chat")
