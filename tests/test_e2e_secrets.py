"""No credential ever reaches an entry, a Redis value, an export or a log line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from helpers import (
    CHAT,
    STREAMS,
    chat_body,
    post,
    redis_key,
    stream_raw,
    wait_for_redis_key,
    wait_for_status,
    wait_for_stored,
)

SECRETS = {
    "authorization": "Bearer sk-SECRET-authorization",
    "x-api-key": "SECRET-x-api-key",
    "api-key": "SECRET-azure-api-key",
    "x-goog-api-key": "SECRET-goog-api-key",
    "cookie": "session=SECRET-cookie",
    "proxy-authorization": "Basic SECRET-proxy-authorization",
}
QUERY_SECRET = "SECRET-query-key"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_credentials_never_reach_cache_redis_exports_or_logs(start_proxy, start_redis, upstream, marker, tmp_path):
    server = start_redis()
    proxy = start_proxy(ai_cache_redis_url=server.url, flow_detail="0")
    gemini_path, gemini_body, _ = STREAMS["gemini"]
    answers = [
        post(proxy, upstream, CHAT + f"?key={QUERY_SECRET}", chat_body(marker), SECRETS),
        stream_raw(proxy, upstream, CHAT + f"?api_key={QUERY_SECRET}", chat_body(marker, stream=True), SECRETS)[0],
        stream_raw(proxy, upstream, gemini_path + f"&key={QUERY_SECRET}", gemini_body(marker), SECRETS)[0],
    ]
    # The upstream did get the credentials: the proxy forwards them, it just never keeps them.
    assert any(r.headers.get("x-api-key") == SECRETS["x-api-key"] for r in upstream.requests if r.contains(marker))
    client = redis.Redis(port=server.port)
    for answer in answers:
        wait_for_redis_key(client, redis_key(answer))
    wait_for_status(proxy, upstream, chat_body(marker), "HIT")
    export_dir = tmp_path / "export"
    exported = subprocess.run(
        [
            str(Path(sys.executable).parent / "ai-cache"),
            "--dir",
            proxy.options["ai_cache_dir"],
            "export",
            str(export_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    proxy.stop()

    redis_values = b"".join(client.get(k) or b"" for k in client.keys("*"))
    for secret in [*SECRETS.values(), QUERY_SECRET]:
        needle = secret.split(" ")[-1].split("=")[-1].encode()
        assert not files_containing(Path(proxy.options["ai_cache_dir"]), needle), secret
        assert not files_containing(export_dir, needle), secret
        assert needle not in redis_values, secret
        assert needle.decode() not in proxy.logs(), secret
    assert len(list(export_dir.glob("*.json"))) == 3


SECRET = "SECRETVALUE"


# Credential query parameters beyond the old fixed list, and the user's own
# (ai_cache_secret_params), never reach a store, an export, `ls --json` or a log line.
def test_credential_query_parameters_are_never_kept(start_proxy, start_redis, upstream, marker, cli, tmp_path):
    server = start_redis()
    proxy = start_proxy(ai_cache_redis_url=server.url, ai_cache_secret_params="X-Tenant-Pass, other", flow_detail="0")
    names = [
        "subscription-key",
        "Code",
        "sig",
        "access-token",
        "Password",
        "client_secret",
        "signature",
        "token",
        "secret",
        "x-tenant-pass",
    ]

    def query(n: int) -> str:
        return "?api-version=1&" + "&".join(f"{name}={SECRET}{n}{i}" for i, name in enumerate(names))

    first = post(proxy, upstream, CHAT + query(1), chat_body(marker))
    client = redis.Redis(port=server.port)
    wait_for_redis_key(client, redis_key(first))
    second = post(proxy, upstream, CHAT + query(2), chat_body(marker))
    assert second.headers["x-ai-cache-status"] == "HIT"  # not part of the key
    other_version = post(proxy, upstream, CHAT + query(1).replace("version=1", "version=2"), chat_body(marker))
    assert other_version.headers["x-ai-cache-status"] == "MISS"  # the rest of the query still is
    wait_for_stored(proxy, 2)
    cache_dir = Path(proxy.options["ai_cache_dir"])
    code, listed, _ = cli("--dir", cache_dir, "ls", "--json")
    assert code == 0 and marker in listed
    cli("--dir", cache_dir, "export", tmp_path / "export")
    proxy.stop()

    exported = "".join("".join(p.read_text().split()) for p in (tmp_path / "export").iterdir())
    assert '["api-version","1"]' in exported and '["api-version","2"]' in exported  # the rest stays
    files = [p for p in [*cache_dir.rglob("*"), *(tmp_path / "export").iterdir()] if p.is_file()]
    places = {
        "ls --json": listed.encode(),
        "logs": proxy.logs().encode(),
        "redis": b"".join(client.get(k) or b"" for k in client.keys("*")),
        **{str(p): p.read_bytes() for p in files},
    }
    assert {place for place, data in places.items() if SECRET.encode() in data} == set()
