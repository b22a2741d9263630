"""Node.js behind the proxy: the preload that with-ai-cache puts in NODE_OPTIONS.

Node.js honours HTTPS_PROXY only with NODE_USE_ENV_PROXY=1, and only from 24.0.0 and
22.21.0 on; older releases (20, 22.20 and below) ignore it silently and their fetch goes
straight to the provider. node_preload.js makes undici's EnvHttpProxyAgent the global
dispatcher there. Node has no importable undici of its own, so a pinned copy is
installed once with npm into the user's cache directory (never shipped in this package).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

# The newest 6.x: it runs on Node.js >= 18.17, as the undici inside Node 18 to 22 does.
UNDICI_VERSION = "6.29.1"
PRELOAD = Path(__file__).with_name("node_preload.js")


def node_directory() -> Path:
    """Where the pinned undici lives: ~/.cache/ai-cache/node (or under $XDG_CACHE_HOME)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "ai-cache" / "node"


def undici_path(directory: Path) -> Path:
    return directory / "node_modules" / "undici"


def node_environment(directory: Path, environ: dict[str, str]) -> dict[str, str]:
    """The variables that route a Node.js program's fetch through HTTPS_PROXY."""
    require = f"--require {json.dumps(str(PRELOAD), ensure_ascii=False)}"  # Node's quoting rules
    options = environ.get("NODE_OPTIONS", "")
    if require not in options:
        options = f"{options} {require}".strip()
    return {"NODE_USE_ENV_PROXY": "1", "NODE_OPTIONS": options, "AI_CACHE_UNDICI": str(undici_path(directory))}


def needs_undici() -> bool:
    """Whether the `node` on PATH lacks env-proxy support (asked of the preload itself)."""
    node = shutil.which("node")
    if node is None:
        return False
    try:
        answer = subprocess.run(
            [node, "-p", f"require({json.dumps(str(PRELOAD))}).nativeEnvProxy"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": os.environ.get("PATH", "")},
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return answer.stdout.strip() == "false"


def installed_version(directory: Path) -> str | None:
    try:
        return json.loads((undici_path(directory) / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_undici(directory: Path) -> str | None:
    """Install the pinned undici into `directory` unless it is there; a warning on failure.

    A lock file keeps parallel with-ai-cache runs from installing into one place at once.
    """
    npm = shutil.which("npm")
    if npm is None:
        return "npm not found"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(directory) == UNDICI_VERSION:
            return None
        try:
            done = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(directory),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"undici@{UNDICI_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=300,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"npm failed: {e}"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"npm exited {done.returncode}: {last}"
    return None
