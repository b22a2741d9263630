"""Entry point for `mitmdump -s ai_cache_addon.py`: caches LLM provider traffic.

Works from any working directory, installed or not: the package lives in lib/.
"""

import sys
from pathlib import Path

_lib = str(Path(__file__).resolve().parent / "lib")
if _lib not in sys.path:
    sys.path.insert(0, _lib)

from ai_cache.addon import AICache  # noqa: E402
from ai_cache.commands import Commands  # noqa: E402
from ai_cache.comments import Comments  # noqa: E402
from ai_cache.metrics import Metrics  # noqa: E402
from ai_cache.replay import PacedReplay  # noqa: E402

# PacedReplay first: it restores a paced hit's URL before AICache logs the flow; the
# observers after AICache, whose per-flow state they read.
pacer = PacedReplay()
cache = AICache(pacer)
addons = [pacer, cache, Comments(cache.recorder), Metrics(cache), Commands(cache)]
