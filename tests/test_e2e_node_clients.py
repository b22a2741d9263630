"""The official Node.js SDKs (npm `openai`, `@anthropic-ai/sdk`) through the real proxy.

Each case runs tests/node/driver.mjs once: the call (MISS), a poll until the entry is visible,
the call again (HIT); both parsed outputs must be identical and the fake provider must have
been asked once. Three ways in: reverse mode (the SDK's baseURL is the proxy, Node's own
fetch), and regular mode through an explicit undici `ProxyAgent` to a plain HTTP and to an
HTTPS provider (the client trusts mitmproxy's CA through NODE_EXTRA_CA_CERTS). Streams are
also run against a provider that ends the body 200 ms after the terminal event.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Proxy
from fake_upstream import TOOL_ARGS, FakeUpstream, make_tls_cert
from helpers import log_lines

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
NODE_MIN = (20, 18)  # undici 7 (tests/node/package.json) needs 20.18.1
LATE_MS = 200


def node_version() -> tuple[int, ...]:
    """(major, minor) of the node on PATH; () when there is none."""
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout if NODE else ""
    return tuple(int(n) for n in re.findall(r"\d+", out)[:2])


NODE_VERSION = node_version()
FOUND = ".".join(map(str, NODE_VERSION)) if NODE_VERSION else "no node on PATH"
pytestmark = pytest.mark.skipif(NODE_VERSION < NODE_MIN, reason=f"needs node >= 20.18, found {FOUND}")


@dataclass(frozen=True)
class Case:
    sdk: str
    call: str
    tools: bool = False
    late: bool = False  # the provider ends the body LATE_MS after the terminal event

    @property
    def stream(self) -> bool:
        return self.call.endswith("stream")

    @property
    def model(self) -> str:
        return {"embeddings": "text-embedding-3-small", "messages": "claude-3-5-haiku-latest"}.get(
            self.call.split("-")[0], "gpt-4o-mini"
        )

    def __str__(self) -> str:
        return f"{self.sdk}-{self.call}" + ("-tool" if self.tools else "") + ("-late" if self.late else "")


BASE = [
    Case("openai", "chat", tools=True),
    Case("openai", "chat-stream", tools=True),
    Case("openai", "chat-stream"),
    Case("openai", "responses"),
    Case("openai", "responses-stream"),
    Case("openai", "embeddings"),
    Case("anthropic", "messages", tools=True),
    Case("anthropic", "messages-create-stream", tools=True),
    Case("anthropic", "messages-stream"),
]
CASES = BASE + [Case(c.sdk, c.call, c.tools, late=True) for c in BASE if c.stream]


@dataclass
class Route:
    """How a client reaches the provider: its base URL, and the proxy it names (if any)."""

    proxy: Proxy
    upstream: FakeUpstream
    origin: str  # what the SDK's baseURL starts with
    explicit_proxy: bool


@pytest.fixture(scope="module")
def driver() -> Path:
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("the Node.js SDKs are not installed: run `make node-deps` (npm ci in tests/node)")
    return NODE_DIR / "driver.mjs"


def module_proxy(factory, confdir: Path, *extra: str, **options: str) -> Proxy:
    workdir = factory.mktemp("proxy")
    return Proxy(workdir, confdir, {"ai_cache_dir": str(workdir / "cache"), **options}, list(extra)).start()


@pytest.fixture(scope="module")
def reverse(tmp_path_factory, confdir, upstream) -> Iterator[Route]:
    proxy = module_proxy(tmp_path_factory, confdir, "--mode", f"reverse:{upstream.url}")
    yield Route(proxy, upstream, proxy.url, explicit_proxy=False)
    proxy.stop()


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory) -> Iterator[FakeUpstream]:
    server = FakeUpstream(tls=make_tls_cert(str(tmp_path_factory.mktemp("tls")))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def regular(tmp_path_factory, confdir, tls_upstream) -> Iterator[Proxy]:
    """One regular-mode proxy for both plain HTTP and HTTPS providers."""
    proxy = module_proxy(tmp_path_factory, confdir, ssl_verify_upstream_trusted_ca=tls_upstream.tls[0])
    yield proxy
    proxy.stop()


@pytest.fixture(params=["reverse", "proxy-http", "proxy-https"])
def route(request) -> Route:
    if request.param == "reverse":
        return request.getfixturevalue("reverse")
    proxy = request.getfixturevalue("regular")
    upstream = request.getfixturevalue("upstream" if request.param == "proxy-http" else "tls_upstream")
    return Route(proxy, upstream, upstream.url, explicit_proxy=True)


def run_driver(driver: Path, route: Route, case: Case, prompt: str, model: str) -> dict[str, Any]:
    job = {
        "sdk": case.sdk, "call": case.call, "tools": case.tools, "prompt": prompt, "model": model,
        "baseURL": route.origin + ("/v1" if case.sdk == "openai" else ""),
        "headers": {"x-fake-scenario": f"late-end-{LATE_MS}"} if case.late else {},
        "proxy": route.proxy.url if route.explicit_proxy else None,
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NODE_EXTRA_CA_CERTS"] = str(route.proxy.confdir / "mitmproxy-ca-cert.pem")
    done = subprocess.run([NODE, str(driver), json.dumps(job)], cwd=NODE_DIR, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def expected_summary(case: Case, prompt: str) -> dict[str, Any]:
    if case.call == "embeddings":
        return {"dimensions": 8}
    if case.tools:
        return {"text": "", "tool": {"name": "get_weather", "arguments": json.loads(TOOL_ARGS)}}
    return {"text": f"echo: {prompt}"}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_node_sdk_miss_then_hit_with_one_upstream_call(driver, route, case, marker):
    prompt = f"weather in Paris? {marker}"
    model = f"{case.model}-{marker}"  # so that the test finds its own log line
    result = run_driver(driver, route, case, prompt, model)
    miss, hit = result["miss"], result["hit"]

    assert (miss["status"], hit["status"]) == ("MISS", "HIT")
    assert hit["output"] == miss["output"]
    assert miss["summary"] == expected_summary(case, prompt)
    assert route.upstream.count(marker) == 1

    stored = log_lines(route.proxy, rf"MISS \S+ {model} ")
    # Not "stored (complete; then Client disconnected)": unlike openai-python, the Node SDKs
    # read the body to its end after [DONE] / message_stop / response.completed ...
    assert len(stored) == 1 and stored[0].endswith(": stored"), stored
    if case.late:
        assert miss["ms"] >= LATE_MS  # ... so a MISS lasts until the provider ends the body
