"""Stream capture: a tee set as `flow.response.stream` that forwards every chunk untouched.

It keeps a copy with arrival times, scans events incrementally, and at the end says
whether the stream is complete by the protocol's rules (terminal event, no error event,
ends on a frame boundary, within the size cap). It can never raise: mitmproxy drops a
chunk whose callable raised, and the client's bytes come first.
"""

from __future__ import annotations

import json
import logging
import time

from .protocols import Protocol
from .sse import Event, NDJSONScanner, SSEScanner

logger = logging.getLogger(__name__)


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
        json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "body is not JSON"
    return None


class StreamCapture:
    def __init__(self, protocol: Protocol, fmt: str, max_body: int) -> None:
        self.protocol = protocol
        self.format = fmt
        self.max_body = max_body
        self.parts: list[bytes] = []
        self.chunks: list[tuple[float, int]] = []
        self.size = 0
        self.started: float | None = None
        self.failure: str | None = None
        self.last_event: Event | None = None
        self.error_event: Event | None = None
        self.scanner: SSEScanner | NDJSONScanner | None = None
        if fmt == "sse":
            self.scanner = SSEScanner(self._on_event)
        elif fmt == "ndjson":
            self.scanner = NDJSONScanner(self._on_event)

    def __call__(self, data: bytes) -> bytes:
        if data and self.failure is None:
            try:
                self._record(data)
            except Exception as e:  # never let the tee cost the client a chunk
                self.failure = f"capture failed: {e!r}"
                self._release()
        return data

    def _record(self, data: bytes) -> None:
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
        if self.scanner is not None:
            self.scanner.feed(data)

    def _release(self) -> None:
        self.parts, self.chunks, self.scanner = [], [], None

    def _on_event(self, event: Event) -> None:
        self.last_event = event
        if self.error_event is None and self.protocol.is_error(event):
            self.error_event = event

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    def incompleteness(self) -> str | None:
        """Why the captured stream must not be stored, or None when it is complete."""
        if self.failure:
            return self.failure
        if self.format == "json":
            return json_body_problem(self.body)
        if isinstance(self.scanner, NDJSONScanner):
            self.scanner.finish()
        if self.scanner is None or not self.scanner.at_boundary:
            return "stream cut off mid-frame"
        if self.error_event is not None:
            return f"error event in stream: {self.error_event.data[:120]}"
        if self.last_event is None or not self.protocol.is_terminal(self.last_event):
            return "stream ended without its terminal event"
        return None
