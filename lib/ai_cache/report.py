"""What the proxy tells its user: one line per recognised flow, one summary at shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def flow_line(info: dict[str, Any], where: str, size: int, outcome: str) -> str:
    """`HIT l1 openai-chat gpt-4o api.openai.com/v1/chat/completions 1.2 KiB sse: age 3s, saved 42 tokens`."""
    parts = [info["status"]]
    if info.get("layer"):
        parts.append(info["layer"])
    parts += [info["protocol"], info.get("model") or "-", where, human_size(size)]
    if info.get("format"):
        parts.append(info["format"])
    line = " ".join(parts)
    return f"{line}: {outcome}" if outcome else line


def store_outcome(layers: tuple[str, ...], problem: str, checked: bool) -> str:
    """What a finished write did: `stored` only when every layer took the entry."""
    if not layers:
        return f"not stored: {problem}"
    stored = "stored after a full check" if checked else "stored"
    return f"{stored} in {' and '.join(layers)} only ({problem})" if problem else stored


@dataclass
class Tally:
    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    refreshes: int = 0
    stored: int = 0
    tokens_saved: int = 0
    bytes_served: int = 0

    def count(self, status: str) -> None:
        name = {"HIT": "hits", "MISS": "misses", "REFRESH": "refreshes"}.get(status, "bypasses")
        setattr(self, name, getattr(self, name) + 1)

    def summary(self) -> str:
        return (
            f"{self.hits} hits, {self.misses} misses, {self.refreshes} refreshes, "
            f"{self.bypasses} bypasses, {self.stored} stored; served from cache "
            f"{human_size(self.bytes_served)} and {self.tokens_saved} tokens"
        )
