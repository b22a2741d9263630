"""Protocol-independent helpers for describing an entry to humans: where in a stream
usage is reported, the text inside a message's content, one short line of it."""

from __future__ import annotations

from typing import Any

from .sse import Event, iter_events, tail_events


def edge_events(body: bytes, fmt: str, span: int = 16384) -> list[Event]:
    """The first and last events of a stream: where providers report usage (Anthropic's
    input tokens in message_start, everyone's totals at the end). Parsing only these keeps
    a many-megabyte stream cheap to summarise."""
    if len(body) <= 2 * span:
        return iter_events(body, fmt)
    head = body[: body.rfind(b"\n", 0, span) + 1]
    return iter_events(head, fmt) + tail_events(body, fmt, span)[0]


def text_of(content: Any) -> str:
    """The text in a message's content, whichever provider's shape it has: a string, a
    list of parts, or a part with `text`/`content`/`input_text`/`parts`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        return " ".join(text_of(part) for part in content)
    if isinstance(content, dict):
        for name in ("text", "content", "input_text", "parts"):
            if name in content:
                return text_of(content[name])
    return ""


def one_line(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
