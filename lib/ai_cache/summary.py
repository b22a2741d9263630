"""What an entry is about, for humans: token usage and a short prompt preview."""

from __future__ import annotations

import json
from typing import Any

from .protocols import json_object
from .sse import Event, iter_events, tail_events

# Provider spellings of (input tokens, output tokens).
USAGE_FIELDS = (
    ("usage", "prompt_tokens", "completion_tokens"),  # OpenAI chat / completions / embeddings
    ("usage", "input_tokens", "output_tokens"),  # Anthropic, OpenAI Responses
    ("usageMetadata", "promptTokenCount", "candidatesTokenCount"),  # Gemini
    ("", "prompt_eval_count", "eval_count"),  # Ollama native
)


def _usage_of(obj: dict[str, Any]) -> tuple[int, int]:
    found_in = found_out = 0
    candidates = [obj]
    for nested in ("response", "message"):  # Responses' response.completed, Anthropic's message_start
        if isinstance(obj.get(nested), dict):
            candidates.append(obj[nested])
    for node in candidates:
        for container, in_name, out_name in USAGE_FIELDS:
            usage = node.get(container) if container else node
            if isinstance(usage, dict):
                i, o = usage.get(in_name), usage.get(out_name)
                found_in = max(found_in, i if isinstance(i, int) else 0)
                found_out = max(found_out, o if isinstance(o, int) else 0)
    return found_in, found_out


def edge_events(body: bytes, fmt: str, span: int = 16384) -> list[Event]:
    """The first and last events of a stream: where providers report usage (Anthropic's
    input tokens in message_start, everyone's totals at the end). Parsing only these keeps
    a many-megabyte stream cheap to summarise."""
    if len(body) <= 2 * span:
        return iter_events(body, fmt)
    head = body[: body.rfind(b"\n", 0, span) + 1]
    return iter_events(head, fmt) + tail_events(body, fmt, span)[0]


def token_usage(body: bytes, fmt: str) -> dict[str, int]:
    """Input/output tokens the answer reports; streams report them cumulatively, so take maxima."""
    if fmt == "json":
        obj = json_object(body)
        objects = [obj] if obj else []
    else:
        objects = [o for e in edge_events(body, fmt) if (o := json_object(e.data))]
    tokens_in = tokens_out = 0
    for obj in objects:
        i, o = _usage_of(obj)
        tokens_in, tokens_out = max(tokens_in, i), max(tokens_out, o)
    return {"input": tokens_in, "output": tokens_out} if tokens_in or tokens_out else {}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        return " ".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        for name in ("text", "content", "input_text", "parts"):
            if name in content:
                return _text_of(content[name])
    return ""


def prompt_preview(body: dict[str, Any], width: int = 60) -> str:
    """The last user text of a request, on one line."""
    for name in ("messages", "contents", "input", "prompt"):
        value = body.get(name)
        if isinstance(value, list) and value:
            value = value[-1]
        text = _text_of(value)
        if text:
            break
    else:
        text = json.dumps(body)[:width]
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
