"""End to end: answers the upstream compressed are recorded decoded (bounded by
ai_cache_max_body) and replayed uncompressed."""

from __future__ import annotations

import zlib

import brotli
import pytest
import zstandard

from ai_cache.decoders import BOUNDED_BROTLI
from helpers import CHAT, chat_body, post, stream_raw, wait_for_status

# An upstream that compresses its stream although asked for `identity` had it passed
# through and never cached. The capture decodes what it records (bounded by
# ai_cache_max_body, whatever the compression ratio); a hit replays it uncompressed.
DECODERS = {
    "gzip": lambda b: zlib.decompress(b, 31),
    "deflate": zlib.decompress,
    "br": brotli.decompress,
    "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b),
}


@pytest.mark.parametrize("encoding", DECODERS)
def test_compressed_streams_are_stored_decoded(shared_proxy, upstream, marker, encoding):
    body = chat_body(marker, stream=True)
    first, raw = stream_raw(shared_proxy, upstream, CHAT, body, {"x-fake-scenario": f"encode-{encoding}"})
    assert (first.headers["x-ai-cache-status"], first.headers["content-encoding"]) == ("MISS", encoding)
    sent = DECODERS[encoding](raw)  # the client got the upstream's bytes as they were
    assert sent.endswith(b"data: [DONE]\n\n")
    if encoding == "br" and not BOUNDED_BROTLI:
        pytest.skip("this brotli cannot decode within a bound (Brotli < 1.2): br streams pass uncached")
    hit = wait_for_status(shared_proxy, upstream, body, "HIT")
    _, replayed = stream_raw(shared_proxy, upstream, CHAT, body)
    assert "content-encoding" not in hit.headers
    assert replayed == sent and upstream.count(marker) == 1


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_compressed_json_answers_are_stored_decoded(shared_proxy, upstream, marker, encoding):
    first = post(shared_proxy, upstream, CHAT, chat_body(marker), {"x-fake-scenario": f"encode-{encoding}"})
    hit = wait_for_status(shared_proxy, upstream, chat_body(marker), "HIT")
    assert "content-encoding" not in hit.headers
    assert hit.json()["choices"] == first.json()["choices"] and upstream.count(marker) == 1


def test_a_compressed_stream_over_the_size_cap_is_passed_on_not_stored(start_proxy, upstream, marker):
    proxy = start_proxy(ai_cache_max_body="64KiB")
    body = chat_body(marker, stream=True)
    headers = {"x-fake-scenario": "encode-gzip,big", "x-fake-size": "2000000"}  # ~2 MB in ~20 KB of gzip
    first, raw = stream_raw(proxy, upstream, CHAT, body, headers)
    assert len(raw) < 64 * 1024 < len(zlib.decompress(raw, 31))
    assert post(proxy, upstream, CHAT, body, {"cache-control": "only-if-cached"}).status_code == 504
    proxy.stop()
    assert "not stored: larger than ai_cache_max_body" in proxy.logs()
