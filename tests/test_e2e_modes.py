"""End to end: record / replay / refresh / off, offline over HTTP, HTTPS (CONNECT) and reverse mode."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fake_upstream import FakeUpstream, make_tls_cert
from helpers import CHAT, chat_body, post, stream_raw, wait_for_status


@pytest.fixture
def own_upstream():
    """An upstream a test may stop, to prove replay never needs it."""
    server = FakeUpstream().start()
    yield server
    server.stop()


def test_replay_serves_recordings_with_the_upstream_gone(start_proxy, own_upstream, marker):
    recorder = start_proxy()
    json_answer = post(recorder, own_upstream, CHAT, chat_body(marker))
    _, stream_answer = stream_raw(recorder, own_upstream, CHAT, chat_body(marker, stream=True))
    wait_for_status(recorder, own_upstream, chat_body(marker, stream=True), "HIT")
    recorder.stop()
    url = own_upstream.url
    own_upstream.stop()

    replayer = start_proxy(ai_cache_dir=recorder.options["ai_cache_dir"], ai_cache_mode="replay")
    with replayer.client() as client:
        again = client.post(url + CHAT, json=chat_body(marker))
        with client.stream("POST", url + CHAT, json=chat_body(marker, stream=True)) as r:
            streamed = b"".join(r.iter_raw())
        missing = client.post(url + CHAT, json=chat_body(marker + "-unrecorded"))
        bypass_asked = client.post(url + CHAT, json=chat_body(marker), headers={"x-ai-cache-bypass": "1"})
    assert again.content == json_answer.content and again.headers["x-ai-cache-status"] == "HIT"
    assert streamed == stream_answer
    assert missing.status_code == 504
    error = missing.json()["error"]
    assert "no recording" in error["message"] and "openai-chat" in error["message"]
    assert "gpt-4o-mini" in error["message"] and "/v1/chat/completions" in error["message"]
    assert error["key"] == missing.headers["x-ai-cache-key"]
    assert bypass_asked.headers["x-ai-cache-status"] == "HIT"  # replay never goes upstream
    assert "no recording, answered 504 (ai_cache_mode=replay)" in replayer.logs()


def test_replay_miss_surfaces_through_the_sdk(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_mode="replay")
    client = openai.OpenAI(
        api_key="sk-x",
        base_url=upstream.url + "/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=proxy.url),
    )
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": marker}])
    assert raised.value.status_code == 504
    assert "no recording" in str(raised.value)
    assert upstream.count(marker) == 0


def test_refresh_mode_always_fetches_and_overwrites(start_proxy, upstream, marker):
    recorder = start_proxy()
    first = post(recorder, upstream, CHAT, chat_body(marker))
    recorder.stop()
    refresher = start_proxy(ai_cache_dir=recorder.options["ai_cache_dir"], ai_cache_mode="refresh")
    refreshed = post(refresher, upstream, CHAT, chat_body(marker))
    assert refreshed.headers["x-ai-cache-status"] == "REFRESH"
    assert refreshed.json()["id"] != first.json()["id"]
    hit = wait_for_status(refresher, upstream, chat_body(marker), "HIT")
    assert hit.json()["id"] == refreshed.json()["id"]


def test_off_mode_passes_everything_through(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_mode="off")
    statuses = [post(proxy, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] for _ in range(2)]
    assert statuses == ["BYPASS", "BYPASS"]
    assert upstream.count(marker) == 2


def test_https_through_connect_records_and_replays_offline(start_proxy, confdir, tmp_path, marker):
    cert, key = make_tls_cert(str(tmp_path / "tls"))
    tls = FakeUpstream(tls=(cert, key)).start()
    ca = str(confdir / "mitmproxy-ca-cert.pem")
    recorder = start_proxy(ssl_verify_upstream_trusted_ca=cert)
    client = openai.OpenAI(
        api_key="sk-x",
        base_url=tls.url + "/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=recorder.url, verify=ssl.create_default_context(cafile=ca)),
    )
    ask = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": marker}])
    first = client.chat.completions.with_raw_response.create(**ask)
    second = client.chat.completions.with_raw_response.create(**ask)
    assert [first.headers["x-ai-cache-status"], second.headers["x-ai-cache-status"]] == ["MISS", "HIT"]
    assert tls.count(marker) == 1
    recorder.stop()
    url = tls.url
    tls.stop()

    replayer = start_proxy(ai_cache_dir=recorder.options["ai_cache_dir"], ai_cache_mode="replay")
    with httpx.Client(proxy=replayer.url, verify=ssl.create_default_context(cafile=ca)) as http:
        offline = http.post(url + CHAT, json=ask, headers={"authorization": "Bearer sk-other"})
    assert offline.status_code == 200
    assert offline.json()["id"] == first.parse().id
    assert "server connect" not in replayer.logs()  # no connection to the real host was attempted


def test_reverse_mode_needs_no_ca_and_replays_offline(start_proxy, own_upstream, marker):
    proxy = start_proxy("--mode", f"reverse:{own_upstream.url}")
    with httpx.Client(base_url=proxy.url) as client:
        statuses = [client.post(CHAT, json=chat_body(marker)).headers["x-ai-cache-status"] for _ in range(2)]
    assert statuses == ["MISS", "HIT"]
    assert own_upstream.count(marker) == 1
    proxy.stop()
    own_upstream.stop()
    replayer = start_proxy(
        "--mode", f"reverse:{own_upstream.url}", ai_cache_dir=proxy.options["ai_cache_dir"], ai_cache_mode="replay"
    )
    with httpx.Client(base_url=replayer.url) as client:
        assert client.post(CHAT, json=chat_body(marker)).headers["x-ai-cache-status"] == "HIT"
        assert client.post(CHAT, json=chat_body(marker + "-new")).status_code == 504


def test_paced_replay_over_https_through_connect(start_proxy, confdir, tmp_path, marker):
    cert, key = make_tls_cert(str(tmp_path / "tls"))
    tls = FakeUpstream(tls=(cert, key)).start()
    proxy = start_proxy(ssl_verify_upstream_trusted_ca=cert, ai_cache_replay_speed="4")
    verify = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    body = chat_body(marker, stream=True)
    with httpx.Client(proxy=proxy.url, verify=verify) as client:
        with client.stream("POST", tls.url + CHAT, json=body, headers={"x-fake-scenario": "slow"}) as r:
            recorded = b"".join(r.iter_raw())
        tls.stop()  # the paced replay must not need the real host either
        for _ in range(50):
            with client.stream("POST", tls.url + CHAT, json=body) as r:
                status = r.headers["x-ai-cache-status"]
                replayed = b"".join(r.iter_raw())
            if status == "HIT":
                break
    assert status == "HIT" and replayed == recorded
    assert r.headers["content-type"].startswith("text/event-stream")
    assert tls.count(marker) == 1


def test_export_import_replay_round_trip(start_proxy, own_upstream, marker, tmp_path):
    cli = [str(Path(sys.executable).parent / "ai-cache")]
    recorder = start_proxy()
    recorded = {
        "json": post(recorder, own_upstream, CHAT, chat_body(marker)).content,
        "stream": stream_raw(recorder, own_upstream, CHAT, chat_body(marker, stream=True), {"x-fake-scenario": "slow"})[
            1
        ],
    }
    wait_for_status(recorder, own_upstream, chat_body(marker, stream=True), "HIT")
    recorder.stop()
    fixtures, again = tmp_path / "fixtures", tmp_path / "re-export"
    subprocess.run([*cli, "--dir", recorder.options["ai_cache_dir"], "export", str(fixtures)], check=True)
    (fixtures / "broken.json").write_text("{not json")
    imported = subprocess.run(
        [*cli, "--dir", str(tmp_path / "imported"), "import", str(fixtures)], capture_output=True, text=True
    )
    assert imported.returncode == 1 and "broken.json" in imported.stderr  # reported, the rest imported
    (fixtures / "broken.json").unlink()
    subprocess.run([*cli, "--dir", str(tmp_path / "imported"), "export", str(again)], check=True)
    assert {p.name: p.read_bytes() for p in fixtures.iterdir()} == {p.name: p.read_bytes() for p in again.iterdir()}

    url = own_upstream.url
    own_upstream.stop()
    replayer = start_proxy(ai_cache_dir=str(tmp_path / "imported"), ai_cache_mode="replay", ai_cache_replay_speed="1")
    with replayer.client() as client:
        assert client.post(url + CHAT, json=chat_body(marker)).content == recorded["json"]
        start = time.monotonic()
        with client.stream("POST", url + CHAT, json=chat_body(marker, stream=True)) as r:
            assert r.headers["x-ai-cache-status"] == "HIT"
            assert b"".join(r.iter_raw()) == recorded["stream"]
        assert time.monotonic() - start > 0.3  # the recorded pace survived the round trip
    assert own_upstream.count(marker) == 2


# A paced replay is served by a small server inside the proxy, at 127.0.0.1:<port>. In
# `--mode upstream:...` that rewritten flow was sent to the parent proxy, which saw the
# replay token and the cached answer. Paced replays must never leave the machine.
@pytest.fixture
def parent_proxy():
    """A TCP listener standing in for an upstream proxy: counts connections, answers none."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    accepted: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, peer = sock.accept()
                accepted.append(peer)
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join()
    sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_paced_replay_in_upstream_mode_never_reaches_the_parent_proxy(
    start_proxy, confdir, tmp_path, upstream, marker, parent_proxy, scheme
):
    provider, options, verify = upstream, {}, True
    if scheme == "https":  # through CONNECT, the flow mitmproxy forwards as a tunnel in upstream mode
        cert, key = make_tls_cert(str(tmp_path / "tls"))
        provider = FakeUpstream(tls=(cert, key)).start()
        options = {"ssl_verify_upstream_trusted_ca": cert}
        verify = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
    body = chat_body(marker, stream=True)

    def stream(proxy, headers: dict | None = None) -> tuple[httpx.Response, bytes]:
        with httpx.Client(proxy=proxy.url, verify=verify, timeout=30) as client:
            with client.stream("POST", provider.url + CHAT, json=body, headers=headers or {}) as response:
                return response, b"".join(response.iter_raw())

    recorder = start_proxy(**options)
    _, recorded = stream(recorder, {"x-fake-scenario": "slow"})
    for _ in range(50):  # the write finishes in the background
        if stream(recorder)[0].headers["x-ai-cache-status"] == "HIT":
            break
    recorder.stop()
    port, connections = parent_proxy
    proxy = start_proxy(
        f"--mode=upstream:http://127.0.0.1:{port}",
        ai_cache_replay_speed="1",
        ai_cache_dir=recorder.options["ai_cache_dir"],
        **options,
    )
    answer, replayed = stream(proxy)
    assert (answer.status_code, answer.headers.get("x-ai-cache-status")) == (200, "HIT")
    assert replayed == recorded
    assert connections == []
    if provider is not upstream:
        provider.stop()
