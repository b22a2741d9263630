"""Provider protocol families: is this request mine, does it stream, did the stream finish?

Recognition is by method and path shape on any host, so OpenAI-compatible servers
(Azure, Ollama's /v1, vLLM, OpenRouter, Groq...) are covered without a host list.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .sse import Event


def json_object(text: str | bytes) -> dict[str, Any] | None:
    """The parsed JSON object, or None for anything else (arrays, garbage, truncation)."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


class Protocol:
    """One family. Subclasses override only what differs from OpenAI chat."""

    name = "openai-chat"
    path_pattern = re.compile(r"/chat/completions$")
    stream_format = "sse"
    # Byte strings every error event contains: a stream without any of them needs no
    # event-by-event search, which keeps the capture at memory speed.
    error_needles: tuple[bytes, ...] = (b'"error"',)

    def matches(self, path: str) -> bool:
        return bool(self.path_pattern.search(path))

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        """Only a JSON `true` makes a streaming request."""
        return body.get("stream") is True

    def model(self, body: dict[str, Any], path: str) -> str:
        model = body.get("model")
        if isinstance(model, str):
            return model
        azure = re.search(r"/deployments/([^/]+)/", path)
        return azure.group(1) if azure else ""

    def event_type(self, event: Event) -> str:
        """The SSE `event:` name, else the JSON `type` field some servers send instead."""
        if event.name != "message":
            return event.name
        obj = json_object(event.data) if '"type"' in event.data else None
        kind = obj.get("type") if obj else None
        return kind if isinstance(kind, str) else "message"

    def is_terminal(self, event: Event) -> bool:
        return event.data == "[DONE]"

    def is_error(self, event: Event) -> bool:
        # Cheap substring test first: this runs for every event of every captured stream.
        if '"error"' not in event.data:
            return False
        obj = json_object(event.data)
        return obj is not None and "error" in obj


class OpenAICompletions(Protocol):
    name = "openai-completions"
    path_pattern = re.compile(r"(?<!/chat)/completions$")


class OpenAIResponses(Protocol):
    name = "openai-responses"
    path_pattern = re.compile(r"/responses$")
    failures = frozenset({"error", "response.failed", "response.incomplete"})
    error_needles = (b'"error"', b"event: error", b"event:error", b"response.failed", b"response.incomplete")

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "response.completed"

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and not any(f in event.data for f in self.failures):
            return False
        return self.event_type(event) in self.failures


class OpenAIEmbeddings(Protocol):
    name = "openai-embeddings"
    path_pattern = re.compile(r"/embeddings$")
    stream_format = ""

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        return False


class AnthropicMessages(Protocol):
    name = "anthropic-messages"
    # Not OpenAI Assistants' /threads/{id}/messages.
    path_pattern = re.compile(r"^(?!.*/threads/).*/messages$")
    error_needles = (b'"error"', b"event: error", b"event:error")

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "message_stop"

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and '"error"' not in event.data:
            return False
        return self.event_type(event) == "error"


class Gemini(Protocol):
    name = "gemini"
    path_pattern = re.compile(r"/models/[^/]+:(generateContent|streamGenerateContent)$")

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        return path.endswith(":streamGenerateContent")

    def model(self, body: dict[str, Any], path: str) -> str:
        found = re.search(r"/models/([^/:]+):", path)
        return found.group(1) if found else ""

    def is_terminal(self, event: Event) -> bool:
        """No sentinel: the last event must carry a finishReason."""
        obj = json_object(event.data)
        candidates = obj.get("candidates") if obj else None
        return isinstance(candidates, list) and any(
            isinstance(c, dict) and c.get("finishReason") for c in candidates
        )


class OllamaNative(Protocol):
    name = "ollama"
    path_pattern = re.compile(r"/api/(chat|generate)$")
    stream_format = "ndjson"

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        """Ollama streams unless told `"stream": false`."""
        return body.get("stream", True) is not False

    def is_terminal(self, event: Event) -> bool:
        obj = json_object(event.data)
        return obj is not None and obj.get("done") is True


PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(),
    OpenAICompletions(),
    OpenAIResponses(),
    OpenAIEmbeddings(),
    AnthropicMessages(),
    Gemini(),
    OllamaNative(),
)
BY_NAME = {p.name: p for p in PROTOCOLS}


def recognise(method: str, path: str) -> Protocol | None:
    """The family of a request, or None: everything else passes through untouched."""
    if method != "POST":
        return None
    for protocol in PROTOCOLS:
        if protocol.matches(path):
            return protocol
    return None
