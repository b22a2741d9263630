"""The fake provider over HTTP/2: hypercorn serves fake_upstream's answers over TLS (ALPN h2).

Real HTTP/2 servers often end a stream with END_STREAM in an empty DATA frame that comes
after the last event's frame. This server makes that explicit: every body chunk goes out
with `more_body=True`, then it waits `late-end-MS` (when the request or the server asks for
it) and only then sends the empty final chunk, which hypercorn turns into that frame.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

from fake_upstream import FakeUpstream, RecordedRequest, answer_chunks, late_end, next_id, parse_scenarios

Scope = dict[str, Any]


class H2Upstream(FakeUpstream):
    """`FakeUpstream`'s interface (`url`, `count`, `requests`) served by hypercorn over TLS."""

    def __init__(self, tls: tuple[str, str], scenarios: str = "") -> None:
        super().__init__(tls, scenarios)
        self._shutdown: Callable[[], object] = lambda: None

    def start(self) -> H2Upstream:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # connections queue from here on: no need to wait for hypercorn
        self.port = sock.getsockname()[1]
        self.url = f"https://localhost:{self.port}"
        config = Config()
        config.certfile, config.keyfile = self.tls or ("", "")
        config.bind = [f"fd://{sock.detach()}"]
        config.graceful_timeout = 0.5
        config.accesslog = config.errorlog = None
        loop, stopped = asyncio.new_event_loop(), asyncio.Event()
        self._shutdown = lambda: loop.call_soon_threadsafe(stopped.set)

        def run() -> None:
            loop.run_until_complete(serve(self._app, config, shutdown_trigger=stopped.wait))  # type: ignore[arg-type]
            loop.close()

        self._thread = threading.Thread(target=run, name=f"h2-upstream-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread:
            self._shutdown()
            self._thread.join(timeout=5)
        self._thread = None

    async def _app(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rec = RecordedRequest(scope["method"], scope["path"], scope["query_string"].decode(), headers, body,
                              f"HTTP/{scope['http_version']}")  # fmt: skip
        self._record(rec)
        k, scn = next_id(), parse_scenarios(headers.get("x-fake-scenario", "")) | self.scenarios
        status, content_type, chunks = answer_chunks(rec, k, scn)
        start = [(b"content-type", content_type.encode()), (b"x-request-id", f"req_{k}".encode())]
        await send({"type": "http.response.start", "status": status, "headers": start})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(late_end(scn))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
