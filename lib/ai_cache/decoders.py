"""Incremental decoders for compressed answers that never produce more than asked.

Some upstreams compress a stream although they were asked for `identity`. The capture
decodes what it records (the client still gets the bytes as sent) with these: each call
gets the room left under ai_cache_max_body and returns at most one byte more, so a
small chunk that would expand a thousandfold (a zip bomb) costs the cap, not its size.
brotli and zstandard come with mitmproxy.
"""

from __future__ import annotations

import zlib
from typing import IO, Protocol, cast

import brotli
import zstandard

ZSTD_WINDOW = 8 * 1024 * 1024  # the most HTTP zstd needs (RFC 9659); larger is refused


def _brotli_is_bounded() -> bool:
    """Brotli >= 1.2 (mitmproxy 12) can stop its output at a limit; 1.1 (mitmproxy 11) cannot."""
    try:
        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except TypeError:
        return False
    return True


BOUNDED_BROTLI = _brotli_is_bounded()
DECODE_ERRORS = (zlib.error, brotli.error, zstandard.ZstdError)


class Decoder(Protocol):
    def decode(self, data: bytes, room: int) -> bytes:
        """The output for `data`: at most `room + 1` bytes; more than `room` means it did
        not fit, and the decoder must not be used again."""
        ...


class ZlibDecoder:
    """gzip (also several members), deflate (zlib-wrapped, or raw as some servers send)."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._zlib = zlib.decompressobj(wbits)
        self._started = False

    def decode(self, data: bytes, room: int) -> bytes:
        try:
            out = self._zlib.decompress(data, room + 1)
        except zlib.error:
            if self._started or self._wbits != zlib.MAX_WBITS:
                raise
            self._wbits = -zlib.MAX_WBITS  # deflate without its zlib header
            self._zlib = zlib.decompressobj(self._wbits)
            out = self._zlib.decompress(data, room + 1)
        self._started = True
        while self._zlib.eof and self._zlib.unused_data and len(out) <= room:
            rest = self._zlib.unused_data
            self._zlib = zlib.decompressobj(self._wbits)
            out += self._zlib.decompress(rest, room + 1 - len(out))
        return out


class BrotliDecoder:
    def __init__(self) -> None:
        self._brotli = brotli.Decompressor()

    def decode(self, data: bytes, room: int) -> bytes:
        parts = [self._brotli.process(data, output_buffer_limit=room + 1)]
        size = len(parts[0])
        while size <= room and not self._brotli.can_accept_more_data():
            parts.append(self._brotli.process(b"", output_buffer_limit=room + 1 - size))
            if not parts[-1]:
                break
            size += len(parts[-1])
        return b"".join(parts)[: room + 1]  # the limit stops the buffer's growth, not exactly


class _Full(Exception):
    pass


class _Sink:
    """Where zstandard writes its output, a block at a time; refuses past the room."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.room = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data[: self.room + 1]))
        self.room -= len(self.parts[-1])
        if self.room < 0:
            raise _Full
        return len(data)


class ZstdDecoder:
    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW).stream_writer(
            cast(IO[bytes], self._sink),  # zstandard only calls write() on it
            write_size=64 * 1024,
            closefd=False,
        )

    def decode(self, data: bytes, room: int) -> bytes:
        self._sink.parts, self._sink.room = [], room
        try:
            self._writer.write(data)
        except _Full:
            pass
        return b"".join(self._sink.parts)


def decoder_for(encoding: str) -> Decoder | None:
    """A decoder for a `content-encoding` value, None when it cannot be decoded here."""
    if encoding == "gzip" or encoding == "x-gzip":
        return ZlibDecoder(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return ZlibDecoder(zlib.MAX_WBITS)
    if encoding == "zstd":
        return ZstdDecoder()
    if encoding == "br" and BOUNDED_BROTLI:
        return BrotliDecoder()
    return None
