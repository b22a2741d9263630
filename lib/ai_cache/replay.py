"""Paced replay: a hit's recorded chunks with the recorded gaps (ai_cache_replay_speed);
and live fan-out: a follower gets an in-flight leader's stream as it arrives.

mitmproxy sends a response made in the `request` hook in one piece, so paced replay
goes through a tiny HTTP server inside the proxy: the flow is pointed at it with a
one-time token, and it writes the recorded chunks with the recorded gaps, or relays a
live `Broadcast` (chunked, ending as the leader's stream ended). `PacedReplay` owns the
whole detour (redirect, streaming, restoring the URL, forgetting an
unused token, the server's life); `AICache` hands it the hits to pace and the followers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from mitmproxy import connection, http

from .entry import Entry
from .fanout import Broadcast, Subscription, relayed
from .state import FlowState

logger = logging.getLogger(__name__)
TOKEN_HEADER = "x-ai-cache-replay-token"
TOKEN_LIFETIME = 60.0  # a registered replay mitmproxy never fetched (another addon answered)
READ_TIMEOUT = 10.0
WRITE_PIECE = 64 * 1024  # bytes of a live chunk written at a time


def send_to_replay_server(flow: http.HTTPFlow, port: int, token: str) -> None:
    """Point `flow` at the replay server on this machine, over a connection of its own.

    mitmproxy opens a flow's connection through `flow.server_conn.via`, which upstream
    mode (`--mode upstream:...`) sets on the client's shared server object: a fresh
    server without `via` keeps the replay (its token, the cached answer) off the parent
    proxy, and leaves the client's other flows routed as before.
    """
    flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", port
    flow.request.headers[TOKEN_HEADER] = token
    flow.server_conn = connection.Server(address=("127.0.0.1", port))


def paced_parts(entry: Entry, speed: float) -> list[tuple[float, bytes]]:
    """(send at, bytes) per recorded chunk, the first one at once."""
    parts, offset = [], 0
    for at, size in entry.chunks or [(0.0, len(entry.body))]:
        parts.append((at / speed, entry.body[offset : offset + size]))
        offset += size
    return parts


@dataclass(frozen=True)
class Live:
    """A follower's subscription to a leader's stream."""

    broadcast: Broadcast
    subscription: Subscription


class ReplayServer:
    """Serves registered entries, each once, chunk by chunk at the recorded pace."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        # token -> (entry or live subscription, extra headers, speed, registered at)
        self._pending: dict[str, tuple[Entry | Live, list[tuple[str, str]], float, float]] = {}
        self.port = 0

    async def ensure_started(self) -> int:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def register(self, source: Entry | Broadcast, extra_headers: list[tuple[str, str]], speed: float = 1.0) -> str:
        """A token for one replay of `source`; a broadcast is subscribed to at once, so the
        follower misses none of it."""
        now = time.monotonic()
        for stale in [t for t, (*_, at) in self._pending.items() if now - at > TOKEN_LIFETIME]:
            self.forget(stale)
        token = secrets.token_urlsafe(16)
        item = Live(source, source.subscribe()) if isinstance(source, Broadcast) else source
        self._pending[token] = (item, extra_headers, speed, now)
        return token

    def forget(self, token: str) -> None:
        source, *_ = self._pending.pop(token, (None,))
        if isinstance(source, Live):
            source.broadcast.unsubscribe(source.subscription)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            lines = [line.partition(b":") for line in head.split(b"\r\n")[1:] if b":" in line]
            headers = http.Headers([(name, value) for name, _, value in lines])
            length = int(headers.get("content-length", "0") or 0)
            await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
            registered = self._pending.pop(headers.get(TOKEN_HEADER, "").strip(), None)
            if registered is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                return
            source, extra, speed, _ = registered
            if isinstance(source, Live):
                await self._relay(writer, source, extra)
                return
            entry = source
            fields = entry.replay_headers() + extra
            fields += [("content-length", str(len(entry.body))), ("connection", "close")]
            head_lines = "".join(f"{k}: {v}\r\n" for k, v in fields)
            writer.write(f"HTTP/1.1 {entry.status} OK\r\n{head_lines}\r\n".encode())
            loop = asyncio.get_running_loop()
            start = loop.time()
            for at, data in paced_parts(entry, speed):
                delay = start + at - loop.time()
                if delay > 0:
                    await writer.drain()
                    await asyncio.sleep(delay)
                writer.write(data)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            logger.debug("ai-cache: replay client went away")
        finally:
            writer.close()

    @staticmethod
    async def _relay(writer: asyncio.StreamWriter, live: Live, extra: list[tuple[str, str]]) -> None:
        """A leader's stream, chunk by chunk as it arrives; if it broke off, the connection is
        cut without the final chunk, so the follower's client sees it break off too."""
        fields = live.broadcast.headers + extra + [("transfer-encoding", "chunked"), ("connection", "close")]
        head_lines = "".join(f"{k}: {v}\r\n" for k, v in fields)
        writer.write(f"HTTP/1.1 {live.broadcast.status} OK\r\n{head_lines}\r\n".encode())
        try:
            async for parts in relayed(live.subscription):
                size = sum(map(len, parts))
                if size <= WRITE_PIECE:  # a live chunk: one write
                    writer.write(b"%x\r\n%s\r\n" % (size, b"".join(parts)))
                    await writer.drain()
                    continue
                # In pieces, each drained: a late follower's stream so far (up to
                # ai_cache_max_body) is never copied whole into its socket's buffer.
                writer.write(b"%x\r\n" % size)
                for part in parts:
                    view = memoryview(part)
                    for start in range(0, len(part), WRITE_PIECE):
                        writer.write(view[start : start + WRITE_PIECE])
                        await writer.drain()
                writer.write(b"\r\n")
        except ConnectionAbortedError:
            writer.transport.abort()
            return
        finally:
            live.broadcast.unsubscribe(live.subscription)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._pending.clear()


class PacedReplay:
    """Replays hits at their recorded pace, and live streams, through `ReplayServer`:
    AICache sends flows here and tells it of their way back (first, so that the URL is
    restored before anything logs the flow)."""

    def __init__(self) -> None:
        self.server = ReplayServer()
        self._following: dict[str, Broadcast] = {}  # token -> the stream a follower joined, for its size

    @staticmethod
    def wanted(entry: Entry, speed: float) -> bool:
        """Pacing a single chunk, or a JSON body, would only delay it."""
        return speed > 0 and entry.format != "json" and len(entry.chunks) > 1

    async def pace(
        self,
        flow: http.HTTPFlow,
        state: FlowState,
        source: Entry | Broadcast,
        headers: list[tuple[str, str]],
        speed: float = 1.0,
    ) -> None:
        """Send `flow` to the replay server, which answers it with `source` (a recorded
        entry at `speed`, or a leader's live stream) and `headers`."""
        port = await self.server.ensure_started()
        state.token = self.server.register(source, headers, speed)
        if isinstance(source, Broadcast):
            self._following[state.token] = source
        state.original_url = flow.request.url
        send_to_replay_server(flow, port, state.token)

    # The flow's way back, told by AICache's hooks for flows it sent here (state.token).

    def responseheaders(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if flow.response is None:
            return
        flow.response.stream = True  # our own server: pass it on chunk by chunk
        # It closes its side after each answer; the client's connection stays open.
        flow.response.headers.pop("connection", None)

    def response(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if not state.original_url:
            return
        flow.request.url, state.original_url = state.original_url, None
        flow.request.headers.pop(TOKEN_HEADER, None)
        if (followed := self._following.pop(state.token or "", None)) is not None:
            state.size = followed.size

    def error(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if not state.token:
            return
        self.server.forget(state.token)
        self.response(flow, state)
        logger.debug("ai-cache: paced replay ended early: %s", flow.error)

    async def done(self) -> None:
        await self.server.close()
