"""What the proxy tells its user: one line per recognised flow, one summary at shutdown."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from .state import FlowState, Status

logger = logging.getLogger(__name__)
# The shutdown summary, as with-ai-cache finds it in the proxy's log.
SUMMARY = re.compile(r"ai-cache: (\d+) LLM calls?: .*")


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def human_age(seconds: float) -> str:
    """5s, 3m, 2h, 4d: whole units, rounded down."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def flow_line(state: FlowState, where: str, size: int, outcome: str) -> str:
    """`HIT l1 openai-chat gpt-4o api.openai.com/v1/chat/completions 1.2 KiB sse: age 3s, saved 42 tokens`."""
    parts: list[str] = [state.status]
    if state.layer:
        parts.append(state.layer)
    if state.similarity is not None:
        parts.append(f"{state.similarity:.4f}")
    parts += [state.protocol, state.model or "-", where, human_size(size)]
    if state.format:
        parts.append(state.format)
    if state.expired:  # a miss because the entry was too old, not because there was none
        outcome = f"{state.expired}, fetched again" + (f"; {outcome}" if outcome else "")
    line = " ".join(parts)
    return f"{line}: {outcome}" if outcome else line


class FlowLines:
    """The per-flow lines, logged together at the end of the event loop's turn that made
    them. mitmproxy handles every log record at 40-80 µs (it formats it twice and sends
    an `add_log` event through every addon): a record per flow was a sixth of a MISS's
    cost, and a batch write's stored lines come in one turn. Each line keeps its own
    `ai-cache: ` prefix; the record's time stamp is the first line's."""

    def __init__(self) -> None:
        self._pending: list[str] = []

    def add(self, line: str) -> None:
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a test calling a hook by hand): at once
                logger.info("ai-cache: %s", line)
                return
        self._pending.append(line)

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            logger.info("\n".join(f"ai-cache: {line}" for line in lines))


def hit_outcome(state: FlowState) -> str:
    """A hit's outcome, for its log line and its flow comment: `age 42s, saved 31 tokens`."""
    parts = [f"age {human_age(state.age or 0)}"]
    if state.saved_tokens:
        parts.append(f"saved {state.saved_tokens} tokens")
    if state.coalesced:
        parts.append("waited for an identical request in flight")
    return ", ".join(parts)


def store_outcome(layers: tuple[str, ...], problem: str, checked: bool) -> str:
    """What a finished write did: `stored` only when every layer took the entry."""
    if not layers:
        return f"not stored: {problem}"
    stored = "stored after a full check" if checked else "stored"
    return f"{stored} in {' and '.join(layers)} only ({problem})" if problem else stored


def plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


# The labels of a request count: what `Tally.requests` is keyed by.
REQUEST_LABELS = ("status", "layer", "protocol", "model")


@dataclass
class Tally:
    """What the proxy did, counted once: the shutdown summary, `ai_cache.stats` and the
    metrics (metrics.py) all read these."""

    requests: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)  # REQUEST_LABELS
    stored: Counter[str] = field(default_factory=Counter)  # by format
    not_stored: Counter[str] = field(default_factory=Counter)  # by the gist of the reason
    tokens_saved: Counter[str] = field(default_factory=Counter)  # by protocol
    bytes_served: int = 0
    coalesced: int = 0  # hits that waited for an identical request in flight

    def routed(self, state: FlowState) -> None:
        """Count a recognised request once its way is decided (a hit's size and tokens with it)."""
        self.requests[state.status.value, state.layer or "none", state.protocol, state.model or ""] += 1
        if state.status is Status.HIT:
            self.tokens_saved[state.protocol] += state.saved_tokens or 0
            self.bytes_served += state.size or 0
            self.coalesced += bool(state.coalesced)

    def by_status(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for (status, *_), n in self.requests.items():
            counts[status] += n
        return counts

    def not_storing(self, why: str) -> None:
        """Count an answer left out of the cache under its reason without the details
        ("error event in stream: {...}" and "larger than ... (N bytes)" lose their tail)."""
        self.not_stored[why.split(":")[0].split(" (")[0].rstrip(".")] += 1

    def summary(self) -> str:
        """`3 LLM calls: 2 hits, 1 miss; 0 stored, 1 not stored (upstream answered 500: 1); ...`"""
        by_status = self.by_status()
        counts = [plural(by_status[Status.HIT], "hit"), plural(by_status[Status.MISS], "miss", "misses")]
        if refreshes := by_status[Status.REFRESH]:
            counts.append(plural(refreshes, "refresh", "refreshes"))
        if bypasses := by_status[Status.BYPASS]:
            counts.append(plural(bypasses, "bypass", "bypasses"))
        why = ", ".join(f"{reason}: {n}" for reason, n in self.not_stored.most_common())
        return (
            f"{plural(by_status.total(), 'LLM call')}: {', '.join(counts)}; {self.stored.total()} stored, "
            f"{self.not_stored.total()} not stored{f' ({why})' if why else ''}; served from cache "
            f"{human_size(self.bytes_served)} and {plural(self.tokens_saved.total(), 'token')}"
        )


# mitmproxy.proxy.server logs these four around every connection, at INFO like the
# warnings-worthy "error establishing server connection", hence a filter, not a level.
CONNECTION_LINES = re.compile(r"(client|server) (connect|disconnect)( |$)")


class ConnectionLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not CONNECTION_LINES.match(record.getMessage())


CONNECTION_FILTER = ConnectionLines()


def show_connection_lines(show: bool) -> None:
    """ai_cache_connection_log: keep or drop mitmproxy's connect/disconnect lines."""
    server_log = logging.getLogger("mitmproxy.proxy.server")
    if show:
        server_log.removeFilter(CONNECTION_FILTER)
    else:
        server_log.addFilter(CONNECTION_FILTER)
