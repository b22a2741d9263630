"""`scripts/with-ai-cache`: run any command with its LLM traffic going through the cache.

Starts `mitmdump -s ai_cache_addon.py` on a free port, runs the command with the proxy
and CA variables that Python, Node and curl honour, stops the proxy and exits with the
command's status. `--env` prints the same variables for a proxy that is already running.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .options import MODES

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "ai_cache_addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def proxy_environment(port: int, confdir: Path) -> dict[str, str]:
    """Variables that point clients at the proxy and make them trust its CA."""
    proxy = f"http://127.0.0.1:{port}"
    ca = str(confdir / "mitmproxy-ca-cert.pem")
    return {
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
        "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca,
        "NODE_EXTRA_CA_CERTS": ca, "NODE_USE_ENV_PROXY": "1",
    }


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="with-ai-cache",
        description="Run COMMAND with its HTTP(S) traffic going through the ai-cache proxy.",
        epilog="example: scripts/with-ai-cache --mode replay --dir tests/fixtures -- pytest",
    )
    parser.add_argument("--mode", choices=MODES, default="record")
    parser.add_argument("--dir", help="cache directory (default: the addon's, ~/.cache/ai-cache)")
    parser.add_argument("--redis-url", help="shared L2 cache, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--port", type=int, help="proxy port (default: a free one; 8080 with --env)")
    parser.add_argument("--confdir", default="~/.mitmproxy", help="mitmproxy's directory holding its CA")
    parser.add_argument("--log", help="write the proxy's output here (default: a temporary file)")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="any other mitmproxy or ai_cache_* option, once each")
    parser.add_argument("--env", action="store_true",
                        help="print export lines for a proxy already running on --port, and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.env and not args.command:
        parser.error("give a command after --, or --env")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    confdir = Path(args.confdir).expanduser()
    if args.env:
        for name, value in proxy_environment(args.port or 8080, confdir).items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    port = args.port or free_port()
    if args.port and not port_is_free(port):
        print(f"with-ai-cache: port {port} is in use; choose another --port or leave it out", file=sys.stderr)
        return 1
    options = {"ai_cache_mode": args.mode, "confdir": str(confdir), "flow_detail": "0"}
    if args.dir:
        options["ai_cache_dir"] = str(Path(args.dir).resolve())
    if args.redis_url:
        options["ai_cache_redis_url"] = args.redis_url
    for item in args.set:
        name, _, value = item.partition("=")
        options[name] = value
    command = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", str(port), "-s", str(ADDON)]
    for name, value in options.items():
        command += ["--set", f"{name}={value}"]
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="ai-cache-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        proxy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            try:  # mitmproxy writes its CA before it listens
                wait_for_port(port, lambda: proxy.poll() is None)
            except RuntimeError as e:
                print(f"with-ai-cache: the proxy did not start ({e}); see {log_path}", file=sys.stderr)
                return 1
            try:
                status = subprocess.call(args.command, env={**os.environ, **proxy_environment(port, confdir)})
                if status < 0:  # killed by a signal: exit as a shell would
                    status = 128 - status
            except FileNotFoundError:
                print(f"with-ai-cache: command not found: {args.command[0]}", file=sys.stderr)
                return 127
        finally:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
    if status != 0:
        print(f"with-ai-cache: command exited {status}; proxy log: {log_path}", file=sys.stderr)
    elif not args.log:
        log_path.unlink(missing_ok=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
