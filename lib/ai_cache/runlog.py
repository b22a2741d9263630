"""The run log (`ai_cache_run_log`): one JSON line per LLM call and per finished write, and
the fixture files a run used, for the programs that run the proxy for a test run (the
pytest plugin, with-ai-cache) to read; and the shutdown line naming unused fixtures.

Lines, in the order things happen (a write ends after its call's line):

    {"flow": ID, "status": "HIT", "layer": "fixtures", "fixture": NAME, "key": ..., "recording": false}
    {"flow": ID, "status": "MISS", ..., "recording": false, "message": the 504's explanation}
    {"flow": ID, "status": "MISS", ..., "recording": true}      a write line follows
    {"flow": ID, "stored": true, "fixture": NAME}              the write ended
    {"done": true, "fixtures": DIR, "used": [NAMES], "skipped": {NAME: WHY}}   at shutdown

A line is one small append to a local file, as mitmproxy's own `-w` writes flows in the hook.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mitmproxy import http

from .protocols import json_object
from .recording import Conclusion
from .report import plural
from .state import FlowState, Status

if TYPE_CHECKING:
    from .addon import AICache

logger = logging.getLogger(__name__)


def replay_miss_message(flow: http.HTTPFlow) -> str:
    """The explanation in a 504 this proxy answered, "" for any other answer."""
    if flow.response is None or flow.response.status_code != 504:
        return ""
    error = (json_object(flow.response.get_content(strict=False) or b"") or {}).get("error")
    return str(error.get("message", "")) if isinstance(error, dict) else ""


class RunLog:
    def __init__(self, cache: AICache) -> None:
        self.cache = cache
        self.path = ""
        self.file: IO[str] | None = None
        cache.when_answered.append(self.answered)
        cache.recorder.observers.append(self.concluded)

    def configure(self, updated: set[str]) -> None:
        settings = self.cache.settings
        if settings is None or settings.run_log == self.path:
            return
        self._close()
        self.path = settings.run_log
        if self.path:
            try:
                self.file = open(self.path, "a", encoding="utf-8", buffering=1)
            except OSError as e:
                logger.warning("ai-cache: ai_cache_run_log: cannot write %s (%s)", self.path, e.strerror or e)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def fixture_of(self, key: str) -> str | None:
        fixtures = self.cache.cache.fixtures if self.cache.cache else None
        return fixtures.name_of(key) if fixtures else None

    def answered(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if self.file is None:
            return
        self.write(self._call(flow, state))

    def _call(self, flow: http.HTTPFlow, state: FlowState) -> dict[str, Any]:
        record: dict[str, Any] = {
            "flow": flow.id,
            "status": str(state.status),
            "layer": state.layer,
            "protocol": state.protocol,
            "model": state.model,
            "key": state.key,
            "recording": state.recording,
        }
        if state.layer == "fixtures":
            record["fixture"] = self.fixture_of(state.key)
        if state.status is Status.MISS and state.served and (message := replay_miss_message(flow)):
            record["message"] = message
        return record

    def concluded(self, flow: http.HTTPFlow, state: FlowState, conclusion: Conclusion) -> None:
        if conclusion.stored is None or self.file is None:
            return
        record = {"flow": flow.id, "stored": conclusion.stored, "reason": conclusion.reason}
        if conclusion.stored:
            record["fixture"] = self.fixture_of(state.key)
        self.write(record)

    def done(self) -> None:
        """After AICache's `done`: its writes have ended, so `used` is complete."""
        fixtures = self.cache.cache.fixtures if self.cache.cache else None
        if fixtures is not None:
            unused = fixtures.unused()
            if unused:
                logger.info(
                    "ai-cache: %s in %s unused by this run: %s",
                    plural(len(unused), "fixture file"),
                    fixtures.directory,
                    ", ".join(unused),
                )
            self.write(
                {
                    "done": True,
                    "fixtures": str(fixtures.directory),
                    "used": sorted(fixtures.used),
                    "skipped": fixtures.skipped,
                }
            )
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# The reading side, for the programs that run the proxy


@dataclass
class Counts:
    """What a stretch of a run did: LLM calls by outcome, answers stored, replay misses."""

    hits: int = 0
    misses: int = 0
    stored: int = 0
    replay_misses: list[str] = field(default_factory=list)  # the 504s' explanations

    def add(self, other: Counts) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.stored += other.stored
        self.replay_misses += other.replay_misses


class RunReader:
    """Follows a run log as the proxy appends to it; `read()` counts the new lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.recording: set[str] = set()  # flows whose write line has not come yet
        self.written: set[str] = set()  # write lines that came before their call's line
        self.used: set[str] = set()
        self.skipped: dict[str, str] = {}  # fixture files that did not load, and why
        self.fixtures = ""

    @property
    def pending(self) -> bool:
        return bool(self.recording)

    def read(self) -> Counts:
        counts = Counts()
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return counts
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json_object(line) or {}
            self._count(record, counts)
        return counts

    def _count(self, record: dict[str, Any], counts: Counts) -> None:
        flow = str(record.get("flow", ""))
        if record.get("done"):
            self.used.update(record.get("used") or [])
            self.skipped.update(record.get("skipped") or {})
            self.fixtures = str(record.get("fixtures", ""))
        elif "stored" in record:
            counts.stored += bool(record["stored"])
            if flow in self.recording:
                self.recording.discard(flow)
            else:
                self.written.add(flow)
        elif "status" in record:
            if record["status"] == "HIT":
                counts.hits += 1
            elif record["status"] == "MISS":
                counts.misses += 1
            if record.get("message"):
                counts.replay_misses.append(str(record["message"]))
            if record.get("recording") and flow not in self.written:
                self.recording.add(flow)
            self.written.discard(flow)

    def settle(self, timeout: float = 10.0) -> Counts:
        """Read until no write is pending (the answers of a test are stored by its end), or
        `timeout` seconds passed."""
        counts = self.read()
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
            counts.add(self.read())
        return counts
