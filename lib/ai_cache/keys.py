"""The cache key: exactly what determines a provider's answer, and never a credential.

SHA-256 over a canonical form: method, host, path, query minus credentials, the stream
flag, response-determining headers, an optional scope hash, and the JSON body parsed and
re-serialised with sorted keys, so key order and whitespace never split entries.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from .normalize import Normalizer
from .protocols import Protocol, answer_headers

KEY_VERSION = "ai-cache/1"
# Query parameters that carry credentials (compared lower-cased): API keys, Azure APIM's
# subscription-key, Azure Functions' code, SAS signatures, OAuth tokens and secrets.
CREDENTIAL_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "subscription-key",
        "code",
        "sig",
        "signature",
        "token",
        "access_token",
        "access-token",
        "id_token",
        "refresh_token",
        "auth",
        "auth_token",
        "secret",
        "client_secret",
        "password",
        "pwd",
    }
)
# Deeper request bodies are not cached: nothing real nests this deep, and deep values
# break recursive encoders (export, exceeding Python's recursion limit) further down.
MAX_NESTING = 64
JSON_CONTAINERS = frozenset({dict, list})
# A stored request copy larger than this keeps a preview and a hash, not the whole body:
# every hit decodes the entry, and a 50 MB prompt's copy made each one take 0.5 s.
REQUEST_COPY_LIMIT = 64 * 1024
PREVIEW_CHARS = 1024


@dataclass(frozen=True)
class KeyPolicy:
    """User choices about the key: fields to ignore, tenant scoping, host or not,
    volatile text to normalise."""

    ignore_fields: tuple[str, ...] = ()
    scope_headers: tuple[str, ...] = ()
    include_host: bool = True
    secret_params: frozenset[str] = frozenset()  # lower-cased, on top of CREDENTIAL_PARAMS
    normalize: Normalizer = Normalizer()


@dataclass(frozen=True)
class CacheableRequest:
    """A recognised request with a JSON object body, with everything later steps need.

    When `refused` says why, the body cannot be keyed safely: it is not cached (no key)."""

    key: str
    stream: bool
    model: str
    body: dict[str, Any]
    # What the key was computed from, minus credentials: stored with the entry for review.
    described: dict[str, Any] = field(repr=False)
    refused: str = ""
    # The key's material before the body: with another body, the key of a like request.
    head: tuple[Any, ...] = field(default=(), repr=False)


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


def safe_query(request: http.Request, secret: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Query pairs without credentials (and the `secret` names), sorted: order never matters."""
    if "?" not in request.path:
        return []
    return sorted(
        (k, v)
        for k, v in request.query.items(multi=True)
        if k.lower() not in CREDENTIAL_PARAMS and k.lower() not in secret
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


def keyed_body(body: dict[str, Any], policy: KeyPolicy) -> dict[str, Any]:
    """The body as the key sees it: ignored fields left out, string values normalised."""
    body = without_fields(body, policy.ignore_fields)
    return policy.normalize(body) if policy.normalize else body


def nesting(value: Any) -> int:
    """How many arrays/objects deep a parsed JSON value goes, counted level by level (no
    recursion). Scalars are passed over at C speed: a long token array costs ~12 ns an item."""
    depth, level = 0, [value] if type(value) in JSON_CONTAINERS else []
    while level:
        depth += 1
        children: list[Any] = []
        for node in level:
            items = node.values() if type(node) is dict else node
            if not JSON_CONTAINERS.isdisjoint(map(type, items)):
                children += [item for item in items if type(item) in JSON_CONTAINERS]
        level = children
    return depth


def read_body(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The body as a JSON object (None when it is not one) and why it cannot be keyed
    safely, or "". Readers disagree on duplicate keys (Python keeps the last, others the
    first: the key would describe another prompt than the provider answers), on NaN and
    Infinity (not JSON) and on numbers too large for a double."""
    problems: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) < len(items):
            twice = next(k for k, n in Counter(k for k, _ in items).items() if n > 1)
            problems.append(f"duplicate key {twice!r} in the body")
        return obj

    def constant(name: str) -> float:
        problems.append(f"{name} in the body (not JSON)")
        return float(name)

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            problems.append(f"number {text[:24]} in the body is out of range")
        return value

    try:
        body = json.loads(raw, object_pairs_hook=pairs, parse_constant=constant, parse_float=number)
    except (ValueError, RecursionError):
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    # Deeper than MAX_NESTING takes more brackets than that: most bodies need no walk.
    if not problems and raw.count(b"[") + raw.count(b"{") > MAX_NESTING and nesting(body) > MAX_NESTING:
        problems.append(f"body nested deeper than {MAX_NESTING} levels")
    return body, problems[0] if problems else ""


def stored_request(described: dict[str, Any]) -> dict[str, Any]:
    """The request copy an entry keeps: a body over REQUEST_COPY_LIMIT becomes a preview
    and the SHA-256 of its canonical JSON (runs in the write's worker thread)."""
    text = canonical_json(described["body"]).encode()
    if len(text) <= REQUEST_COPY_LIMIT:
        return described
    copy = {k: v for k, v in described.items() if k != "body"}
    preview = text[:PREVIEW_CHARS].decode("utf-8", "ignore")
    digest = hashlib.sha256(text).hexdigest()
    return copy | {"body_preview": preview, "body_size": len(text), "body_sha256": digest}


def scope_digest(headers: dict[str, str], names: tuple[str, ...]) -> str:
    """A hash of the scoping headers' values: isolates tenants without storing them."""
    if not names:
        return ""
    material = "\n".join(f"{n}={headers.get(n, '')}" for n in names)
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def cacheable_request(
    request: http.Request, headers: dict[str, str], protocol: Protocol, policy: KeyPolicy
) -> CacheableRequest | None:
    """The cacheable view of a recognised request, or None when its body is not a JSON object."""
    try:  # `content` looks the encoding up again, from mitmproxy's case-insensitive headers
        raw = request.content if "content-encoding" in headers else request.raw_content
    except ValueError:
        return None
    body, refused = read_body(raw) if raw else (None, "")
    if body is None:
        return None
    path = path_of(request)
    query = safe_query(request, policy.secret_params)
    stream = protocol.wants_stream(body, path)
    answering = {h: headers[h] for h in answer_headers() if h in headers}
    described = {
        "method": request.method,
        "scheme": request.scheme,
        "host": host_of(request),
        "path": path,
        "query": query,
        "headers": answering,
        "body": body,
    }
    model = protocol.model(body, path)
    if refused:
        return CacheableRequest("", stream, model, body, described, f"not cacheable: {refused}")
    head = (
        KEY_VERSION,
        request.method,
        described["host"] if policy.include_host else "",
        path,
        query,
        answering,
        scope_digest(headers, policy.scope_headers),
        stream,
    )
    try:
        key = hashlib.sha256(canonical_json([*head, keyed_body(body, policy)]).encode()).hexdigest()
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800"): no UTF-8 text, no entry
        refused = "not cacheable: text that is not valid Unicode (a lone surrogate)"
        return CacheableRequest("", stream, model, body, described, refused)
    return CacheableRequest(key, stream, model, body, described, head=head)


def partition_key(found: CacheableRequest, rest: dict[str, Any], policy: KeyPolicy, identity: Any) -> str:
    """A semantic partition: the key of `found` with its body replaced by `rest` (the body
    minus the embedded text, see protocols.Question), plus the embedder's `identity`.
    Requests in one partition differ only in that text."""
    material = [*found.head, keyed_body(rest, policy), identity]
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()
