"""mitmproxy commands (the console's command bar, mitmweb): ai_cache.stats, ai_cache.clear,
ai_cache.delete KEY."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import command, exceptions

from .report import plural
from .semantic.vectors import forget_questions

if TYPE_CHECKING:
    from .addon import AICache
    from .tiers import TieredCache

logger = logging.getLogger(__name__)


class Commands:
    """The cache's commands; deletions run as background tasks and log what they did."""

    def __init__(self, cache: AICache) -> None:
        self.cache = cache

    def _tiers(self) -> TieredCache:
        if self.cache.cache is None or not self.cache.cache.stores:
            raise exceptions.CommandError("ai-cache has no usable cache store")
        return self.cache.cache

    @command.command("ai_cache.stats")
    def stats(self) -> str:
        """What the cache did since the proxy started (the shutdown summary, so far)."""
        return f"ai-cache: {self.cache.tally.summary()}"

    @command.command("ai_cache.clear")
    def clear(self) -> None:
        """Delete every entry in every layer, and every semantic question."""
        tiers = self._tiers()
        tiers.background(self._delete(tiers, None))

    @command.command("ai_cache.delete")
    def delete(self, key: str) -> None:
        """Delete one entry from every layer, and its semantic question: its key, or a
        prefix matching one key."""
        tiers = self._tiers()
        if not key.strip():
            raise exceptions.CommandError("ai_cache.delete: give the entry's key (or a unique prefix)")
        tiers.background(self._delete(tiers, key.strip()))

    async def _delete(self, tiers: TieredCache, prefix: str | None) -> list[str]:
        keys = await (tiers.keys() if prefix is None else tiers.matching(prefix))
        if prefix is not None and len(keys) != 1:
            logger.warning("ai-cache: ai_cache.delete %s: %s", prefix, f"{len(keys)} keys match, none deleted")
            return []
        for key in keys:
            for store in tiers.stores:
                await store.delete(key)
        if (semantic := self.cache.semantic) is not None:
            await forget_questions(semantic.local, semantic.remote, None if prefix is None else keys)
        logger.info("ai-cache: deleted %s", plural(len(keys), "entry", "entries"))
        return keys
