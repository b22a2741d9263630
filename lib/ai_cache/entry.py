"""A cache entry: one recorded answer, tagged with its body format, in one byte encoding.

The same bytes go to diskcache and to Redis (zlib-compressed when large), and the same
fields into exports, so the format tag, the timing of a stream and `created_at` travel
with the entry everywhere.

Every entry read back (from disk, Redis or a fixture file) is checked like input by
`validated`: others can write those places, and what passes is replayed to clients.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from .controls import CONTROL_PREFIX
from .keys import MAX_NESTING, nesting

MAGIC = b"AIC"
# Version 2 adds a CRC-32 of the whole value (corruption is a miss, never a hit);
# version 1 values, written before it, are still read.
ENTRY_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMATS = ("json", "sse", "ndjson")
CONTENT_TYPES = {
    "json": "application/json",
    "sse": "text/event-stream",
    "ndjson": "application/x-ndjson",
}
# Upstream headers never replayed: cookies, hop-by-hop, and framing that will not match.
UNREPLAYABLE_HEADERS = frozenset(
    {
        "set-cookie",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "alt-svc",
    }
)
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
HEADER_VALUE = re.compile(r"[^\r\n\x00\ud800-\udfff]*")  # no CR, LF, NUL or lone surrogate (no UTF-8)
MAX_REPLAY_SECONDS = 3600.0  # a paced replay never lasts longer
CLOCK_SKEW = 86400.0  # how far in the future `created_at` may be (another machine's clock)
META_TYPES = {"protocol": str, "model": str, "preview": str, "stream": bool, "usage": dict, "request": dict}


class EntryError(ValueError):
    """Not an entry to replay: foreign, truncated, corrupt or unsafe bytes; the message says why."""


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
            entry = cls(
                key=str(head["key"]),
                format=str(head["format"]),
                body=body,
                headers=[(str(k), str(v)) for k, v in head["headers"]],
                created_at=float(head["created_at"]),
                status=int(head["status"]),
                chunks=[(float(t), int(n)) for t, n in head["chunks"]],
                meta=dict(head["meta"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise EntryError(f"malformed entry: {e}") from e
        return validated(entry)

    def to_bytes(self) -> bytes:
        """The encoding, made once: the size check and every store ask for it. So an entry
        is not changed once encoded (only a recording's summary changes one, before)."""
        encoded: bytes | None = self.__dict__.get("_encoded")
        if encoded is None:
            head = json.dumps(self.header_dict(), separators=(",", ":")).encode()
            prefix = MAGIC + struct.pack(">BI", ENTRY_VERSION, len(head))
            checksum = zlib.crc32(self.body, zlib.crc32(head, zlib.crc32(prefix)))
            encoded = self.__dict__["_encoded"] = prefix + struct.pack(">I", checksum) + head + self.body
        return encoded

    @classmethod
    def from_bytes(cls, data: bytes, key: str | None = None) -> Entry:
        """The valid entry `data` encodes (under `key`, if given); EntryError for anything
        else (foreign, corrupt, truncated, or not passing `validated`), never another exception."""
        if not isinstance(data, bytes) or not data.startswith(MAGIC) or len(data) < 12:
            raise EntryError("not an ai-cache entry")
        version, size = struct.unpack(">BI", data[3:8])
        if version not in READABLE_VERSIONS:
            raise EntryError(f"unsupported entry version {version}")
        start = 8 if version == 1 else 12
        if version > 1:
            (checksum,) = struct.unpack(">I", data[8:12])
            if checksum != zlib.crc32(memoryview(data)[12:], zlib.crc32(data[:8])):
                raise EntryError("checksum mismatch: the stored bytes are corrupt")
        try:
            head = json.loads(data[start : start + size])
        except (ValueError, RecursionError) as e:
            raise EntryError(f"malformed entry header: {e!r}") from e
        if not isinstance(head, dict):
            raise EntryError("malformed entry header")
        entry = cls.from_header_dict(head, data[start + size :])
        if key is not None and entry.key != key:
            raise EntryError("stored under another key")
        return entry


def entry_problem(entry: Entry) -> str | None:
    """Why an entry must not be replayed, or None."""
    if not KEY_PATTERN.fullmatch(entry.key):
        return "key is not 64 lowercase hex digits"
    if entry.format not in FORMATS:
        return f"format {entry.format!r} is not one of {', '.join(FORMATS)}"
    if entry.status != 200:
        return f"status {entry.status} is not 200 (only 200 answers are cached)"
    if not 0 <= entry.created_at <= time.time() + CLOCK_SKEW:  # also false for NaN
        return f"created_at {entry.created_at!r} is not a time up to now"
    for name, value in entry.headers:
        if not HEADER_NAME.fullmatch(name) or not HEADER_VALUE.fullmatch(value):
            return f"header {name!r}: {value!r} is not a legal header"
    if not all(0 <= at <= MAX_REPLAY_SECONDS for at, _ in entry.chunks):  # also false for NaN
        return f"chunk times must be seconds from 0 to {MAX_REPLAY_SECONDS:g}"
    sizes = [n for _, n in entry.chunks]
    if sizes and (min(sizes) < 0 or sum(sizes) != len(entry.body)):
        return f"chunk lengths add up to {sum(sizes)}, the body has {len(entry.body)} bytes"
    for name, kind in META_TYPES.items():
        if name in entry.meta and not isinstance(entry.meta[name], kind):
            return f"meta {name!r} is not a {kind.__name__}"
    usage = entry.meta.get("usage", {})
    if not all(type(usage.get(name, 0)) is int for name in ("input", "output")):
        return "meta 'usage' counts are not integers"
    if nesting(entry.meta) > MAX_NESTING + 2:  # the request copy sits two levels down
        return f"meta nested deeper than {MAX_NESTING + 2} levels"
    return None


def validated(entry: Entry) -> Entry:
    """`entry` without the headers never replayed, or EntryError saying why it is unsafe."""
    problem = entry_problem(entry)
    if problem:
        raise EntryError(problem)
    return replace(entry, headers=replayable_headers(entry.headers))


def replayable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Legal headers minus cookies, hop-by-hop, framing and our own."""
    return [
        (k, v)
        for k, v in headers
        if k.lower() not in UNREPLAYABLE_HEADERS
        and not k.lower().startswith(CONTROL_PREFIX)
        and HEADER_NAME.fullmatch(k)
        and HEADER_VALUE.fullmatch(v)
    ]


def read_header(handle: BinaryIO) -> dict[str, Any]:
    """Everything but the body (`header_dict`) of an encoded entry, reading only its start:
    cheap even for a many-megabyte stream. For diagnostics: the body is not checked."""
    prefix = handle.read(8)
    if len(prefix) < 8 or not prefix.startswith(MAGIC) or prefix[3] not in READABLE_VERSIONS:
        raise EntryError("not an ai-cache entry of a readable version")
    if prefix[3] > 1:
        handle.read(4)  # the checksum covers the body too: not checked here
    try:
        head = json.loads(handle.read(struct.unpack(">I", prefix[4:8])[0]))
    except (ValueError, RecursionError) as e:
        raise EntryError(f"malformed entry header: {e}") from e
    if not isinstance(head, dict):
        raise EntryError("malformed entry header")
    return head
