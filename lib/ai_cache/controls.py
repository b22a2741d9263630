"""Per-request cache controls, by HTTP convention (as Kong and LiteLLM honour them).

`X-AI-Cache-Bypass: 1` or `Cache-Control: no-store` bypass the cache, `no-cache` refetches
and overwrites, `max-age=N` refetches older entries, `only-if-cached` never goes upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

CONTROL_PREFIX = "x-ai-cache-"
TRUE_VALUES = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Controls:
    bypass: bool = False
    refresh: bool = False
    only_if_cached: bool = False
    max_age: float | None = None


def take_controls(request: http.Request) -> Controls:
    """Read the client's directives and remove X-AI-Cache-* headers: they never reach upstream."""
    bypass = request.headers.get("x-ai-cache-bypass", "").strip().lower() in TRUE_VALUES
    for name in [n for n in request.headers if n.lower().startswith(CONTROL_PREFIX)]:
        del request.headers[name]
    directives: dict[str, str] = {}
    for value in request.headers.get_all("cache-control"):
        for part in value.split(","):
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
    )
