"""A cache entry: one recorded answer, tagged with its body format, in one byte encoding.

The same bytes go to diskcache and to Redis (zlib-compressed when large), and the same
fields into exports, so the format tag, the timing of a stream and `created_at` travel
with the entry everywhere.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .controls import CONTROL_PREFIX

MAGIC = b"AIC"
ENTRY_VERSION = 1
FORMATS = ("json", "sse", "ndjson")
CONTENT_TYPES = {
    "json": "application/json",
    "sse": "text/event-stream",
    "ndjson": "application/x-ndjson",
}
# Upstream headers never replayed: cookies, hop-by-hop, and framing that will not match.
UNREPLAYABLE_HEADERS = frozenset(
    {
        "set-cookie", "connection", "keep-alive", "proxy-authenticate", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "content-length", "content-encoding",
        "date", "alt-svc",
    }
)


class EntryError(ValueError):
    """Bytes that are not an entry of this version: foreign, truncated or corrupt."""


@dataclass
class Entry:
    key: str
    format: str
    body: bytes
    headers: list[tuple[str, str]]
    created_at: float = field(default_factory=time.time)
    status: int = 200
    # (seconds since the first chunk, chunk length): lets a replay keep the recorded pace.
    chunks: list[tuple[float, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.created_at)

    def tokens(self) -> tuple[int, int]:
        """(input, output) tokens the recorded answer reported; (0, 0) when it did not say."""
        usage = self.meta.get("usage") or {}
        return int(usage.get("input", 0)), int(usage.get("output", 0))

    def replay_headers(self) -> list[tuple[str, str]]:
        """Stored headers with the content type the format tag dictates."""
        wanted = CONTENT_TYPES[self.format]
        headers = [(k, v) for k, v in self.headers if k.lower() != "content-type"]
        stored = next((v for k, v in self.headers if k.lower() == "content-type"), "")
        return [("content-type", stored if stored.startswith(wanted) else wanted), *headers]

    def header_dict(self) -> dict[str, Any]:
        """Everything but the body, as plain JSON-able data."""
        return {
            "version": ENTRY_VERSION,
            "key": self.key,
            "format": self.format,
            "status": self.status,
            "created_at": self.created_at,
            "headers": [list(h) for h in self.headers],
            "chunks": [[round(t, 6), n] for t, n in self.chunks],
            "meta": self.meta,
        }

    @classmethod
    def from_header_dict(cls, head: dict[str, Any], body: bytes) -> Entry:
        try:
            if head["version"] != ENTRY_VERSION or head["format"] not in FORMATS:
                raise EntryError(f"unsupported entry version/format {head.get('version')!r}")
            entry = cls(
                key=str(head["key"]),
                format=head["format"],
                body=body,
                headers=[(str(k), str(v)) for k, v in head["headers"]],
                created_at=float(head["created_at"]),
                status=int(head["status"]),
                chunks=[(float(t), int(n)) for t, n in head["chunks"]],
                meta=dict(head["meta"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EntryError(f"malformed entry: {e}") from e
        if entry.chunks and sum(n for _, n in entry.chunks) != len(body):
            raise EntryError("chunk lengths do not add up to the body")
        return entry

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header_dict(), separators=(",", ":")).encode()
        return MAGIC + struct.pack(">BI", ENTRY_VERSION, len(head)) + head + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        if not isinstance(data, bytes) or not data.startswith(MAGIC) or len(data) < 8:
            raise EntryError("not an ai-cache entry")
        version, size = struct.unpack(">BI", data[3:8])
        if version != ENTRY_VERSION:
            raise EntryError(f"unsupported entry version {version}")
        try:
            head = json.loads(data[8 : 8 + size])
        except ValueError as e:
            raise EntryError(f"malformed entry header: {e}") from e
        if not isinstance(head, dict):
            raise EntryError("malformed entry header")
        return cls.from_header_dict(head, data[8 + size :])


def replayable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (k, v)
        for k, v in headers
        if k.lower() not in UNREPLAYABLE_HEADERS and not k.lower().startswith(CONTROL_PREFIX)
    ]


def read_header(handle: BinaryIO) -> dict[str, Any]:
    """Everything but the body (`header_dict`) of an encoded entry, reading only its start:
    cheap even for a many-megabyte stream. For diagnostics: the body is not checked."""
    prefix = handle.read(8)
    if len(prefix) < 8 or not prefix.startswith(MAGIC) or prefix[3] != ENTRY_VERSION:
        raise EntryError("not an ai-cache entry of this version")
    try:
        head = json.loads(handle.read(struct.unpack(">I", prefix[4:8])[0]))
    except ValueError as e:
        raise EntryError(f"malformed entry header: {e}") from e
    if not isinstance(head, dict):
        raise EntryError("malformed entry header")
    return head
