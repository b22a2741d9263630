"""The bounded content-encoding decoders the capture records compressed answers with."""

from __future__ import annotations

import zlib

import brotli
import pytest
import zstandard

from ai_cache.decoders import BOUNDED_BROTLI, decoder_for

TEXT = b"".join(b'data: {"choices": [{"delta": {"content": "word %d "}}]}\n\n' % i for i in range(2000))
NEEDS_BOUNDED_BROTLI = pytest.mark.skipif(not BOUNDED_BROTLI, reason="Brotli < 1.2 has no output limit")


def gzip(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=31)
    return c.compress(data) + c.flush()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODINGS = [
    pytest.param("gzip", gzip, id="gzip"),
    pytest.param("deflate", zlib.compress, id="deflate"),
    pytest.param("zstd", lambda data: zstandard.ZstdCompressor().compress(data), id="zstd"),
    pytest.param("br", brotli.compress, id="br", marks=NEEDS_BOUNDED_BROTLI),
]


def decode_in_pieces(encoding: str, data: bytes, room: int, piece: int = 97) -> bytes:
    decoder = decoder_for(encoding)
    assert decoder is not None
    out = b""
    for i in range(0, len(data), piece):
        out += decoder.decode(data[i : i + piece], room - len(out))
        if len(out) > room:
            break
    return out


@pytest.mark.parametrize("encoding,encode", ENCODINGS)
def test_round_trip_in_small_pieces(encoding, encode):
    assert decode_in_pieces(encoding, encode(TEXT), 10 * len(TEXT)) == TEXT


@pytest.mark.parametrize("encoding,encode", ENCODINGS)
def test_output_stops_one_byte_past_the_room(encoding, encode):
    bomb = encode(b"\0" * 20_000_000)
    decoder = decoder_for(encoding)
    out = decoder.decode(bomb, 1000)
    assert out == b"\0" * 1001


def test_deflate_without_its_zlib_header_and_gzip_with_several_members():
    assert decode_in_pieces("deflate", raw_deflate(TEXT), 10 * len(TEXT)) == TEXT
    assert decode_in_pieces("gzip", gzip(TEXT[:1000]) + gzip(TEXT[1000:]), 10 * len(TEXT), 50) == TEXT


def test_encodings_without_a_bounded_decoder_are_refused():
    assert decoder_for("compress") is None and decoder_for("gzip, br") is None
    assert (decoder_for("br") is None) == (not BOUNDED_BROTLI)
