"""scripts/with-ai-cache runs a real program against the cache and exits with its status."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import certs

from conftest import ROOT
from fake_embedder import FakeEmbedder
from fake_upstream import FakeUpstream, make_tls_cert

SCRIPT = str(ROOT / "scripts" / "with-ai-cache")
NODE_SDKS = ROOT / "tests" / "node" / "node_modules"
PROGRAM = """
import httpx, sys
body = {"model": "m", "messages": [{"role": "user", "content": sys.argv[2]}]}
answer = httpx.post(sys.argv[1] + "/v1/chat/completions", json=body)
print(answer.headers.get("x-ai-cache-status"), answer.json()["id"])
sys.exit(3)
"""
# Node's global fetch, as the official openai and @anthropic-ai/sdk packages call it.
NODE_PROGRAM = """
const [url, prompt] = process.argv.slice(2);
const answer = await fetch(url + "/v1/chat/completions", {method: "POST",
  headers: {"content-type": "application/json"},
  body: JSON.stringify({model: "m", messages: [{role: "user", content: prompt}]})});
console.log(answer.headers.get("x-ai-cache-status"), (await answer.json()).id);
"""


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory) -> Path:
    """Where with-ai-cache installs undici: a fresh one per run, so the install is tested."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def run(node_cache):
    def run(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "XDG_CACHE_HOME": str(node_cache)}
        return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=120, env=env)

    return run


def summary(stderr: str) -> str:
    found = re.findall(r"^ai-cache: \d+ LLM calls?: .*$", stderr, re.M)
    assert len(found) == 1, stderr
    return found[0]


def test_runs_a_program_through_the_cache_and_keeps_its_exit_status(run, tmp_path, confdir, upstream, marker):
    common = ["--dir", str(tmp_path / "fixtures"), "--confdir", str(confdir)]
    recorded = run(*common, "--", sys.executable, "-c", PROGRAM, upstream.url, marker)
    assert recorded.returncode == 3, recorded.stderr
    status, answer_id = recorded.stdout.split()
    assert status == "MISS"
    assert summary(recorded.stderr).startswith("ai-cache: 1 LLM call: 0 hits, 1 miss; 1 stored, 0 not stored;")
    replayed = run("--mode", "replay", *common, "--", sys.executable, "-c", PROGRAM, upstream.url, marker)
    assert replayed.returncode == 3
    assert replayed.stdout.split() == ["HIT", answer_id]
    assert summary(replayed.stderr).startswith("ai-cache: 1 LLM call: 1 hit, 0 misses; 0 stored")
    assert upstream.count(marker) == 1
    assert "no LLM call" not in recorded.stderr + replayed.stderr


def test_fixtures_replay_from_the_files_alone_and_unused_ones_are_reported(run, tmp_path, confdir, upstream, marker):
    fixtures = tmp_path / "fixtures"
    common = ["--fixtures", str(fixtures), "--confdir", str(confdir)]
    for prompt in (f"{marker} kept", f"{marker} dropped"):
        assert run(*common, "--", sys.executable, "-c", PROGRAM, upstream.url, prompt).stdout.startswith("MISS")
    files = sorted(p.name for p in fixtures.glob("*.json"))
    assert len(files) == 2
    (fixtures / "hand-made.json").write_text("{}")  # not a fixture: named, not offered for pruning
    # No --dir: a fresh L1 each run, so the answer comes from the committed file.
    replayed = run("--mode", "replay", *common, "--", sys.executable, "-c", PROGRAM, upstream.url, f"{marker} kept")
    assert replayed.stdout.startswith("HIT"), replayed.stderr
    assert upstream.count(marker) == 2
    (unused,) = (fixtures / ".ai-cache-unused").read_text().split()
    assert unused in files
    assert (
        f"with-ai-cache: fixture file {fixtures / 'hand-made.json'} skipped, not loaded: "
        'not an ai-cache fixture (needs "ai_cache_fixture": 2)'
    ) in replayed.stderr.splitlines()
    assert (
        f"with-ai-cache: 1 fixture file in {fixtures} unused by this run ({unused}): "
        f"ai-cache prune-unused {fixtures} deletes them"
    ) in replayed.stderr.splitlines()


def test_with_fixtures_the_semantic_layer_is_off_whatever_config_yaml_says(run, tmp_path, confdir, upstream, marker):
    # A developer's config.yaml may turn it on for their own proxy (it beats --set for an
    # addon's options); a test recorded into fixtures must get answers to its own
    # questions, each with a fixture of its own, as the pytest plugin's do.
    embedder = FakeEmbedder().start()
    own = tmp_path / "conf"
    shutil.copytree(confdir, own)
    (own / "config.yaml").write_text(f"ai_cache_semantic: 'on'\nai_cache_embed_url: {embedder.url}\n")
    prompt = f"{marker} how do I reverse a list"
    try:
        common = ["--fixtures", str(tmp_path / "fixtures"), "--confdir", str(own)]
        recorded = run(*common, "--", sys.executable, "-c", PROGRAM, upstream.url, prompt)
        assert recorded.stdout.startswith("MISS"), recorded.stderr
        assert embedder.calls == []
        # Without fixtures, config.yaml's semantic layer is on: the question is embedded.
        run(
            "--dir",
            str(tmp_path / "l1"),
            "--confdir",
            str(own),
            "--",
            sys.executable,
            "-c",
            PROGRAM,
            upstream.url,
            prompt,
        )
        assert embedder.calls == [prompt]
    finally:
        embedder.stop()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_fetch_goes_through_the_proxy_over_https(run, tmp_path, confdir, marker):
    """Node 20 ignores NODE_USE_ENV_PROXY: without the preload its fetch reached the
    upstream directly, and replay mode answered from the live provider."""
    cert, key = make_tls_cert(str(tmp_path / "tls"))
    program = tmp_path / "app.mjs"
    program.write_text(NODE_PROGRAM)
    common = [
        "--dir",
        str(tmp_path / "cache"),
        "--confdir",
        str(confdir),
        "--set",
        f"ssl_verify_upstream_trusted_ca={cert}",
    ]
    with FakeUpstream(tls=(cert, key)) as upstream:  # trusted by Node through NODE_EXTRA_CA_CERTS only
        recorded = run(*common, "--", "node", str(program), upstream.url, marker)
        assert recorded.returncode == 0, recorded.stderr
        status, answer_id = recorded.stdout.split()
        assert status == "MISS"
        replayed = run("--mode", "replay", *common, "--", "node", str(program), upstream.url, marker)
        assert replayed.stdout.split() == ["HIT", answer_id], replayed.stderr
        assert upstream.count(marker) == 1
    assert summary(replayed.stderr).startswith("ai-cache: 1 LLM call: 1 hit")
    assert "fetch will NOT use the proxy" not in recorded.stderr + replayed.stderr


@pytest.mark.skipif(not (NODE_SDKS / "openai").is_dir(), reason="no tests/node/node_modules (make node-deps)")
def test_the_official_openai_node_sdk_goes_through_the_proxy_with_no_proxy_code(
    run, tmp_path, confdir, upstream, marker
):
    """`with-ai-cache -- node app.js` for an app that just does `new OpenAI()`."""
    job = {
        "sdk": "openai",
        "call": "chat-stream",
        "baseURL": upstream.url + "/v1",
        "prompt": marker,
        "model": "gpt-4o-mini",
        "headers": {},
    }
    ran = run(
        "--dir",
        str(tmp_path / "cache"),
        "--confdir",
        str(confdir),
        "--",
        "node",
        str(NODE_SDKS.parent / "driver.mjs"),
        json.dumps(job),
    )
    assert ran.returncode == 0, ran.stderr
    calls = json.loads(ran.stdout)
    assert (calls["miss"]["status"], calls["hit"]["status"]) == ("MISS", "HIT")
    assert calls["miss"]["output"] == calls["hit"]["output"]
    assert upstream.count(marker) == 1


def test_warns_when_no_llm_call_went_through_the_proxy(run, tmp_path, confdir):
    ran = run("--dir", str(tmp_path / "c"), "--confdir", str(confdir), "--", "true")
    assert ran.returncode == 0
    assert summary(ran.stderr).startswith("ai-cache: 0 LLM calls: 0 hits, 0 misses;")
    assert "with-ai-cache: no LLM call went through the proxy" in ran.stderr


def test_the_summary_says_why_answers_were_not_stored(run, tmp_path, confdir, upstream, marker):
    program = """
import httpx, sys
for n, scenario, stream in ((1, "status-500", False), (2, "status-500", False), (3, "no-terminal", True)):
    httpx.post(sys.argv[1] + "/v1/chat/completions", headers={"x-fake-scenario": scenario},
               json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": f"{sys.argv[2]} {n}"}]})
"""
    ran = run(
        "--dir",
        str(tmp_path / "c"),
        "--confdir",
        str(confdir),
        "--",
        sys.executable,
        "-c",
        program,
        upstream.url,
        marker,
    )
    assert ran.returncode == 0, ran.stderr
    assert summary(ran.stderr).startswith(
        "ai-cache: 3 LLM calls: 0 hits, 3 misses; 0 stored, 3 not stored "
        "(upstream answered 500: 2, stream ended without its terminal event: 1);"
    )


def test_the_proxy_log_has_one_line_per_llm_call(run, tmp_path, confdir, upstream, marker):
    log = tmp_path / "proxy.log"
    calls = "; ".join(
        f"httpx.post(sys.argv[1] + '/v1/chat/completions', json={{'model': 'm', "
        f"'messages': [{{'role': 'user', 'content': sys.argv[2] + '{n}'}}]}})"
        for n in (1, 2, 1)
    )
    ran = run(
        "--dir",
        str(tmp_path / "c"),
        "--confdir",
        str(confdir),
        "--log",
        str(log),
        "--",
        sys.executable,
        "-c",
        f"import httpx, sys; {calls}",
        upstream.url,
        marker,
    )
    assert ran.returncode == 0, ran.stderr
    lines = log.read_text().splitlines()
    # Lines of one moment share a record: only its first line carries the time stamp.
    verdicts = [line.split("ai-cache: ", 1)[1].split()[0] for line in lines if "ai-cache: " in line][1:]
    # A MISS line is written once its batch write ended: it may come after the HIT's.
    assert sorted(verdicts[:-1]) == ["HIT", "MISS", "MISS"] and verdicts[-1] == "3"  # "3 LLM calls: …"
    assert not [line for line in lines if re.search(r"(client|server) (connect|disconnect)", line)], lines
    assert len(lines) == 7  # + "Loading script", the options line and "proxy listening"


def test_env_prints_exports_for_a_running_proxy(run, tmp_path):
    ca = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048).default_ca.to_pem()
    printed = run("--env", "--port", "8123", "--confdir", str(tmp_path))
    assert printed.returncode == 0
    exports = dict(re.findall(r"^export (\w+)=(.*)$", printed.stdout, re.M))
    assert exports["HTTPS_PROXY"] == "http://127.0.0.1:8123"
    bundle = tmp_path / "ai-cache-ca-bundle.pem"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        assert exports[name] == str(bundle)
    assert exports["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "mitmproxy-ca-cert.pem")  # adds to Node's store
    assert "--require" in exports["NODE_OPTIONS"] and "node_preload.js" in exports["NODE_OPTIONS"]
    # The system's roots plus mitmproxy's: hosts reached outside the proxy still verify.
    system = ssl.create_default_context(cafile=ssl.get_default_verify_paths().openssl_cafile)
    both = ssl.create_default_context(cafile=str(bundle))
    assert both.cert_store_stats()["x509_ca"] == system.cert_store_stats()["x509_ca"] + 1
    assert bundle.read_bytes().endswith(ca)


def test_a_missing_command_is_a_usage_error(run):
    assert run().returncode == 2


def test_a_busy_port_is_refused_and_signals_exit_as_in_a_shell(run, tmp_path, confdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused = run("--port", str(busy.getsockname()[1]), "--", "true")
    assert refused.returncode == 1 and "in use" in refused.stderr
    killed = run("--dir", str(tmp_path / "c"), "--confdir", str(confdir), "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15
