"""Provider protocol families: is this request mine, does it stream, did the stream finish?

Recognition is by method and path shape on any host, so OpenAI-compatible servers
(Azure, Ollama's /v1, vLLM, OpenRouter, Groq...) are covered without a host list.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .sse import Event


def json_value(text: str | bytes) -> Any:
    """The parsed JSON value; raises ValueError for anything that is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:  # absurdly deep nesting is no answer worth keeping either
        raise ValueError("JSON nested too deeply") from None


def json_object(text: str | bytes) -> dict[str, Any] | None:
    """The parsed JSON object, or None for anything else (arrays, garbage, truncation)."""
    try:
        value = json_value(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


# An `"error"` key with a value that is not null (`"error": null` is in good answers).
# The value's first byte must be present, so a chunk ending at `"error": nu` is no match.
ERROR_KEY = rb'"error"\s*:\s*[\[{"0-9tf-]'


class Protocol:
    """One family. Subclasses override only what differs from OpenAI chat."""

    name = "openai-chat"
    path_pattern = re.compile(r"/chat/completions$")
    # Body fields a real call of this family always has: a JSON POST to a path that only
    # looks like ours (a chat app's /channels/1/messages) passes through untouched.
    required_fields: tuple[str, ...] = ("messages",)
    # Bytes every error event contains, and the pattern that confirms one: a stream
    # without the needle needs no event-by-event search, keeping the capture at memory speed.
    error_needles: tuple[bytes, ...] = (b'"error"',)
    error_pattern = re.compile(ERROR_KEY)
    # Whether the terminal event alone proves the stream complete, however the connection
    # ended after it: SDKs close the response at the sentinel while servers end the body
    # a moment later, so a complete stream often ends in mitmproxy's `error` hook.
    terminal_proves_end = True

    def matches(self, path: str) -> bool:
        return bool(self.path_pattern.search(path))

    def expects(self, body: dict[str, Any]) -> bool:
        return all(name in body for name in self.required_fields)

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
        if '"error"' not in event.data:
            return False
        obj = json_object(event.data)
        return obj is not None and obj.get("error") is not None


class OpenAICompletions(Protocol):
    name = "openai-completions"
    path_pattern = re.compile(r"(?<!/chat)/completions$")
    required_fields = ("prompt",)


class OpenAIResponses(Protocol):
    name = "openai-responses"
    path_pattern = re.compile(r"/responses$")
    failures = frozenset({"error", "response.failed", "response.incomplete"})
    required_fields = ("model",)
    error_needles = (b'"error"', b"event: error", b"event:error", b"response.failed", b"response.incomplete")
    error_pattern = re.compile(ERROR_KEY + rb"|event: ?error\b|response\.failed|response\.incomplete")

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "response.completed"

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and not any(f in event.data for f in self.failures):
            return False
        return self.event_type(event) in self.failures


class OpenAIEmbeddings(Protocol):
    name = "openai-embeddings"
    path_pattern = re.compile(r"/embeddings$")
    required_fields = ("input",)

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        return False


class AnthropicMessages(Protocol):
    name = "anthropic-messages"
    # Not OpenAI Assistants' /threads/{id}/messages.
    path_pattern = re.compile(r"^(?!.*/threads/).*/messages$")
    # Anthropic's API rejects calls without max_tokens, so every real one carries it.
    required_fields = ("model", "messages", "max_tokens")
    error_needles = (b'"error"', b"event: error", b"event:error")
    error_pattern = re.compile(ERROR_KEY + rb"|event: ?error\b")

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "message_stop"

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and '"error"' not in event.data:
            return False
        return self.event_type(event) == "error"


class Gemini(Protocol):
    name = "gemini"
    path_pattern = re.compile(r"/models/[^/]+:(generateContent|streamGenerateContent)$")
    required_fields = ("contents",)
    # No sentinel: a later event could still follow a finishReason, so only a body that
    # ended cleanly counts (clients read Gemini streams to the end of the body anyway).
    terminal_proves_end = False

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
    required_fields = ("model",)

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
