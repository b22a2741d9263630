"""Parsers for captured stream bodies: SSE events and NDJSON lines.

A capture is judged by its tail (`tail_events`), so a many-megabyte stream costs about
as much as a small one; `iter_events` parses a whole body, in a worker thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: its type (`message` when no `event:` line) and joined data."""

    name: str
    data: str


EventSink = Callable[[Event], None]


class LineSplitter:
    """Splits a byte stream into complete lines; a partial line waits for its end."""

    def __init__(self) -> None:
        self._partial: list[bytes] = []

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        if b"\n" not in chunk:
            if chunk:
                self._partial.append(chunk)
            return
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial = []
        *lines, rest = chunk.split(b"\n")
        if rest:
            self._partial.append(rest)
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line

    @property
    def partial(self) -> bytes:
        """The bytes after the last newline: non-empty means the stream stopped mid-line."""
        return b"".join(self._partial)

    def take_partial(self) -> bytes:
        rest, self._partial = self.partial, []
        return rest


class SSEScanner:
    """WHATWG event-stream parsing; calls `sink` per dispatched event.

    Comment lines (`: keepalive`) dispatch nothing. `at_boundary` tells whether the bytes
    seen so far end between frames, so a cut-off final frame never counts as an event.
    """

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._lines = LineSplitter()
        self._name = ""
        self._data: list[str] = []
        self._pending = False

    def feed(self, chunk: bytes) -> None:
        for raw in self._lines.feed(chunk):
            if not raw:
                self._dispatch()
                continue
            if raw.startswith(b":"):
                continue
            field, sep, value = raw.partition(b":")
            if sep and value.startswith(b" "):
                value = value[1:]
            self._pending = True
            if field == b"data":
                self._data.append(value.decode("utf-8", "replace"))
            elif field == b"event":
                self._name = value.decode("utf-8", "replace")

    def _dispatch(self) -> None:
        if self._data:
            self._sink(Event(self._name or "message", "\n".join(self._data)))
        self._name = ""
        self._data = []
        self._pending = False

    @property
    def at_boundary(self) -> bool:
        return not self._pending and not self._lines.partial.strip()


class NDJSONScanner:
    """One event per non-empty line; a final line without newline counts only if it parses."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._lines = LineSplitter()

    def feed(self, chunk: bytes) -> None:
        for raw in self._lines.feed(chunk):
            if raw.strip():
                self._sink(Event("message", raw.decode("utf-8", "replace")))

    def finish(self) -> None:
        """Flush a trailing line that lacks its newline (it is judged by its content)."""
        rest = self._lines.take_partial()
        if rest.strip():
            self._sink(Event("message", rest.decode("utf-8", "replace")))

    @property
    def at_boundary(self) -> bool:
        return not self._lines.partial.strip()


LONE_CR = re.compile(rb"\r(?!\n)")


def with_lf(body: bytes) -> bytes:
    """Lone CR line ends (which the SSE spec allows) as LF; whole bodies only, not chunks."""
    return LONE_CR.sub(b"\n", body) if b"\r" in body else body


def tail_events(body: bytes, fmt: str, window: int = 4096) -> tuple[list[Event], bool]:
    """The events in the last frames of a body, and whether it ends between frames.

    Only the tail is parsed (from a frame boundary, widening until an event shows), so
    judging a many-megabyte stream costs about as much as judging a small one.
    """
    if fmt == "ndjson":
        last = body.rstrip().rsplit(b"\n", 1)[-1]
        return ([Event("message", last.decode("utf-8", "replace"))] if last.strip() else []), True
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
        events: list[Event] = []
        scanner = SSEScanner(events.append)
        scanner.feed(tail)
        if events or start == 0:
            return events, scanner.at_boundary
        window *= 4


def iter_events(body: bytes, fmt: str) -> list[Event]:
    """All events of a body, for the full error search and summaries (never on the event loop)."""
    events: list[Event] = []
    if fmt == "ndjson":
        scanner = NDJSONScanner(events.append)
        scanner.feed(body)
        scanner.finish()
    else:
        SSEScanner(events.append).feed(with_lf(body) + b"\n\n")
    return events
