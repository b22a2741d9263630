"""`with-ai-cache`: run any command with its LLM traffic going through the cache.

Starts `mitmdump -s <the packaged addon>` on a free port, runs the command with the proxy
and CA variables that Python, Node and curl honour, stops the proxy, prints its summary
and exits with the command's status. `--env` prints the same variables for a proxy that
is already running.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from .fixture_store import write_unused
from .launch import free_port, mitmdump_command, port_is_free, stop, wait_for_port
from .nodejs import UNDICI_VERSION, ensure_undici, installed_version, needs_undici, node_directory, node_environment
from .options import MODES
from .report import SUMMARY, plural
from .runlog import RunReader

CA_BUNDLE = "ai-cache-ca-bundle.pem"
# Where distributions keep their trust store, for Pythons built with another default.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def proxy_environment(port: int, confdir: Path, environ: dict[str, str]) -> dict[str, str]:
    """Variables that point clients at the proxy and make them trust its CA.

    The variables that replace a client's trust store get the system's CAs plus
    mitmproxy's (hosts reached directly still verify); NODE_EXTRA_CA_CERTS adds to
    Node's own store, so it gets mitmproxy's CA alone."""
    proxy = f"http://127.0.0.1:{port}"
    bundle = str(confdir / CA_BUNDLE)
    return {
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "http_proxy": proxy,
        "SSL_CERT_FILE": bundle,
        "REQUESTS_CA_BUNDLE": bundle,
        "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": str(confdir / "mitmproxy-ca-cert.pem"),
        **node_environment(node_directory(), environ),
    }


def system_ca_file() -> str:
    """The system's trust store as one PEM file: OpenSSL's compiled-in default (not the
    SSL_CERT_FILE we are about to replace), a distribution's bundle, else certifi's."""
    for candidate in (ssl.get_default_verify_paths().openssl_cafile, *SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return candidate
    import certifi

    return certifi.where()


def write_ca_bundle(confdir: Path) -> bool:
    """Write <confdir>/ai-cache-ca-bundle.pem; False while mitmproxy has made no CA yet."""
    try:
        ca = (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    except FileNotFoundError:
        return False
    system = Path(system_ca_file()).read_bytes()
    bundle = system.rstrip(b"\n") + b"\n" + ca
    target = confdir / CA_BUNDLE
    if not target.is_file() or target.read_bytes() != bundle:
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(bundle)
        partial.replace(target)  # readers never see half a bundle
    return True


def prepare_node() -> None:
    """Install the undici that node_preload.js needs when the `node` on PATH needs it."""
    directory = node_directory()
    if installed_version(directory) == UNDICI_VERSION or not needs_undici():
        return
    warn(f"installing undici {UNDICI_VERSION} into {directory} (once) so that this Node.js's fetch uses the proxy")
    problem = ensure_undici(directory)
    if problem:
        warn(
            f"cannot install undici {UNDICI_VERSION} into {directory} ({problem}): the fetch of "
            "this Node.js (< 22.21, or 23) goes around the proxy unless the project has undici"
        )


def warn(message: str) -> None:
    print(f"with-ai-cache: {message}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="with-ai-cache",
        description="Run COMMAND with its HTTP(S) traffic going through the ai-cache proxy.",
        epilog="example: scripts/with-ai-cache --mode replay --dir tests/fixtures -- pytest",
    )
    parser.add_argument("--mode", choices=MODES, default="record")
    parser.add_argument("--dir", help="cache directory (default: the addon's, ~/.cache/ai-cache)")
    parser.add_argument(
        "--fixtures",
        metavar="DIR",
        help="fixture directory served in front of the cache and, in record mode, written (ai_cache_fixtures); "
        "without --dir the cache is a fresh temporary one, so the run depends on the files alone",
    )
    parser.add_argument("--redis-url", help="shared L2 cache, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--port", type=int, help="proxy port (default: a free one; 8080 with --env)")
    parser.add_argument("--confdir", default="~/.mitmproxy", help="mitmproxy's directory holding its CA")
    parser.add_argument("--log", help="write the proxy's output here (default: a temporary file)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="any other mitmproxy or ai_cache_* option, once each",
    )
    parser.add_argument(
        "--env", action="store_true", help="print export lines for a proxy already running on --port, and exit"
    )
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
        if not write_ca_bundle(confdir):
            warn(f"no mitmproxy CA in {confdir} yet: start the proxy once, then run --env again")
        prepare_node()
        for name, value in proxy_environment(args.port or 8080, confdir, dict(os.environ)).items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    port = args.port or free_port()
    if args.port and not port_is_free(port):
        warn(f"port {port} is in use; choose another --port or leave it out")
        return 1
    prepare_node()
    options = {
        "ai_cache_mode": args.mode,
        "confdir": str(confdir),
        "flow_detail": "0",
        "ai_cache_connection_log": "false",
    }
    # With fixtures: the run log, and the L1 unless --dir (the run then depends on the files alone).
    scratch = Path(tempfile.mkdtemp(prefix="ai-cache-"))
    if args.fixtures:
        options["ai_cache_fixtures"] = str(Path(args.fixtures).resolve())
        options["ai_cache_dir"] = str(scratch / "l1")
    if args.dir:
        options["ai_cache_dir"] = str(Path(args.dir).resolve())
    if args.redis_url:
        options["ai_cache_redis_url"] = args.redis_url
    for item in args.set:
        name, _, value = item.partition("=")
        options[name] = value
    if options.get("ai_cache_fixtures"):
        options.setdefault("ai_cache_run_log", str(scratch / "run.jsonl"))
    try:
        return run(args, port, confdir, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, port: int, confdir: Path, options: dict[str, str]) -> int:
    """Run the command through a proxy with these options; its exit status."""
    command = mitmdump_command(port, options)
    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="ai-cache-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        proxy = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            try:  # mitmproxy writes its CA before it listens
                wait_for_port(port, lambda: proxy.poll() is None)
            except RuntimeError as e:
                warn(f"the proxy did not start ({e}); see {log_path}")
                return 1
            write_ca_bundle(confdir)
            environment = dict(os.environ)
            environment.update(proxy_environment(port, confdir, environment))
            try:
                status = subprocess.call(args.command, env=environment)
                if status < 0:  # killed by a signal: exit as a shell would
                    status = 128 - status
            except FileNotFoundError:
                warn(f"command not found: {args.command[0]}")
                return 127
        finally:
            stop(proxy)
    found = list(SUMMARY.finditer(log_path.read_text(errors="replace")))
    report(found[-1] if found else None, log_path)
    if "ai_cache_run_log" in options:
        report_unused(Path(options["ai_cache_fixtures"]), Path(options["ai_cache_run_log"]))
    if status != 0:
        warn(f"command exited {status}; proxy log: {log_path}")
    elif found and not args.log:
        log_path.unlink(missing_ok=True)
    return status


def report(summary: re.Match[str] | None, log_path: Path) -> None:
    """Print the proxy's summary line; warn when no LLM call went through the proxy."""
    if summary is None:
        warn(f"the proxy left no summary; see {log_path}")
        return
    print(summary.group(0), file=sys.stderr)
    if int(summary.group(1)) == 0:
        warn(
            "no LLM call went through the proxy. If the command made any, it ignores "
            "HTTPS_PROXY (see the README on Node.js) or called a host outside ai_cache_hosts."
        )


def report_unused(fixtures: Path, run_log: Path) -> None:
    """Warn about the fixture files that did not load and those the run never used; list
    the unused ones for prune-unused."""
    reader = RunReader(run_log)
    reader.read()
    if not reader.fixtures:  # the proxy did not finish its run
        return
    for name, why in sorted(reader.skipped.items()):
        warn(f"fixture file {fixtures / name} skipped, not loaded: {why}")
    unused = write_unused(fixtures, reader.used, reader.skipped)
    if unused:
        warn(
            f"{plural(len(unused), 'fixture file')} in {fixtures} unused by this run ({', '.join(unused)}): "
            f"ai-cache prune-unused {fixtures} deletes them"
        )


if __name__ == "__main__":
    sys.exit(main())
