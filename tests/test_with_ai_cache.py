"""scripts/with-ai-cache runs a real program against the cache and exits with its status."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "with-ai-cache")
PROGRAM = """
import httpx, sys
answer = httpx.post(sys.argv[1] + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": sys.argv[2]}]})
print(answer.headers.get("x-ai-cache-status"), answer.json()["id"])
sys.exit(3)
"""


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_runs_a_program_through_the_cache_and_keeps_its_exit_status(tmp_path, confdir, upstream, marker):
    common = ["--dir", str(tmp_path / "fixtures"), "--confdir", str(confdir)]
    recorded = run(*common, "--", sys.executable, "-c", PROGRAM, upstream.url, marker)
    assert recorded.returncode == 3, recorded.stderr
    status, answer_id = recorded.stdout.split()
    assert status == "MISS"
    replayed = run("--mode", "replay", *common, "--", sys.executable, "-c", PROGRAM, upstream.url, marker)
    assert replayed.returncode == 3
    assert replayed.stdout.split() == ["HIT", answer_id]
    assert upstream.count(marker) == 1


def test_env_prints_exports_for_a_running_proxy(tmp_path):
    printed = run("--env", "--port", "8123", "--confdir", str(tmp_path))
    assert printed.returncode == 0
    assert "export HTTPS_PROXY=http://127.0.0.1:8123" in printed.stdout
    assert f"export SSL_CERT_FILE={tmp_path}/mitmproxy-ca-cert.pem" in printed.stdout
    assert "NODE_EXTRA_CA_CERTS" in printed.stdout and "REQUESTS_CA_BUNDLE" in printed.stdout


def test_a_missing_command_is_a_usage_error():
    assert run().returncode == 2


def test_a_busy_port_is_refused_and_signals_exit_as_in_a_shell(tmp_path, confdir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused = run("--port", str(busy.getsockname()[1]), "--", "true")
    assert refused.returncode == 1 and "in use" in refused.stderr
    killed = run("--dir", str(tmp_path / "c"), "--confdir", str(confdir), "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15
