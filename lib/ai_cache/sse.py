"""Parsers for captured stream bodies: SSE events and NDJSON lines.

A capture is judged by its tail (`tail_events`), so a many-megabyte stream costs about
as much as a small one; `iter_events` parses a whole body, in a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LONE_CR = re.compile(rb"\r(?!\n)")


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: its type (`message` when no `event:` line) and joined data."""

    name: str
    data: str


def with_lf(body: bytes) -> bytes:
    """Lone CR line ends (which the SSE spec allows) as LF."""
    return LONE_CR.sub(b"\n", body) if b"\r" in body else body


def parse_sse(body: bytes) -> tuple[list[Event], bool]:
    """The events of an SSE body (WHATWG rules), and whether it ends between frames.

    Comment lines (`: keepalive`) dispatch nothing; a final frame without its blank line
    is no event, so a cut-off stream never counts its last, partial frame.
    """
    events: list[Event] = []
    name, pending = "", False
    data: list[str] = []
    *lines, rest = with_lf(body).split(b"\n")
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if data:
                events.append(Event(name or "message", "\n".join(data)))
            name, data, pending = "", [], False
        elif not line.startswith(b":"):
            field, sep, value = line.partition(b":")
            if sep and value.startswith(b" "):
                value = value[1:]
            pending = True
            if field == b"data":
                data.append(value.decode("utf-8", "replace"))
            elif field == b"event":
                name = value.decode("utf-8", "replace")
    return events, not pending and not rest.strip()


def parse_ndjson(body: bytes) -> list[Event]:
    """One event per non-empty line; a last line without newline is judged by its content."""
    return [Event("message", line.decode("utf-8", "replace")) for line in body.split(b"\n") if line.strip()]


def tail_events(body: bytes, fmt: str, window: int = 4096) -> tuple[list[Event], bool]:
    """The events in the last frames of a body, and whether it ends between frames.

    Only the tail is parsed (from a frame boundary, widening until an event shows), so
    judging a many-megabyte stream costs about as much as judging a small one.
    """
    if fmt == "ndjson":
        last = body.rstrip().rsplit(b"\n", 1)[-1]
        return parse_ndjson(last), True
    while True:
        start = max(0, len(body) - window)
        tail = with_lf(body[start:])
        if start:
            ends = [(at, len(sep)) for sep in (b"\n\n", b"\n\r\n") if (at := tail.find(sep)) >= 0]
            if not ends:
                window *= 4
                continue
            at, size = min(ends)
            tail = tail[at + size :]
        events, at_boundary = parse_sse(tail)
        if events or start == 0:
            return events, at_boundary
        window *= 4


def iter_events(body: bytes, fmt: str) -> list[Event]:
    """All events of a body, a last unterminated frame included (for error searches)."""
    return parse_ndjson(body) if fmt == "ndjson" else parse_sse(body + b"\n\n")[0]
