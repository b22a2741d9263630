"""Recognising a provider call by method and path (ai_cache.protocols.recognise)."""

from __future__ import annotations

import pytest

from ai_cache.protocols import recognise


@pytest.mark.parametrize(
    "method,path,expected",
    [
        ("POST", "/v1/chat/completions", "openai-chat"),
        ("POST", "/openai/deployments/x/chat/completions", "openai-chat"),
        ("POST", "/v1/completions", "openai-completions"),
        ("POST", "/v1/responses", "openai-responses"),
        ("POST", "/v1/embeddings", "openai-embeddings"),
        ("POST", "/v1/messages", "anthropic-messages"),
        ("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", "gemini"),
        ("POST", "/api/generate", "ollama"),
        ("POST", "/v1/threads/t1/messages", None),
        ("GET", "/v1/chat/completions", None),
        ("POST", "/v1/files", None),
    ],
)
def test_recognition_by_method_and_path(method, path, expected):
    found = recognise(method, path)
    assert (found.name if found else None) == expected
