"""Per-request cache controls, by HTTP convention (as Kong and LiteLLM honour them).

`X-AI-Cache-Bypass: 1` or `Cache-Control: no-store` bypass the cache, `no-cache` refetches
and overwrites, `max-age=N` refetches older entries, `only-if-cached` never goes upstream;
`X-AI-Cache-Semantic: 0` leaves the semantic layer out.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

CONTROL_PREFIX = "x-ai-cache-"
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Controls:
    bypass: bool = False
    refresh: bool = False
    only_if_cached: bool = False
    max_age: float | None = None
    semantic: bool = True  # `X-AI-Cache-Semantic: 0` turns semantic lookups off for a request


NO_CONTROLS = Controls()


def take_controls(request: http.Request, headers: dict[str, str]) -> Controls:
    """Read the client's directives (`headers`: see keys.header_map) and remove the
    X-AI-Cache-* headers from the request: they never reach upstream."""
    ours = [n for n in headers if n.startswith(CONTROL_PREFIX)]
    if not ours and "cache-control" not in headers:
        return NO_CONTROLS  # most requests: nothing to read or remove
    bypass = headers.get("x-ai-cache-bypass", "").strip().lower() in TRUE_VALUES
    for name in ours:
        del request.headers[name]
    directives: dict[str, str] = {}
    for part in headers.get("cache-control", "").split(","):
        name, _, arg = part.strip().partition("=")
        directives[name.strip().lower()] = arg.strip().strip('"')
    try:
        max_age = float(directives["max-age"]) if "max-age" in directives else None
    except ValueError:
        max_age = None
    return Controls(
        bypass=bypass or "no-store" in directives,
        refresh="no-cache" in directives,
        only_if_cached="only-if-cached" in directives,
        max_age=max_age,
        semantic=headers.get("x-ai-cache-semantic", "").strip().lower() not in FALSE_VALUES,
    )
