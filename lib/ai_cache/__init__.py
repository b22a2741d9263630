"""ai-cache: a mitmproxy addon that caches LLM provider traffic."""
