"""The file to load into mitmproxy from an installed package:
`mitmdump -s "$(ai-cache addon-path)"` (a checkout also has ../../ai_cache_addon.py)."""

from ai_cache.addon import AICache
from ai_cache.replay import PacedReplay

# PacedReplay first: it restores a paced hit's URL before AICache logs the flow.
pacer = PacedReplay()
addons = [pacer, AICache(pacer)]
