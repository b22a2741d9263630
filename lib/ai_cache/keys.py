"""The cache key: exactly what determines a provider's answer, and never a credential.

SHA-256 over a canonical form: method, host, path, query minus credentials, the stream
flag, response-determining headers, an optional scope hash, and the JSON body parsed and
re-serialised with sorted keys, so key order and whitespace never split entries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from .protocols import Protocol, json_object

KEY_VERSION = "ai-cache/1"
# Never in a key, an entry, an export or a log line.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie", "proxy-authorization"}
)
CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "token"})
# Headers that change what the provider answers.
ANSWER_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")


@dataclass(frozen=True)
class KeyPolicy:
    """User choices about the key: fields to ignore, tenant scoping, host or not."""

    ignore_fields: tuple[str, ...] = ()
    scope_headers: tuple[str, ...] = ()
    include_host: bool = True


@dataclass(frozen=True)
class CacheableRequest:
    """A recognised request that can be cached, with everything later steps need."""

    key: str
    stream: bool
    model: str
    body: dict[str, Any]
    # What the key was computed from, minus credentials: stored with the entry for review.
    described: dict[str, Any] = field(repr=False)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def header_map(request: http.Request) -> dict[str, str]:
    """Lower-cased header names to values (repeats joined by ", "), read once per request:
    mitmproxy's Headers lookups are case-insensitive scans, costly when repeated."""
    found: dict[str, str] = {}
    for raw_name, raw_value in request.headers.fields:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", "surrogateescape")
        found[name] = f"{found[name]}, {value}" if name in found else value
    return found


def safe_query(request: http.Request) -> list[tuple[str, str]]:
    """Query pairs without credentials, sorted: parameter order never matters."""
    if "?" not in request.path:
        return []
    return sorted(
        (k, v) for k, v in request.query.items(multi=True) if k.lower() not in CREDENTIAL_PARAMS
    )


def path_of(request: http.Request) -> str:
    return request.path.split("?", 1)[0]


def host_of(request: http.Request) -> str:
    default = {"http": 80, "https": 443}.get(request.scheme)
    host = request.host.lower()
    return host if request.port == default else f"{host}:{request.port}"


def without_fields(body: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `body` minus the named fields (`user`, `metadata.user_id`)."""
    if not dotted:
        return body
    body = json.loads(json.dumps(body))
    for name in dotted:
        *parents, leaf = name.split(".")
        node: Any = body
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return body


def scope_digest(headers: dict[str, str], names: tuple[str, ...]) -> str:
    """A hash of the scoping headers' values: isolates tenants without storing them."""
    if not names:
        return ""
    material = "\n".join(f"{n}={headers.get(n, '')}" for n in names)
    return hashlib.sha256(material.encode()).hexdigest()


def cacheable_request(
    request: http.Request, headers: dict[str, str], protocol: Protocol, policy: KeyPolicy
) -> CacheableRequest | None:
    """The cacheable view of a recognised request, or None when its body is not a JSON object."""
    try:
        raw = request.content
    except ValueError:
        return None
    body = json_object(raw) if raw else None
    if body is None:
        return None
    path = path_of(request)
    query = safe_query(request)
    stream = protocol.wants_stream(body, path)
    answer_headers = {h: headers[h] for h in ANSWER_HEADERS if h in headers}
    described = {
        "method": request.method,
        "scheme": request.scheme,
        "host": host_of(request),
        "path": path,
        "query": query,
        "headers": answer_headers,
        "body": body,
    }
    material = [
        KEY_VERSION,
        request.method,
        described["host"] if policy.include_host else "",
        path,
        query,
        answer_headers,
        scope_digest(headers, policy.scope_headers),
        stream,
        without_fields(body, policy.ignore_fields),
    ]
    key = hashlib.sha256(canonical_json(material).encode()).hexdigest()
    return CacheableRequest(key, stream, protocol.model(body, path), body, described)
