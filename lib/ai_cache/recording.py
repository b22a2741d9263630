"""Recording: a finished upstream answer becomes an entry, or a reason it is not stored.

The capture made for a flow judges completeness as the answer streams by; once the flow
ends, `Recorder.conclude` turns it into an entry, has it checked, summarised and written
off the request path, releases the flow's single-flight followers, and logs one line (for
a stored answer once the write finished, so that the line says whether it was stored).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from .capture import StreamCapture, body_format
from .entry import Entry, replayable_headers
from .flights import SingleFlight
from .keys import host_of, path_of, stored_request
from .protocols import BY_NAME, Protocol
from .report import FlowLines, Tally, flow_line, store_outcome
from .state import FlowState
from .tiers import TieredCache, WriteCancelled, Written

logger = logging.getLogger(__name__)


class NotStorable(WriteCancelled):
    """A check in the write's worker thread found that an answer must not be stored after all."""


def where(flow: http.HTTPFlow) -> str:
    """Host and path for log lines; never the query, which may carry a key."""
    return host_of(flow.request) + path_of(flow.request)


def summarise(entry: Entry, protocol: Protocol) -> None:
    """Metadata for humans and the CLI, and the request copy kept; parses the answer (a
    stream only at its edges), so it runs in the write's worker thread."""
    entry.meta["usage"] = protocol.usage(entry.body, entry.format)
    entry.meta["preview"] = protocol.preview(entry.meta["request"]["body"])
    entry.meta["request"] = stored_request(entry.meta["request"])


def new_capture(state: FlowState, response: http.Response, max_body: int) -> StreamCapture:
    """A capture for this flow's protocol, tagged by what the answer says it is."""
    fmt = body_format(response.headers.get("content-type", ""))
    return StreamCapture(BY_NAME[state.protocol], fmt, max_body, response.headers.get("content-encoding", ""))


def finisher(capture: StreamCapture, max_body: int) -> Callable[[Entry], None]:
    """What must happen to an entry before it is written, in the write's worker thread (one
    trip with the L1 write): the full check when the capture needs one, the summary, and
    the size bound on the stored entry. Raises NotStorable to drop the entry."""

    def finish(entry: Entry) -> None:
        if capture.needs_full_check and (problem := capture.full_check()):
            raise NotStorable(problem)
        summarise(entry, capture.protocol)
        if (size := len(entry.to_bytes())) > max_body:
            raise NotStorable(f"too large: the entry has {size} bytes, above ai_cache_max_body")

    return finish


def recorded_entry(
    response: http.Response | None, state: FlowState, max_body: int, ended_by: str = ""
) -> tuple[Entry, StreamCapture] | str:
    """The entry for a finished answer and its capture, or why there is none."""
    if response is None:
        return ended_by or "no response"
    if response.status_code != 200:
        return f"upstream answered {response.status_code}"
    capture = response.stream
    if ended_by and not (isinstance(capture, StreamCapture) and capture.protocol.terminal_proves_end):
        return ended_by  # only a stream's terminal event outlives a broken end
    if not isinstance(capture, StreamCapture):
        if capture:
            return "the response was streamed without capture"
        capture = new_capture(state, response, max_body)  # decodes within the cap; `.content` would not
        capture(response.raw_content or b"")
    why_not = capture.incompleteness()
    if why_not:
        return why_not
    state.format = capture.format
    entry = Entry(
        key=state.key,
        format=capture.format,
        body=capture.body,
        headers=replayable_headers(list(response.headers.items(multi=True))),
        chunks=capture.chunks,
        meta={
            "protocol": state.protocol,
            "model": state.model or "",
            "stream": bool(state.stream),
            "request": state.request,
        },
    )
    return entry, capture


@dataclass(frozen=True)
class Conclusion:
    """What became of a concluded flow's answer, for observers (comments, metrics)."""

    outcome: str  # the log line's outcome: "stored", "not stored: incomplete stream", a bypass reason
    stored: bool | None = None  # None: nothing was to be recorded (a bypass, an answer made here)
    reason: str = ""  # why it was not stored


Observer = Callable[[http.HTTPFlow, FlowState, Conclusion], None]
# Told of each recognised flow once its answer is complete (comments, run log).
FlowObserver = Callable[[http.HTTPFlow, FlowState], None]


def tell(observers: list[Callable[..., None]], *args: Any) -> None:
    """Call each observer; one's bug must neither break the flow nor silence the others."""
    for observer in observers:
        try:
            observer(*args)
        except Exception:
            logger.exception("ai-cache: an observer failed")


class Recorder:
    """Concludes recording flows: store, release followers, log, count, tell `observers`."""

    def __init__(self, flights: SingleFlight, tally: Tally, lines: FlowLines | None = None) -> None:
        self.flights = flights
        self.tally = tally
        self.lines = lines or FlowLines()
        self.observers: list[Observer] = []

    def conclude(
        self, flow: http.HTTPFlow, state: FlowState, cache: TieredCache, max_body: int, ended_by: str = ""
    ) -> None:
        """`ended_by` is the error a flow ended with: the capture still decides, because a
        client that closes right after the terminal event leaves a complete stream."""
        written: asyncio.Future[Written] | None = None
        checked = False
        outcome = state.reason or ended_by
        not_stored = ""
        try:
            if state.recording:
                recorded = recorded_entry(flow.response, state, max_body, ended_by)
                if isinstance(recorded, str):
                    outcome, not_stored = f"not stored: {recorded}", recorded
                    self.tally.not_storing(recorded)
                else:
                    entry, capture = recorded
                    # An answer that needs a full check (an error needle showed, or a large
                    # JSON body) must not be served before it is checked and written.
                    checked = capture.needs_full_check
                    written = cache.store_soon(entry, finisher(capture, max_body), visible=not checked)
        finally:  # whatever happened, the followers of a leader must not wait in vain
            # Its client got the whole answer when the flow ended well, or the capture proves it.
            self.flights.land(state, written, hidden=checked, cleanly=written is not None or not ended_by)
        size = 0
        if flow.response is not None:
            size = len(flow.response.raw_content or b"")
            if isinstance(flow.response.stream, StreamCapture):
                size = flow.response.stream.size
        line = functools.partial(flow_line, state, where(flow), size)
        if written is None:
            self.lines.add(line(outcome))
            tell(self.observers, flow, state, Conclusion(outcome, False if not_stored else None, not_stored))
        else:
            then = f" (complete; then {ended_by.rstrip('.')})" if ended_by else ""
            written.add_done_callback(lambda task: self._report_write(task, flow, state, line, checked, then))

    def _report_write(
        self,
        task: asyncio.Future[Written],
        flow: http.HTTPFlow,
        state: FlowState,
        line: Callable[[str], str],
        checked: bool,
        then: str,
    ) -> None:
        """The flow's line once its write finished, and the tally: `stored` only if it was."""
        if task.cancelled():
            written = Written(problem="the store write was cancelled")
        elif error := task.exception():
            written = Written(problem=f"the store write failed: {error!r}")
        else:
            written = task.result()
        if written.layers:
            self.tally.stored[state.format or "json"] += 1
        else:
            self.tally.not_storing(written.problem)
        outcome = store_outcome(written.layers, written.problem, checked)
        self.lines.add(line(outcome + then))
        stored = bool(written.layers)
        tell(self.observers, flow, state, Conclusion(outcome, stored, "" if stored else written.problem))
