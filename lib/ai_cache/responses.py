"""Responses ai-cache makes itself: a hit answered at once, the 504 for a miss that may not
go upstream, and the `x-ai-cache-*` headers on every answer."""

from __future__ import annotations

import json
import time

from mitmproxy import http
from mitmproxy.net.http import status_codes

from .entry import Entry
from .nearest import MissExplanation
from .state import FlowState, Status


def make_headers(pairs: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode(), v.encode()) for k, v in pairs])


def add_headers(message: http.Message, headers: list[tuple[str, str]]) -> None:
    """Set these headers, replacing any of the same names, in one rebuild of the fields
    (each `headers[name] = value` rebuilds them all)."""
    names = {name.encode() for name, _ in headers}
    kept = tuple(field for field in message.headers.fields if field[0].lower() not in names)
    message.headers.fields = kept + make_headers(headers).fields


def cache_headers(state: FlowState) -> list[tuple[str, str]]:
    """`x-ai-cache-status`, `-key`, and for a hit `-age` and `-layer` (ai_cache_headers)."""
    headers = [("x-ai-cache-status", str(state.status))]
    if state.key:
        headers.append(("x-ai-cache-key", state.key))
    if state.status is Status.HIT:
        headers += [("x-ai-cache-age", str(int(state.age or 0))), ("x-ai-cache-layer", state.layer or "")]
    if state.similarity is not None:
        headers.append(("x-ai-cache-similarity", f"{state.similarity:.4f}"))
    return headers


def immediate_response(entry: Entry, extra_headers: list[tuple[str, str]]) -> http.Response:
    """Built in one step: `Response.make` would encode an empty body and then rescan the
    headers for content-length (a hit's hot path; stored headers hold no framing ones)."""
    headers = make_headers([*entry.replay_headers(), *extra_headers, ("content-length", str(len(entry.body)))])
    reason = status_codes.RESPONSES.get(entry.status, "").encode()
    now = time.time()
    return http.Response(b"HTTP/1.1", entry.status, reason, headers, entry.body, None, now, now)


def no_recording(
    state: FlowState, why: str, stale: str, explanation: MissExplanation | None, headers: list[tuple[str, str]]
) -> http.Response:
    """The 504 for a miss that may not go upstream (`why`): what is missing, why it missed
    (`stale`, or the prompt, the nearest recording and where it differs) and what to do.
    `x-should-retry: false` stops the SDKs' retries, which cannot help."""
    request = state.request or {}
    what = (
        f"this {state.protocol} request (model {state.model or '-'}, "
        f"{request.get('host', '')}{request.get('path', '')}, key {state.key[:16]})"
    )
    if explanation is None:
        missing, explained = f"the recording of {what} is {stale}", {}
    else:
        missing, explained = f"no recording for {what}: {explanation.sentence()}", explanation.as_json()
    message = (
        f"ai-cache: {missing}; {why} forbids contacting upstream. Record it by running once "
        f"in record mode with the upstream reachable (the proxy's default ai_cache_mode=record; "
        f"under pytest --ai-cache-mode=record)."
    )
    body = {
        "type": "error",
        "error": {
            "type": "ai_cache_miss",
            "code": "ai_cache_no_recording",
            "message": message,
            "key": state.key,
            **explained,
        },
    }
    return http.Response.make(
        504,
        json.dumps(body),
        make_headers([("content-type", "application/json"), ("x-should-retry", "false"), *headers]),
    )
