"""The embeddings client: text to a unit vector, failing open.

An OpenAI-compatible `/embeddings` endpoint or Ollama's native `/api/embed` (chosen by
the URL's path). Calls are bounded by the timeout and sit behind a circuit breaker, and
recent texts are remembered (LRU): a dead or slow embedder costs one timeout per
cool-down and leaves exact caching as it was. HTTP/1.1 on asyncio streams with a few
kept-alive connections, so no call blocks the event loop and mitmproxy needs no new
HTTP library. The API key is read from the environment once; it never reaches an
option, a log line or an entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..keys import CREDENTIAL_PARAMS
from ..redis_store import CircuitBreaker, redact

logger = logging.getLogger(__name__)
LRU_SIZE = 2048
IDLE_CONNECTIONS = 4
# An embeddings answer is parsed on the event loop: 1 MiB of JSON takes a few ms, 32 MiB
# stalled every flow for half a second. Real vectors are far smaller (3072 floats ~60 KiB).
MAX_ANSWER = 1024 * 1024
MAX_DIMS = 16384


class EmbedError(Exception):
    """The embedder gave no usable vector; the message says why."""


def shown(url: str) -> str:
    """The URL as log lines and partitions see it: no password, no credential in the query
    (`?key=`, `api-key=`...: the names the cache key never keeps either)."""
    parts = urlsplit(redact(url))
    pairs = (pair.partition("=") for pair in parts.query.split("&")) if parts.query else ()
    query = "&".join(f"{k}=***" if k.lower() in CREDENTIAL_PARAMS else f"{k}{eq}{v}" for k, eq, v in pairs)
    return urlunsplit(parts._replace(query=query))


class HTTPEndpoint:
    """POSTs JSON to one URL over HTTP/1.1, keeping a few connections alive."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{shown(url)!r} is not an http:// or https:// URL")
        self.tls = parts.scheme == "https"
        # Made here, at configure time: it reads the system's CAs (16 ms), too long for a hook.
        self.context = ssl.create_default_context() if self.tls else None
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        self.authority = self.host if default_port else f"{self.host}:{self.port}"
        self.path = parts.path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """(status, body); a kept-alive connection the server closed meanwhile is retried once."""
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._exchange(reader, writer, body, headers)
            except (ConnectionError, asyncio.IncompleteReadError, EmbedError):
                writer.close()  # closed by the server meanwhile: try the next
            except BaseException:
                writer.close()
                raise
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.context)
        try:
            return await self._exchange(reader, writer, body, headers)
        except BaseException:
            writer.close()
            raise

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        head = [f"POST {self.target} HTTP/1.1", f"host: {self.authority}", f"content-length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise EmbedError("connection closed before an answer")
        fields = status_line.split()
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        answer_headers: dict[bytes, bytes] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            answer_headers[name.strip().lower()] = value.strip()
        if answer_headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            data = await self._chunked(reader)
        elif (length := answer_headers.get(b"content-length", b"")).isdigit():
            if int(length) > MAX_ANSWER:
                raise EmbedError("answer too large")
            data = await reader.readexactly(int(length))
        else:
            data = await self._to_end(reader)
            answer_headers[b"connection"] = b"close"
        if answer_headers.get(b"connection", b"").lower() == b"close" or len(self._idle) >= IDLE_CONNECTIONS:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, data

    @staticmethod
    async def _to_end(reader: asyncio.StreamReader) -> bytes:
        """A body ended by closing the connection (read() returns what has come so far)."""
        data = bytearray()
        while chunk := await reader.read(MAX_ANSWER + 1 - len(data)):
            data += chunk
            if len(data) > MAX_ANSWER:
                raise EmbedError("answer too large")
        return bytes(data)

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        data = bytearray()
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            if len(data) + size > MAX_ANSWER:
                raise EmbedError("answer too large")
            data += await reader.readexactly(size)
            await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return bytes(data)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def unit_vector(values: object) -> np.ndarray:
    """A list of finite numbers as a float32 unit vector; EmbedError for anything else."""
    if not isinstance(values, list) or not values or not all(type(v) in (int, float) for v in values):
        raise EmbedError("the answer holds no vector of numbers")
    if len(values) > MAX_DIMS:
        raise EmbedError(f"a vector of {len(values)} dimensions")
    vector = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0:
        raise EmbedError("the vector is zero or not finite")
    return vector / norm


class Embedder:
    """Text to unit vectors through one endpoint; `None` whenever it cannot say."""

    def __init__(self, url: str, model: str, key_env: str, timeout: float) -> None:
        self.url = url
        self.model = model
        self.timeout = timeout
        self.endpoint = HTTPEndpoint(url)
        self.ollama = self.endpoint.path.rstrip("/").endswith("/api/embed")
        key = os.environ.get(key_env, "") if key_env else ""
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self.breaker = CircuitBreaker(f"embedder at {shown(url)}")
        self.dims = 0  # learnt from the first vector: a later answer of another size is wrong
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self.on_call: Callable[[float], None] | None = None  # told each call's seconds (metrics)

    @property
    def identity(self) -> list[object]:
        """What makes its vectors comparable: part of every partition."""
        return [shown(self.url), self.model, self.dims]

    async def embed(self, text: str) -> np.ndarray | None:
        if (known := self._lru.get(text)) is not None:
            self._lru.move_to_end(text)
            return known
        if not self.breaker.allow():
            return None
        probe = self.breaker.is_open
        started = time.perf_counter()
        try:
            vector = await asyncio.wait_for(self._call(text), self.timeout)
        except asyncio.CancelledError:
            self.breaker.cancelled(probe)
            raise
        except Exception as e:  # fail open: exact caching goes on without semantic hits
            self.breaker.failure(e, probe)
            return None
        finally:
            if self.on_call is not None:
                self.on_call(time.perf_counter() - started)
        self.breaker.success(probe)
        self._lru[text] = vector
        if len(self._lru) > LRU_SIZE:
            self._lru.popitem(last=False)
        return vector

    async def _call(self, text: str) -> np.ndarray:
        status, data = await self.endpoint.post(
            json.dumps({"model": self.model, "input": text}).encode(), self._headers
        )
        if status != 200:
            raise EmbedError(f"answered {status}")
        try:
            answer = json.loads(data)
            values = answer["embeddings"][0] if self.ollama else answer["data"][0]["embedding"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EmbedError("the answer is not an embeddings response") from None
        vector = unit_vector(values)
        if self.dims and len(vector) != self.dims:
            raise EmbedError(f"a vector of {len(vector)} dimensions, the first had {self.dims}")
        self.dims = len(vector)
        return vector

    def close(self) -> None:
        self.endpoint.close()
