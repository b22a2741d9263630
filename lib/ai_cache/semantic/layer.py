"""The semantic layer: on an exact miss, a stored answer to a question close in meaning.

A question is the text of the last user turn(s) (protocols.Question). Everything else in
the request must match exactly: the partition is the exact key of the request with that
text replaced by a placeholder, plus the embedder's identity, and searches never leave
it. A candidate is accepted when its cosine similarity reaches the threshold and the
lexical guard finds the same numbers, quoted strings and polarity words; the best few
are tried in order, and a rejected one is a plain miss. A hit answers the matched entry
as it is stored: nothing is written under the new question.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from mitmproxy import http

from ..capture import StreamCapture
from ..controls import Controls
from ..entry import Entry
from ..keys import CacheableRequest, KeyPolicy, partition_key
from ..options import SemanticSettings, Settings
from ..protocols import Protocol, Question
from ..recording import Conclusion
from ..redis_store import RedisStore
from ..state import FlowState, Mode
from ..tiers import TieredCache
from .embedder import Embedder
from .guard import difference
from .vectors import Candidate, LocalVectors, RedisVectors, local_vectors

logger = logging.getLogger(__name__)
CANDIDATES = 4  # best matches judged per layer
MIN_WORDS = 2  # a shorter question is never compared ("hi", "", a lone number)
# Nor a longer one: embedding models read only their first few hundred tokens (all-minilm
# 256), so long texts that differ only in their last words get one vector. 640 bytes of
# UTF-8 are about 100 English words, 160 tokens; 210 CJK characters.
MAX_BYTES = 640


@dataclass
class Asked:
    """A flow's question, kept from its request to its stored answer."""

    question: Question
    found: CacheableRequest
    protocol: Protocol
    policy: KeyPolicy
    lookup: bool  # False: only remembered once answered (refresh mode, no-cache)
    max_age: float | None
    vector: np.ndarray | None = None
    partition: str = ""


@dataclass(frozen=True)
class Match:
    entry: Entry
    similarity: float


class SemanticLayer:
    """Looks questions up and remembers answered ones, in L1 and (with RediSearch) L2."""

    def __init__(self, settings: SemanticSettings, cache: TieredCache) -> None:
        self.settings = settings
        self.cache = cache
        self.embedder = Embedder(
            settings.embed_url, settings.embed_model, settings.embed_key_env, settings.embed_timeout
        )
        disk = cache.disk
        self.local: LocalVectors | None = local_vectors(disk.directory) if disk is not None else None
        redis = next((s for s in cache.stores if isinstance(s, RedisStore)), None)
        self.remote = RedisVectors(redis) if redis is not None else None
        self._asked: weakref.WeakKeyDictionary[http.HTTPFlow, Asked] = weakref.WeakKeyDictionary()
        self.hits = 0
        self.rejected: Counter[str] = Counter()  # candidates close enough but refused, by why

    def start(self) -> None:
        """Read L1's vectors back and ask L2 for its search module, off the request path
        (configured before the proxy runs: L1's read inline, L2 asked at its first use)."""
        expired_before = time.time() - self.cache.ttl if self.cache.ttl else 0.0
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.local is not None:
                self.local.load_sync(expired_before)
            return
        if self.local is not None:
            local = self.local

            async def load() -> None:
                count = await asyncio.to_thread(local.load_sync, expired_before)
                logger.info("ai-cache: semantic layer on (%d stored questions in L1)", count)

            self.cache.background(load())
        if self.remote is not None:
            self.cache.background(self.remote.detect())

    # Request path

    def ask(
        self, flow: http.HTTPFlow, protocol: Protocol, found: CacheableRequest, controls: Controls, settings: Settings
    ) -> None:
        """Note the flow's question, if it may have one: looked up in record mode, only
        remembered in refresh mode, never in replay mode (fixtures stay exact)."""
        mode = settings.mode
        if mode not in (Mode.RECORD, Mode.REFRESH) or not controls.semantic or controls.bypass or found.refused:
            return
        question = protocol.question(found.body, self.settings.messages)
        if isinstance(question, str) or len(question.text.split()) < MIN_WORDS:
            return
        if len(question.text.encode("utf-8", "replace")) > MAX_BYTES:
            return
        lookup = mode is Mode.RECORD and not controls.refresh
        self._asked[flow] = Asked(question, found, protocol, settings.policy, lookup, controls.max_age)

    async def lookup(self, flow: http.HTTPFlow, state: FlowState) -> Match | None:
        """The accepted match for an exact miss, or None (sets the flow's similarity)."""
        asked = self._asked.get(flow)
        if asked is None or not asked.lookup or not await self._embedded(asked):
            return None
        assert asked.vector is not None
        for vectors in (self.local if self.local is not None and self.local.loaded else None, self.remote):
            if vectors is None:
                continue
            for candidate in await vectors.search(asked.partition, asked.vector, CANDIDATES):
                entry = await self._accepted(asked, candidate, state)
                if entry is not None:
                    state.similarity = round(candidate.similarity, 4)
                    self.hits += 1
                    if self.local is not None:
                        self.cache.background(asyncio.to_thread(self.local.count_hit_sync))
                    return Match(entry, candidate.similarity)
        return None

    async def _embedded(self, asked: Asked) -> bool:
        if asked.vector is None:
            asked.vector = await self.embedder.embed(asked.question.text)
            if asked.vector is None:
                return False
            identity = self.embedder.identity
            asked.partition = partition_key(asked.found, asked.question.rest, asked.policy, identity)
        return True

    async def _accepted(self, asked: Asked, candidate: Candidate, state: FlowState) -> Entry | None:
        if candidate.similarity < self.settings.threshold:
            return None
        if why := difference(asked.question.text, candidate.text):
            self.rejected[why] += 1
            logger.debug("ai-cache: semantic candidate %s refused: %s", candidate.key[:12], why)
            return None
        expired = bool(self.cache.ttl) and time.time() - candidate.created_at >= self.cache.ttl
        found = None if expired else await self.cache.find(candidate.key, asked.max_age)
        if found is None:  # its entry is gone (expired, deleted, evicted): so is the question
            if self.local is not None:
                self.cache.background(asyncio.to_thread(self.local.remove_sync, [candidate.key]))
            return None
        entry = found.entry
        if found.stale or bool(entry.meta.get("stream")) != bool(state.stream):
            return None
        return entry

    # Response path

    def concluded(self, flow: http.HTTPFlow, state: FlowState, conclusion: Conclusion) -> None:
        """A Recorder observer: remember the question of an answer just stored, unless the
        answer calls a tool (its result would answer another question)."""
        asked = self._asked.pop(flow, None)
        if asked is None or not conclusion.stored or flow.response is None:
            return
        capture = flow.response.stream
        answer = capture.body if isinstance(capture, StreamCapture) else flow.response.get_content(strict=False)
        if asked.protocol.calls_tools(answer or b""):
            return
        self.cache.background(self._remember(asked, state.key, time.time()))

    async def _remember(self, asked: Asked, key: str, created_at: float) -> None:
        if not await self._embedded(asked):
            return
        assert asked.vector is not None
        text = asked.question.text
        if self.local is not None:
            await asyncio.to_thread(self.local.add_sync, key, asked.partition, text, created_at, asked.vector)
        if self.remote is not None:
            await self.remote.add(key, asked.partition, text, created_at, asked.vector, self.cache.ttl or None)

    def stats(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "rejected": dict(self.rejected),
            "embedder_up": int(not self.embedder.breaker.is_open),
        }

    def close(self) -> None:
        """Inline: its pending writes are the tiered cache's tasks, drained before (done)
        or harmless after (diskcache reconnects)."""
        self.embedder.close()
        if self.local is not None:
            self.local.close()
