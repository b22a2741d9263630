"""ai_cache.keys: what a cache key depends on, and what it never does (credentials)."""

from __future__ import annotations

import json

from ai_cache.keys import KeyPolicy, cacheable_request, header_map
from ai_cache.protocols import recognise
from helpers import chat_flow


def test_keys_ignore_credentials_but_not_answer_headers():
    policy = KeyPolicy()
    protocol = recognise("POST", "/v1/messages")
    base = chat_flow({"model": "c"}, "/v1/messages?key=a", x_api_key="one").request
    same = chat_flow({"model": "c"}, "/v1/messages?key=b", x_api_key="two").request
    other = chat_flow({"model": "c"}, "/v1/messages", anthropic_version="2023-06-01").request
    keys = [cacheable_request(r, header_map(r), protocol, policy).key for r in (base, same, other)]
    assert keys[0] == keys[1] != keys[2]
    described = cacheable_request(base, header_map(base), protocol, policy).described
    assert "one" not in json.dumps(described) and "key" not in dict(described["query"])
