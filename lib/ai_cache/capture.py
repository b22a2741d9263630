"""Stream capture: a tee set as `flow.response.stream` that forwards every chunk untouched.

It keeps a copy with arrival times (decoded, if the upstream compressed it) and only
watches each chunk for the protocol's error needles. At the end it says whether the
stream is complete by the protocol's rules (terminal event, no error event, ends on a
frame boundary, within the size cap), judging by the tail; a full error search runs in a
thread only when a needle showed. It can never raise: mitmproxy drops a chunk whose
callable raised, and the client's bytes come first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .decoders import DECODE_ERRORS, decoder_for
from .protocols import Protocol, json_value
from .sse import Event, iter_events, tail_events

SEAM = 32  # longer than any error needle
JSON_INLINE_LIMIT = 256 * 1024  # larger JSON answers are parsed in a worker thread


def body_format(content_type: str) -> str:
    """The format tag of an answer, decided by what it actually is."""
    content_type = content_type.lower()
    if "event-stream" in content_type:
        return "sse"
    if "ndjson" in content_type:
        return "ndjson"
    return "json"


def json_body_problem(body: bytes) -> str | None:
    """Why a body is not a storable JSON answer, or None."""
    if not body.strip():
        return "empty body"
    try:
        json_value(body)
    except ValueError:
        return "body is not JSON"
    return None


def describe_error(event: Event) -> str:
    return f"error event in stream: {event.data[:120]}"


class StreamCapture:
    def __init__(self, protocol: Protocol, fmt: str, max_body: int, encoding: str = "") -> None:
        self.protocol = protocol
        self.format = fmt
        self.max_body = max_body
        self.parts: list[bytes] = []
        self.chunks: list[tuple[float, int]] = []
        self.size = 0  # decoded
        self.started: float | None = None
        self.failure: str | None = None
        self._decoder = None
        if (encoding := encoding.strip().lower()) not in ("", "identity"):
            self._decoder = decoder_for(encoding)
            if self._decoder is None:
                self.failure = f"{encoding}-encoded, which cannot be decoded within a size bound here"
        # An error event may be in the stream: all events are searched, off the loop.
        self.suspect = False
        self._needles = protocol.error_needles if fmt != "json" else ()
        self._seam = b""  # the previous chunk's end, for needles split across chunks
        self.listener: Callable[[bytes], None] | None = None  # told every raw chunk (live fan-out)

    def __call__(self, data: bytes) -> bytes:
        if self.listener is not None:
            self.listener(data)
        if data and self.failure is None:
            try:
                self._record(data)
            except Exception as e:  # never let the tee cost the client a chunk
                self.failure = f"capture failed: {e!r}"
                self._release()
        return data

    def _record(self, data: bytes) -> None:
        # Runs for every read of every captured stream: keep it to a few C-level calls.
        if self._decoder is not None:
            try:
                data = self._decoder.decode(data, self.max_body - self.size)
            except DECODE_ERRORS as e:
                self.failure = f"undecodable body: {e}"
                self._release()
                return
            if not data:
                return
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.size += len(data)
        if self.size > self.max_body:
            self.failure = f"larger than ai_cache_max_body ({self.max_body} bytes)"
            self._release()
            return
        self.parts.append(data)
        self.chunks.append((now - self.started, len(data)))
        if self._needles and not self.suspect:
            seam = self._seam + data[:SEAM]
            for needle in self._needles:
                if needle in data or needle in seam:
                    # Confirm (`"error": null` is no error); copies the chunk, but only here.
                    self.suspect = bool(self.protocol.error_pattern.search(self._seam + data))
                    break
            self._seam = data[-SEAM:] if len(data) >= SEAM else seam[-SEAM:]

    def _release(self) -> None:
        self.parts, self.chunks = [], []

    @property
    def body(self) -> bytes:
        """The captured bytes, joined once (after the stream ended)."""
        if len(self.parts) > 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0] if self.parts else b""

    @property
    def needs_full_check(self) -> bool:
        """Whether `full_check` must pass too: it parses everything, so it runs in a thread."""
        return self.suspect or (self.format == "json" and self.size > JSON_INLINE_LIMIT)

    def incompleteness(self) -> str | None:
        """Why the captured answer must not be stored, or None when it is complete.

        Cheap enough for the event loop: streams are judged by their tail, and large JSON
        bodies are left to `full_check`.
        """
        if self.failure:
            return self.failure
        if self.format == "json":
            return None if self.needs_full_check else json_body_problem(self.body)
        events, at_boundary = tail_events(self.body, self.format)
        if not at_boundary:
            return "stream cut off mid-frame"
        if events and self.protocol.is_error(events[-1]):
            return describe_error(events[-1])
        if not events or not self.protocol.is_terminal(events[-1]):
            return "stream ended without its terminal event"
        return None

    def full_check(self) -> str | None:
        """A large JSON body's parse, or the whole stream's first error event; None if fine."""
        if self.format == "json":
            return json_body_problem(self.body)
        for event in iter_events(self.body, self.format):
            if self.protocol.is_error(event):
                return describe_error(event)
        return None
