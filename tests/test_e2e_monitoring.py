"""Monitoring end to end: the metrics endpoint of a real mitmdump, and the flow comments
and hit marker a real mitmweb shows in its flow list."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ai_cache.launch import free_port, stop, wait_for_port
from conftest import ADDON
from helpers import CHAT, STREAMS, chat_body, post, stream_raw, wait_for


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).json()


def test_metrics_count_a_miss_a_hit_a_bypass_and_a_stream_not_stored(start_proxy, upstream, marker):
    port = free_port()
    proxy = start_proxy(ai_cache_metrics=str(port))
    body = chat_body(marker)
    miss = post(proxy, upstream, CHAT, body)
    assert miss.headers["x-ai-cache-status"] == "MISS"
    wait_for(lambda: stats(port)["stored"].get("json") == 1)
    hit = post(proxy, upstream, CHAT, body)
    assert hit.headers["x-ai-cache-status"] == "HIT"
    bypass = post(proxy, upstream, CHAT, body, {"cache-control": "no-store"})
    assert bypass.headers["x-ai-cache-status"] == "BYPASS"
    path, make, _ = STREAMS["openai-chat"]
    streamed, _ = stream_raw(proxy, upstream, path, make(marker), {"x-fake-scenario": "no-terminal"})
    assert streamed.headers["x-ai-cache-status"] == "MISS"
    wait_for(lambda: stats(port)["not_stored"])

    usage = miss.json()["usage"]
    samples = scrape(port)
    chat = ("protocol", "openai-chat")
    assert samples[("ai_cache_requests_total", (("layer", "none"), chat, ("status", "MISS")))] == 2
    assert samples[("ai_cache_requests_total", (("layer", "l1"), chat, ("status", "HIT")))] == 1
    assert samples[("ai_cache_requests_total", (("layer", "none"), chat, ("status", "BYPASS")))] == 1
    assert samples[("ai_cache_stored_total", (("format", "json"),))] == 1
    assert samples[("ai_cache_not_stored_total", (("reason", "incomplete"),))] == 1
    saved = usage["prompt_tokens"] + usage["completion_tokens"]
    assert samples[("ai_cache_tokens_saved_total", (chat,))] == saved
    assert samples[("ai_cache_bytes_served_total", ())] == len(hit.content)
    assert samples[("ai_cache_coalesced_total", ())] == 0
    assert samples[("ai_cache_entries", (("layer", "l1"),))] == 1
    assert not any(name == "ai_cache_l2_up" for name, _ in samples)  # no Redis configured

    numbers = stats(port)
    assert numbers["requests"] == {"MISS": 2, "HIT": 1, "BYPASS": 1}
    assert numbers["stored"] == {"json": 1}
    assert numbers["not_stored"] == {"incomplete": 1}
    assert numbers["tokens_saved"] == {"openai-chat": saved}
    assert numbers["bytes_served"] == len(hit.content)
    assert numbers["entries"] == {"l1": 1}
    assert httpx.get(f"http://127.0.0.1:{port}/nothing", timeout=10).status_code == 404


def test_a_metrics_port_in_use_stops_startup_naming_the_option(start_proxy, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        try:
            proxy = start_proxy(ai_cache_metrics=str(port))
        except RuntimeError:  # exited before it listened
            pass
        else:
            assert proxy.proc.wait(timeout=30) != 0
    logs = "".join(log.read_text() for log in tmp_path.glob("mitmdump-*.log"))
    assert f"ai_cache_metrics: cannot listen on 127.0.0.1:{port}" in logs


def test_mitmweb_lists_the_cache_status_of_each_flow(tmp_path, confdir, upstream, marker):
    proxy_port, web_port = free_port(), free_port()
    command = [
        *[sys.executable, "-c", "import sys; from mitmproxy.tools.main import mitmweb; sys.exit(mitmweb())"],
        *["--listen-host", "127.0.0.1", "-p", str(proxy_port), "--web-port", str(web_port), "--no-web-open-browser"],
        *["-s", str(ADDON), "--set", f"confdir={confdir}", "--set", f"ai_cache_dir={tmp_path / 'cache'}"],
    ]
    with open(tmp_path / "mitmweb.log", "wb") as log:
        web = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(proxy_port, lambda: web.poll() is None)
        wait_for_port(web_port, lambda: web.poll() is None)
        proxied = httpx.Client(proxy=f"http://127.0.0.1:{proxy_port}", timeout=30)
        with proxied:
            body = json.dumps(chat_body(marker))
            headers = {"content-type": "application/json"}
            assert (
                proxied.post(upstream.url + CHAT, content=body, headers=headers).headers["x-ai-cache-status"] == "MISS"
            )

            def listed() -> list[dict]:
                return httpx.get(f"http://127.0.0.1:{web_port}/flows", timeout=10).json()

            wait_for(lambda: any(f["comment"] == "ai-cache MISS stored" for f in listed()))
            assert (
                proxied.post(upstream.url + CHAT, content=body, headers=headers).headers["x-ai-cache-status"] == "HIT"
            )
            path, make, _ = STREAMS["openai-chat"]
            with proxied.stream(
                "POST", upstream.url + path, json=make(marker), headers={"x-fake-scenario": "no-terminal"}
            ) as streamed:
                streamed.read()
            flows = wait_for(lambda: (found := listed()) and len(found) == 3 and found[2]["comment"] and found)
        comments = [f["comment"] for f in flows]
        assert comments[0] == "ai-cache MISS stored"
        assert comments[1].startswith("ai-cache HIT l1 age ") and ", saved " in comments[1]
        assert comments[2] == "ai-cache MISS not stored: stream ended without its terminal event"
        assert [f["marked"] for f in flows] == ["", "⚡", ""]  # mitmweb shows :zap: as its emoji
    finally:
        stop(web)


def test_a_flow_file_holds_each_flow_with_its_cache_verdict(start_proxy, upstream, marker, tmp_path):
    """mitmproxy's -w writes a flow right after the response hooks: the verdict of a flow
    with nothing to write (a bypass, an answer not stored) is on it by then."""
    from mitmproxy import io

    flows_path = tmp_path / "flows"
    proxy = start_proxy("-w", str(flows_path))
    bypass = post(proxy, upstream, CHAT, chat_body(marker), {"x-ai-cache-bypass": "1"})
    failed = post(proxy, upstream, CHAT, chat_body(marker + " 500"), {"x-fake-scenario": "status-500"})
    assert (bypass.headers["x-ai-cache-status"], failed.status_code) == ("BYPASS", 500)
    proxy.stop()
    with flows_path.open("rb") as f:
        saved = {flow.metadata["ai_cache"]["status"]: flow for flow in io.FlowReader(f).stream()}
    assert saved["BYPASS"].comment == "ai-cache BYPASS client asked"
    assert saved["MISS"].comment == "ai-cache MISS not stored: upstream answered 500"
