"""A deterministic fake embeddings server whose vectors the tests control.

Serves OpenAI's `POST /v1/embeddings` and Ollama's `POST /api/embed` from a daemon
thread. A text gets the vector set for it (`set`, `similar`), else a pseudo-random unit
vector derived from its SHA-256 (unrelated texts land near cosine 0). `delay`, `status`
and `dims` make it slow, failing or inconsistent; `calls` lists the texts asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

DIMS = 16


def hashed_vector(text: str, dims: int = DIMS) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(dims)
    return (vector / np.linalg.norm(vector)).tolist()


class FakeEmbedder:
    def __init__(self) -> None:
        self.vectors: dict[str, list[float]] = {}
        self.calls: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.delay = 0.0
        self.status = 200
        self.dims = DIMS
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/embeddings"

    @property
    def ollama_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api/embed"

    def start(self) -> FakeEmbedder:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def vector(self, text: str) -> list[float]:
        return self.vectors.get(text) or hashed_vector(text, self.dims)

    def similar(self, text: str, other: str, cosine: float) -> None:
        """Give `other` a vector at exactly `cosine` from `text`'s (which keeps its own)."""
        base = np.asarray(self.vector(text))
        ortho = np.asarray(hashed_vector("orthogonal to " + other, len(base)))
        ortho -= ortho.dot(base) * base
        ortho /= np.linalg.norm(ortho)
        self.vectors[text] = base.tolist()
        self.vectors[other] = (cosine * base + math.sqrt(1 - cosine**2) * ortho).tolist()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                text = body["input"] if isinstance(body["input"], str) else body["input"][0]
                fake.calls.append(text)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                if fake.delay:
                    time.sleep(fake.delay)
                vector = fake.vector(text)
                if self.path == "/api/embed":
                    answer: dict[str, Any] = {"model": body["model"], "embeddings": [vector]}
                else:
                    answer = {"object": "list", "model": body["model"], "data": [{"index": 0, "embedding": vector}]}
                data = json.dumps(answer if fake.status == 200 else {"error": "down"}).encode()
                self.send_response(fake.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
