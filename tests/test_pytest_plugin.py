"""The pytest plugin, end to end: a pytest project made here, run with `python -m pytest`
against the fake provider, recorded into a fixture directory and replayed from it alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ai_cache.cli import main as ai_cache
from ai_cache.fixture_store import UNUSED_LIST
from fake_upstream import FakeUpstream

# A project's tests, without a conftest: httpx and the openai SDK, made inside the tests,
# reach the provider through the variables the plugin set.
PROJECT_TESTS = """
import datetime, os, uuid

import httpx, openai, pytest

UPSTREAM = os.environ["FAKE_UPSTREAM"]


def ask(prompt):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    return httpx.post(UPSTREAM + "/v1/chat/completions", json=body, timeout=30)


def expected(ai_cache, answer):
    if ai_cache.mode == "replay":
        assert (answer.headers["x-ai-cache-status"], answer.headers["x-ai-cache-layer"]) == ("HIT", "fixtures")
        return {"hits": 1, "misses": 0, "stored": 0}
    assert answer.headers["x-ai-cache-status"] == "MISS"
    return {"hits": 0, "misses": 1, "stored": 1}


def test_json(ai_cache):
    answer = ask("what is 2+2?")
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert ai_cache.counts() == expected(ai_cache, answer)


def test_stream_with_the_sdk(ai_cache):
    client = openai.OpenAI(api_key="sk-test", base_url=UPSTREAM + "/v1", max_retries=0)
    stream = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream a poem"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
    assert text
    assert ai_cache.counts() == expected(ai_cache, stream)


def test_volatile_prompt(ai_cache):
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    answer = ask(f"summarise the run {uuid.uuid4()} of {now}")
    assert answer.status_code == 200
    assert ai_cache.counts() == expected(ai_cache, answer)


@pytest.mark.skipif(os.environ.get("SKIP_SOMETIMES") == "1", reason="skipped this run")
def test_sometimes():
    ask("only sometimes")  # the status is not checked: a replay miss must fail the test all the same
"""

PROJECT_INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
ai_cache_fixtures = fixtures/llm
"""


@pytest.fixture
def project(tmp_path) -> Path:
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "test_llm.py").write_text(PROJECT_TESTS)
    (directory / "pytest.ini").write_text(PROJECT_INI)
    return directory


@pytest.fixture
def provider():
    server = FakeUpstream().start()
    yield server
    server.stop()


def run_pytest(project: Path, upstream: str, confdir: Path, *args: str, **env: str) -> tuple[int, str]:
    environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    environment.update(FAKE_UPSTREAM=upstream, **env)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--ai-cache-confdir={confdir}"]
    done = subprocess.run([*command, *args], cwd=project, env=environment, capture_output=True, text=True, timeout=180)
    return done.returncode, done.stdout + done.stderr


def summary(output: str) -> str:
    (line,) = re.findall(r"^ai-cache (?:record|replay|refresh) /.*$", output, re.M)
    return line


def test_records_fixture_files_then_replays_from_them_alone(project, provider, confdir):
    fixtures = project / "fixtures" / "llm"  # the ini option's
    options = ("--ai-cache-normalize=datetime,uuid",)
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=record", *options)
    assert code == 0, output
    assert summary(output) == f"ai-cache record {fixtures}: 0 hits, 4 misses, 4 stored"
    files = sorted(p.name for p in fixtures.glob("*.json"))
    assert len(files) == 4 and all(name.startswith("openai-chat-gpt-4o-mini-") for name in files)
    recorded = {name: (fixtures / name).read_bytes() for name in files}
    documents = [json.loads(data) for data in recorded.values()]
    streams = [d for d in documents if d["format"] == "sse"]
    assert len(streams) == 1 and streams[0]["answer"]  # the assembled text, for review
    assert all("body_text" not in d and d["body_style"] == "spaced" for d in documents if d["format"] == "json")
    provider.stop()  # from here on nothing but the fixture directory answers

    # A fresh L1 and new timestamps and UUIDs in the volatile prompt: all from the files.
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=replay", *options)
    assert code == 0, output
    assert summary(output) == f"ai-cache replay {fixtures}: 4 hits, 0 misses, 0 stored"
    assert {name: (fixtures / name).read_bytes() for name in files} == recorded  # replay writes nothing

    # A run of some tests leaves the others' fixtures unused: pruning them would delete recordings still needed.
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=replay", *options, "-k", "json")
    assert code == 0, output
    assert not (fixtures / UNUSED_LIST).exists()  # the record run's list is gone too
    assert re.fullmatch(
        rf"ai-cache replay {fixtures}: 1 hit, 0 misses, 0 stored; 3 fixture files unused by this run "
        r"\(.*\), which ran part of the suite \(3 deselected\): not listed for prune-unused",
        summary(output),
    ), output
    assert ai_cache(["prune-unused", str(fixtures), "--yes"]) == 1  # nothing listed

    # A run that skips a test reports the fixture it did not use, and lists it for prune-unused;
    # under xdist too, where each worker has a proxy and the controller adds up what they used.
    code, output = run_pytest(
        project, provider.url, confdir, "--ai-cache-mode=replay", "-n", "2", *options, SKIP_SOMETIMES="1"
    )
    assert code == 0, output
    unused = (fixtures / UNUSED_LIST).read_text().split()
    assert len(unused) == 1 and unused[0] in files
    assert summary(output) == (
        f"ai-cache replay {fixtures}: 3 hits, 0 misses, 0 stored; 1 fixture file unused by this run "
        f"({unused[0]}): ai-cache prune-unused {fixtures} deletes them"
    )
    assert ai_cache(["prune-unused", str(fixtures), "--yes"]) == 0
    assert sorted(p.name for p in fixtures.glob("*.json")) == sorted(set(files) - set(unused))

    # Hermetic: the deleted fixture is a replay miss, which fails the test that swallowed the 504.
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=replay", *options)
    assert code == 1, output
    assert "1 failed, 3 passed" in output
    assert "FAILED test_llm.py::test_sometimes" in output
    assert "ai-cache replay miss (the provider was not called):" in output
    explained = r"ai-cache: no recording for this openai-chat request \(model gpt-4o-mini, .*prompt 'only sometimes'"
    assert re.search(explained, output)
    assert summary(output) == f"ai-cache replay {fixtures}: 3 hits, 1 miss, 0 stored"


def test_the_plugin_is_inert_unless_asked(project, provider, confdir):
    code, output = run_pytest(project, provider.url, confdir, "-k", "json")
    assert code == 0 and "1 skipped" in output  # the ai_cache fixture skips: no proxy, no variables
    assert "ai-cache" not in output


def test_a_fixture_file_that_does_not_load_is_named_not_offered_for_pruning(project, provider, confdir):
    fixtures = project / "fixtures" / "llm"
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=record", "-k", "json")
    assert code == 0, output
    (path,) = fixtures.glob("*.json")
    path.write_text(path.read_text().replace('"status": 200', '"status": 200,'))  # a hand edit gone wrong
    provider.stop()

    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=replay", "-k", "json")
    assert code == 1, output
    assert "FAILED test_llm.py::test_json" in output
    assert re.search(
        rf"^ai-cache: fixture file {re.escape(str(path))} skipped, not loaded: not valid JSON: ", output, re.M
    )
    assert "unused" not in summary(output)


CONFTEST_CLIENT = """
import os, openai

# Made when pytest imports this conftest.py, before the tests' modules (an app imported here does the same).
CLIENT = openai.OpenAI(api_key="sk-test", base_url=os.environ["FAKE_UPSTREAM"] + "/v1", max_retries=0)
"""

CONFTEST_TEST = """
from conftest import CLIENT


def test_conftest_client(ai_cache):
    answer = CLIENT.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "from conftest"}]
    )
    expected = "HIT" if ai_cache.mode == "replay" else "MISS"
    assert answer.headers.get("x-ai-cache-status") == expected
"""


def test_a_client_made_when_conftest_is_imported_goes_through_the_proxy(project, provider, confdir):
    (project / "conftest.py").write_text(CONFTEST_CLIENT)
    (project / "test_llm.py").write_text(CONFTEST_TEST)
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=record")
    assert code == 0, output
    assert summary(output) == f"ai-cache record {project / 'fixtures' / 'llm'}: 0 hits, 1 miss, 1 stored"
    provider.stop()
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=replay", "-n", "2")
    assert code == 0, output  # each worker imports conftest.py after starting its proxy


def test_a_proxy_that_exits_stops_the_run_with_its_reason(project, provider, confdir):
    """mitmdump listens, then exits over an option it refused: say why, not 'connection refused' per test."""
    code, output = run_pytest(
        project, provider.url, confdir, "--ai-cache-mode=record", "--ai-cache-set=ai_cache_max_body=lots"
    )
    assert code == pytest.ExitCode.USAGE_ERROR, output
    assert "ai_cache_max_body: 'lots' is not a size" in output
    assert "ConnectError" not in output and provider.count("") == 0


@pytest.mark.parametrize(
    "item, said",
    [
        ("ai_cache_run_log=/tmp/mine.jsonl", "the plugin reads its own run log"),
        ("ai_cache_mode=replay", "use --ai-cache-mode"),
        ("ai_cache_ttl", "expected OPTION=VALUE"),
    ],
)
def test_proxy_settings_the_plugin_owns_or_cannot_read_are_refused(project, provider, confdir, item, said):
    """A run log of the user's would leave the plugin's counts empty; a mode there would
    contradict the plugin's: refused before any proxy starts."""
    code, output = run_pytest(project, provider.url, confdir, "--ai-cache-mode=record", f"--ai-cache-set={item}")
    assert code == pytest.ExitCode.USAGE_ERROR and said in output, output
    assert provider.count("") == 0


def test_a_usage_error_after_the_proxy_started_stops_it(project, provider, confdir, tmp_path):
    """The proxy starts before pytest parses the whole command line (conftest.py files may add options)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code, output = run_pytest(
        project, provider.url, confdir, "--ai-cache-mode=record", "--no-such-option", TMPDIR=str(scratch)
    )
    assert code == pytest.ExitCode.USAGE_ERROR and "--no-such-option" in output, output
    assert list(scratch.iterdir()) == []  # the proxy's directory, removed once it stopped
