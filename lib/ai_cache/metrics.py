"""Metrics: what the cache did, counted, served as Prometheus text and JSON (ai_cache_metrics).

The counts are plain numbers kept on the event loop (a dict update per flow); they become
Prometheus families only when scraped, through a collector in a private registry, so
loading the addon twice never clashes. The endpoint is an asyncio server on the proxy's
own loop that renders on request: no thread, no work while nobody scrapes.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import logging
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import exceptions
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from .disk import DiskStore
from .redis_store import RedisStore
from .report import REQUEST_LABELS

if TYPE_CHECKING:
    from .addon import AICache

logger = logging.getLogger(__name__)
READ_TIMEOUT = 5.0
COUNT_TIMEOUT = 1.0  # the L1 entry count at scrape time; a busy disk leaves the gauge out
TOKENS_HELP = "Tokens answered from the cache (usage of hits)."
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # seconds
BUCKET_BOUNDS = [*map(floatToGoString, LOOKUP_BUCKETS), "+Inf"]  # as Prometheus writes them

# Not-stored reasons, a small fixed set of classes (the log line keeps the details).
# First match wins: (class, words any of which the reason contains, lower-cased).
REASON_CLASSES = (
    ("error_event", ("error event",)),
    ("status", ("upstream answered",)),
    ("too_large", ("larger than", "too large")),
    ("encoded", ("-encoded", "decod")),
    ("client_gone", ("client disconnected", "client closed")),
    ("write_failed", ("store write", "write failed", "writes are off", " l1 ", " l2 ")),
    ("incomplete", ("terminal event", "cut off", "empty body", "not json", "disconnected", "no response")),
)


@dataclass
class Timings:
    """One layer's lookups: how many fell under each LOOKUP_BUCKETS bound (the last: above
    them all), and their seconds in all."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(LOOKUP_BUCKETS) + 1))
    seconds: float = 0.0


def reason_class(reason: str) -> str:
    """The class of a free-text not-stored reason: incomplete, error_event, status, too_large,
    encoded, client_gone, write_failed or other."""
    text = f" {reason.lower()} "
    return next((name for name, words in REASON_CLASSES if any(w in text for w in words)), "other")


class Metrics:
    """Serves AICache's counts (its `tally`) with what only metrics keep: lookup times,
    Redis errors, the semantic layer's refusals."""

    def __init__(self, cache: AICache) -> None:
        self.cache = cache
        self.l2_errors: Counter[str] = Counter()  # by Redis op
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: it has collect()
        self.embedding_seconds = Histogram(
            "ai_cache_embedding_seconds",
            "Time of one call to the embeddings endpoint (semantic layer).",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.lookups: dict[str, Timings] = {}  # by layer
        self.listen: tuple[str, int] | None = None
        self.server: asyncio.Server | None = None
        self._unserved: socket.socket | None = None  # bound before the loop ran
        self._task: asyncio.Task[None] | None = None

    # Counting

    def looked_up(self, layer: str, seconds: float) -> None:
        """Every lookup of every request: a list slot, not prometheus_client's Histogram
        (a lock per bucket, the bounds searched in Python)."""
        timings = self.lookups.get(layer)
        if timings is None:
            timings = self.lookups[layer] = Timings()
        timings.buckets[bisect.bisect_left(LOOKUP_BUCKETS, seconds)] += 1
        timings.seconds += seconds

    def l2_failed(self, op: str) -> None:
        self.l2_errors[op] += 1

    # The numbers, as Prometheus families and as JSON

    def requests_by_label(self) -> tuple[tuple[str, ...], Counter[tuple[str, ...]]]:
        """The request labels and counts, `model` only with ai_cache_metrics_models (cardinality)."""
        requests = self.cache.tally.requests
        if self.cache.settings and self.cache.settings.metrics_models:
            return REQUEST_LABELS, Counter(requests)
        counts: Counter[tuple[str, ...]] = Counter()
        for key, n in requests.items():
            counts[key[:3]] += n
        return REQUEST_LABELS[:3], counts

    def not_stored(self) -> Counter[str]:
        """Answers not stored by reason class: a small fixed set of labels."""
        classes: Counter[str] = Counter()
        for reason, n in self.cache.tally.not_stored.items():
            classes[reason_class(reason)] += n
        return classes

    def collect(self) -> Iterator[Metric]:
        labels, counts = self.requests_by_label()
        requests = CounterMetricFamily("ai_cache_requests", "Recognised LLM calls by cache status.", labels=labels)
        for key, n in counts.items():
            requests.add_metric(list(key), n)
        yield requests
        tally = self.cache.tally
        for name, help_text, label, by_label in (
            ("ai_cache_stored", "Answers stored, by format.", "format", tally.stored),
            ("ai_cache_not_stored", "Answers not stored, by reason class.", "reason", self.not_stored()),
            ("ai_cache_tokens_saved", TOKENS_HELP, "protocol", tally.tokens_saved),
            ("ai_cache_l2_errors", "Failed Redis calls, by operation.", "op", self.l2_errors),
        ):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for value, n in by_label.items():
                family.add_metric([value], n)
            yield family
        lookups = HistogramMetricFamily(
            "ai_cache_lookup_seconds", "Time of one store lookup, by layer.", labels=["layer"]
        )
        for layer, timings in self.lookups.items():
            cumulative = itertools.accumulate(timings.buckets)
            lookups.add_metric([layer], list(zip(BUCKET_BOUNDS, cumulative, strict=True)), timings.seconds)
        yield lookups
        yield CounterMetricFamily("ai_cache_bytes_served", "Body bytes answered from the cache.", tally.bytes_served)
        yield CounterMetricFamily("ai_cache_coalesced", "Hits that waited for an identical request.", tally.coalesced)
        if l2 := self._redis():
            yield GaugeMetricFamily(
                "ai_cache_l2_up", "1 while the Redis circuit breaker is closed.", 0 if l2.breaker.is_open else 1
            )
        if semantic := self.cache.semantic:
            rejected = CounterMetricFamily(
                "ai_cache_semantic_rejected",
                "Semantic candidates close enough but refused by the lexical guard, by why.",
                labels=["reason"],
            )
            for reason, n in semantic.rejected.items():
                rejected.add_metric([reason], n)
            yield rejected

    def _redis(self) -> RedisStore | None:
        stores = self.cache.cache.stores if self.cache.cache else []
        return next((s for s in stores if isinstance(s, RedisStore)), None)

    async def entries(self) -> int | None:
        """L1's entry count, read in a thread and bounded: None when unknown."""
        disk: DiskStore | None = self.cache.cache.disk if self.cache.cache else None
        if disk is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.to_thread(disk.count_sync), COUNT_TIMEOUT)
        except TimeoutError:
            return None

    async def prometheus(self) -> bytes:
        text = generate_latest(self.registry)
        if (count := await self.entries()) is not None:
            text += (
                b"# HELP ai_cache_entries Entries held, by layer.\n# TYPE ai_cache_entries gauge\n"
                + f'ai_cache_entries{{layer="l1"}} {count}\n'.encode()
            )
        return text

    async def stats(self) -> dict[str, Any]:
        """The same numbers as /metrics, as JSON (also the `ai_cache.stats` command's)."""
        labels, counts = self.requests_by_label()
        tally = self.cache.tally
        l2 = self._redis()
        return {
            "requests": dict(tally.by_status()),
            "requests_by_label": [
                {**dict(zip(labels, key, strict=True)), "count": n} for key, n in sorted(counts.items())
            ],
            "stored": dict(tally.stored),
            "not_stored": dict(self.not_stored()),
            "tokens_saved": dict(tally.tokens_saved),
            "bytes_served": tally.bytes_served,
            "coalesced": tally.coalesced,
            "lookups": {layer: {"count": sum(t.buckets), "seconds": t.seconds} for layer, t in self.lookups.items()},
            "l2_errors": dict(self.l2_errors),
            "l2_up": None if l2 is None else int(not l2.breaker.is_open),
            "entries": {"l1": await self.entries()},
            "semantic": self.cache.semantic.stats() if self.cache.semantic else None,
        }

    # The endpoint

    def configure(self, updated: set[str]) -> None:
        settings, tiers = self.cache.settings, self.cache.cache
        if settings is None or tiers is None:
            return
        # AICache configured first and may have opened new stores: time and watch them too.
        tiers.on_lookup = self.looked_up
        if self.cache.semantic is not None:
            self.cache.semantic.embedder.on_call = self.embedding_seconds.observe
        for store in tiers.stores:
            if isinstance(store, RedisStore):
                store.on_error = self.l2_failed
        if not updated & {"ai_cache_metrics"} or settings.metrics == self.listen:
            return
        sock = None
        if settings.metrics:
            host, port = settings.metrics
            try:
                sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            except OSError as e:
                message = f"ai_cache_metrics: cannot listen on {host}:{port}: {e.strerror or e}"
                if self.server is not None:
                    raise exceptions.OptionsError(message) from None
                logger.error("ai-cache: %s", message)  # at startup, a logged error stops the proxy
                return
        self._stop()
        self.listen = settings.metrics
        if sock is not None:
            sock.setblocking(False)
            self._start(sock)

    def _start(self, sock: socket.socket) -> None:
        async def serve() -> None:
            self.server = await asyncio.start_server(self._handle, sock=sock)
            logger.info("ai-cache: metrics on http://%s:%d/metrics", *sock.getsockname()[:2])

        try:
            self._task = asyncio.get_running_loop().create_task(serve())
        except RuntimeError:  # configured before the proxy runs: `running` starts it
            self._unserved = sock

    def running(self) -> None:
        if self._unserved is not None:
            sock, self._unserved = self._unserved, None
            self._start(sock)

    def _stop(self) -> None:
        if self._unserved is not None:
            self._unserved.close()
            self._unserved = None
        if self.server is not None:
            self.server.close()
            self.server = None

    def done(self) -> None:
        self._stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            while (await asyncio.wait_for(reader.readline(), READ_TIMEOUT)).strip():
                pass  # headers: nothing in them matters
            method, path = (request_line.decode("latin-1").split() + ["", ""])[:2]
            path = path.split("?")[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await self.prometheus()
            elif path == "/stats":
                status, ctype, body = "200 OK", "application/json", json.dumps(await self.stats()).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"/metrics or /stats\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
