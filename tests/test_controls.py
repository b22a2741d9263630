"""Per-request cache controls (controls.py): read from the client's headers, never forwarded."""

from __future__ import annotations

from mitmproxy import http

from ai_cache.controls import Controls, take_controls
from ai_cache.keys import header_map


def request(**headers: str) -> http.Request:
    named = {k.replace("_", "-"): v for k, v in headers.items()}
    return http.Request.make("POST", "https://api.openai.com/v1/chat/completions", b"{}", named)


def test_a_request_without_directives_gets_the_defaults_and_keeps_its_headers():
    req = request(authorization="Bearer k", content_type="application/json")
    before = req.headers.fields
    assert take_controls(req, header_map(req)) == Controls()
    assert req.headers.fields == before


def test_cache_control_directives_are_read():
    req = request(cache_control='no-cache, max-age="30", only-if-cached')
    controls = take_controls(req, header_map(req))
    assert (controls.refresh, controls.max_age, controls.only_if_cached, controls.bypass) == (True, 30.0, True, False)
    assert req.headers["cache-control"]  # a standard header: forwarded as sent
    req = request(cache_control="no-store, max-age=soon")
    assert take_controls(req, header_map(req)) == Controls(bypass=True)


def test_our_headers_are_read_and_removed_whatever_their_case():
    req = request(X_AI_Cache_Bypass="Yes", x_ai_cache_semantic="0", x_ai_cache_other="1", accept="*/*")
    controls = take_controls(req, header_map(req))
    assert controls.bypass and not controls.semantic
    assert [name for name, _ in req.headers.items()] == ["accept", "content-length"]
