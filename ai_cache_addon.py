"""Entry point for `mitmdump -s ai_cache_addon.py`: caches LLM provider traffic.

Works from any working directory, installed or not: the package lives in lib/.
"""

import sys
from pathlib import Path

_lib = str(Path(__file__).resolve().parent / "lib")
if _lib not in sys.path:
    sys.path.insert(0, _lib)

from ai_cache.addon import make_addons  # noqa: E402

addons = make_addons()
