"""ai-cache: a mitmproxy addon that caches LLM provider traffic."""

from pathlib import Path

# What `mitmdump -s` loads, in a checkout and in an installed package alike.
ADDON_PATH = Path(__file__).with_name("mitmproxy_addon.py")
