"""The file to load into mitmproxy from an installed package:
`mitmdump -s "$(ai-cache addon-path)"` (a checkout also has ../../ai_cache_addon.py)."""

from ai_cache.addon import make_addons

addons = make_addons()
