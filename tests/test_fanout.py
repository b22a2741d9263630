"""The live broadcast of a leader's stream: late joiners, endings, the size bound."""

from __future__ import annotations

import pytest

from ai_cache.fanout import Broadcast, relayed

HEADERS = [("content-type", "text/event-stream"), ("content-encoding", "gzip"), ("x-ai-cache-status", "MISS")]


async def collect(broadcast: Broadcast, follower) -> list[bytes]:
    return [b"".join(parts) async for parts in relayed(follower)]


async def test_a_late_follower_gets_everything_so_far_at_once_then_the_rest():
    broadcast = Broadcast(200, HEADERS, "sse", 1000)
    early = broadcast.subscribe()
    broadcast.feed(b"a")
    broadcast.feed(b"")  # mitmproxy's empty calls carry nothing
    broadcast.feed(b"b")
    late = broadcast.subscribe()
    broadcast.feed(b"c")
    broadcast.end(cleanly=True)
    assert await collect(broadcast, early) == [b"a", b"b", b"c"]
    assert await collect(broadcast, late) == [b"ab", b"c"]
    # Everything so far is one chunk made of the broadcast's own parts: never copied per follower.
    so_far = await broadcast.subscribe().get()
    assert isinstance(so_far, list) and all(a is b for a, b in zip(so_far, broadcast.parts, strict=True))
    after = broadcast.subscribe()  # joins once it ended: the whole stream, then the end
    assert await collect(broadcast, after) == [b"abc"]
    # The raw bytes go on, so their content-encoding with them; our own headers do not.
    assert broadcast.headers == [("content-type", "text/event-stream"), ("content-encoding", "gzip")]


async def test_followers_of_a_stream_that_broke_off_break_off_too():
    broadcast = Broadcast(200, HEADERS, "sse", 1000)
    queue = broadcast.subscribe()
    broadcast.feed(b"half")
    broadcast.end(cleanly=False)
    broadcast.end(cleanly=True)  # the first ending stands
    received = []
    with pytest.raises(ConnectionAbortedError):
        async for parts in relayed(queue):
            received.append(b"".join(parts))
    assert received == [b"half"]


async def test_past_the_size_bound_no_one_new_joins_and_the_joined_get_it_all():
    broadcast = Broadcast(200, HEADERS, "sse", 4)
    follower = broadcast.subscribe()
    broadcast.feed(b"abc")
    assert broadcast.joinable
    assert await follower.get() == [b"abc"]  # it keeps up
    broadcast.feed(b"de")
    assert not broadcast.joinable and broadcast.parts == []
    broadcast.end(cleanly=True)
    assert await collect(broadcast, follower) == [b"de"] and broadcast.size == 5


async def test_a_follower_more_than_the_size_bound_behind_breaks_off_and_the_others_go_on():
    broadcast = Broadcast(200, HEADERS, "sse", 4)
    broadcast.feed(b"ab")
    slow, keeping_up = broadcast.subscribe(), broadcast.subscribe()  # both start with 'ab'
    received = [b"".join(await keeping_up.get())]
    for data in (b"c", b"d", b"e", b"f"):
        broadcast.feed(data)
        received.append(b"".join(await keeping_up.get()))
    broadcast.feed(b"g")  # 'cdef' waits for the slow one: 'g' would make it 5 bytes behind
    broadcast.end(cleanly=True)
    assert await collect(broadcast, keeping_up) == [b"g"] and received == [b"ab", b"c", b"d", b"e", b"f"]
    kept = []
    with pytest.raises(ConnectionAbortedError):
        async for parts in relayed(slow):
            kept.append(parts)
    assert kept == []  # what waited for it was dropped at once
