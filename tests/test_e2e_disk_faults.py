"""End to end: the cache directory on a disk that refuses writes, read-only or full.
Real mount namespaces (unshare, a bind mount, a small tmpfs); skipped where none can be made."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import BIN, Proxy
from helpers import CHAT, chat_body, post, wait_for_stored


# A read-only cache directory (a read-only checkout of recorded fixtures) turned L1
# off entirely, because diskcache writes its settings when it opens: replay answered
# 504 for recorded entries and `ai-cache stats` failed. Tests run as root, for whom
# chmod changes nothing: a read-only bind mount in a private mount namespace is real.
def namespace_problem() -> str | None:
    """Why this machine cannot mount in a private namespace, or None."""
    if not (shutil.which("unshare") and shutil.which("mount")):
        return "unshare or mount missing"
    with tempfile.TemporaryDirectory() as probe:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, text=True
        )
    return f"cannot mount in a private mount namespace: {done.stderr.strip()}" if done.returncode else None


needs_mounts = pytest.mark.skipif(bool(problem := namespace_problem()), reason=problem or "")


def in_namespace(setup: str, command: list[str]) -> list[str]:
    """`command` in a private mount namespace prepared by the shell line `setup`."""
    return ["unshare", "-m", "sh", "-c", f'{setup} && exec "$@"', "sh", *command]


class NamespacedProxy(Proxy):
    """The real mitmdump, started inside a private mount namespace (see `in_namespace`)."""

    def __init__(self, setup: str, *args) -> None:
        super().__init__(*args)
        self.setup = setup

    def command(self) -> list[str]:
        return in_namespace(self.setup, super().command())


@pytest.fixture
def start_namespaced_proxy(tmp_path, confdir):
    started: list[Proxy] = []

    def start(setup: str, **options: str) -> Proxy:
        proxy = NamespacedProxy(setup, tmp_path, confdir, options, []).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def read_only(directory) -> str:
    return f"mount --bind -o ro {directory} {directory}"


@needs_mounts
@pytest.mark.parametrize("writer_ended", ["cleanly", "killed"])  # killed: its WAL is left behind
def test_a_read_only_cache_directory_still_answers(start_proxy, start_namespaced_proxy, upstream, marker, writer_ended):
    recorder = start_proxy()
    directory = recorder.options["ai_cache_dir"]
    recorded = post(recorder, upstream, CHAT, chat_body(marker))
    wait_for_stored(recorder)
    if writer_ended == "killed":
        recorder.proc.kill()
        recorder.proc.wait()
    recorder.stop()
    replay = start_namespaced_proxy(read_only(directory), ai_cache_dir=directory, ai_cache_mode="replay")
    hit = post(replay, upstream, CHAT, chat_body(marker))
    assert (hit.status_code, hit.headers["x-ai-cache-status"]) == (200, "HIT")
    assert hit.content == recorded.content
    record = start_namespaced_proxy(read_only(directory), ai_cache_dir=directory)
    for _ in range(2):  # a new question passes through, and is never stored
        new = post(record, upstream, CHAT, chat_body(f"{marker} new"))
        assert (new.status_code, new.headers["x-ai-cache-status"]) == (200, "MISS")
    assert post(record, upstream, CHAT, chat_body(marker)).headers["x-ai-cache-status"] == "HIT"
    assert upstream.count(marker) == 3
    record.stop()
    assert record.logs().count("cannot write to cache directory") == 1
    stats = subprocess.run(
        in_namespace(read_only(directory), [str(BIN / "ai-cache"), "--dir", directory, "stats", "--json"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["entries"] == 1


# A full disk made the log lie: every flow said "stored" before its write failed, the
# summary counted those, and the "L1 write failed" / "works again" warnings alternated
# with every lookup that still worked. A real full disk: a small tmpfs.
def rows_in(proxy: Proxy, directory: str) -> int:
    """Entries in the proxy's cache database, read inside its mount namespace."""
    count = (
        "import sqlite3, sys; print(sqlite3.connect(f'file:{sys.argv[1]}/cache.db?mode=ro', uri=True)"
        ".execute('SELECT count(*) FROM Cache').fetchone()[0])"
    )
    done = subprocess.run(
        ["nsenter", "-t", str(proxy.proc.pid), "-m", sys.executable, "-c", count, directory],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(done.stdout)


@needs_mounts
def test_a_full_disk_never_makes_the_log_say_stored(start_namespaced_proxy, upstream, marker, tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    directory = str(mount / "cache")
    proxy = start_namespaced_proxy(f"mount -t tmpfs -o size=512k tmpfs {mount}", ai_cache_dir=directory)
    n = 60
    for i in range(n):  # 2 KiB prompts: the disk is full after a few dozen entries
        answer = post(proxy, upstream, CHAT, chat_body(f"{marker} {i} " + "x" * 2048))
        assert (answer.status_code, answer.headers["x-ai-cache-status"]) == (200, "MISS")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proxy.logs().count("MISS openai-chat") < n:
        time.sleep(0.05)  # each flow's line comes once its write finished
    rows = rows_in(proxy, directory)
    proxy.stop()
    logs = proxy.logs()
    assert 0 < rows < n  # the disk did fill up
    assert logs.count("json: stored") == rows
    assert f"; {rows} stored, {n - rows} not stored (L1 write failed: {n - rows});" in logs  # the summary
    assert logs.count("L1 write failed in") == 1 and "work again" not in logs  # one warning
