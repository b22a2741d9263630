"""The file to load into mitmproxy from an installed package:
`mitmdump -s "$(ai-cache addon-path)"` (a checkout also has ../../ai_cache_addon.py)."""

from ai_cache.addon import AICache
from ai_cache.commands import Commands
from ai_cache.comments import Comments
from ai_cache.metrics import Metrics
from ai_cache.replay import PacedReplay

# PacedReplay first: it restores a paced hit's URL before AICache logs the flow; the
# observers after AICache, whose per-flow state they read.
pacer = PacedReplay()
cache = AICache(pacer)
addons = [pacer, cache, Comments(cache.recorder), Metrics(cache), Commands(cache)]
