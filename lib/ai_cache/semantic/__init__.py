"""The opt-in semantic layer (ai_cache_semantic=on): see layer.py."""

from .layer import SemanticLayer

__all__ = ["SemanticLayer"]
