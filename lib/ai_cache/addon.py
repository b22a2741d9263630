"""The mitmproxy addon: thin glue between hooks, keys, capture, replay and the stores.

Per-flow state is a plain dict in `flow.metadata["ai_cache"]` (it survives `-w` flow
files); the live stream capture rides on `flow.response.stream` itself.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

from .capture import StreamCapture, body_format
from .controls import Controls, take_controls
from .entry import Entry, replayable_headers
from .flights import InFlight
from .keys import cacheable_request, header_map, host_of, path_of, stored_request
from .redis_store import redact
from .nearest import explain_miss
from .options import OPTION_NAMES, OPTIONS, Settings, allow_hosts, misset_options
from .protocols import BY_NAME, recognise
from .replay import TOKEN_HEADER, ReplayServer, immediate_response, make_headers, send_to_replay_server
from .report import Tally, flow_line, human_size, show_connection_lines, store_outcome
from .tiers import NotStorable, TieredCache, Written, open_cache

logger = logging.getLogger(__name__)
META = "ai_cache"
STORE_SETTINGS = ("directory", "redis_url", "redis_timeout", "redis_prefix", "redis_pool")
RECORDING = ("MISS", "REFRESH")  # statuses whose answer comes from upstream and may be stored


def summarise(entry: Entry) -> None:
    """Metadata for humans and the CLI, and the request copy kept; parses the answer (a
    stream only at its edges), so it runs in the write's worker thread."""
    protocol = BY_NAME[entry.meta["protocol"]]
    entry.meta["usage"] = protocol.usage(entry.body, entry.format)
    entry.meta["preview"] = protocol.preview(entry.meta["request"]["body"])
    entry.meta["request"] = stored_request(entry.meta["request"])


def where(flow: http.HTTPFlow) -> str:
    """Host and path for log lines; never the query, which may carry a key."""
    return host_of(flow.request) + path_of(flow.request)


class AICache:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.cache: TieredCache | None = None
        self.replayer = ReplayServer()
        self.flights = InFlight()
        self.tally = Tally()

    def load(self, loader) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, help_text)
        # Errors logged while the proxy starts stop it; raising here would not (see misset_options).
        for problem in misset_options(getattr(loader.master.options, "deferred", {})):
            logger.error("ai-cache: %s", problem)

    def configure(self, updated: set[str]) -> None:
        if not updated & OPTION_NAMES:
            return
        try:
            settings = Settings.from_options(ctx.options)
            if self.settings is None or any(
                getattr(self.settings, f) != getattr(settings, f) for f in STORE_SETTINGS
            ):
                self._open_stores(settings)
        except exceptions.OptionsError as e:
            if self.settings is not None:
                raise  # a change while running: mitmproxy rolls it back and reports it
            # At startup mitmproxy prints a raised error with its traceback; one logged error
            # line stops the proxy just the same, and the addon stays unconfigured meanwhile.
            logger.error("ai-cache: %s", e)
            return
        self.settings = settings
        assert self.cache is not None
        self.cache.ttl = settings.ttl
        show_connection_lines(settings.connection_log)
        logger.info(
            "ai-cache: mode=%s dir=%s ttl=%s max_body=%s coalesce=%s replay_speed=%s%s",
            settings.mode,
            self.cache.disk.directory if self.cache.disk and not self.cache.disk.read_only
            else f"{settings.directory} ({'read-only' if self.cache.disk else 'unusable'})",
            f"{settings.ttl:g}s" if settings.ttl else "forever",
            human_size(settings.max_body),
            f"{settings.coalesce:g}s" if settings.coalesce else "off",
            settings.replay_speed or "instant",
            f" redis={redact(settings.redis_url)}" if settings.redis_url else "",
        )

    def _open_stores(self, settings: Settings) -> None:
        try:
            cache = open_cache(settings)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        old, self.cache = self.cache, cache
        if old is not None:
            self._close_later(old)

    def _close_later(self, old: TieredCache) -> None:
        """Close stores replaced at runtime, once their pending writes are done."""
        assert self.cache is not None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # configured before the proxy runs: nothing is pending yet
            if old.disk is not None:
                old.disk.close_sync()
            return
        self.cache.background(old.close())

    def running(self) -> None:
        # A hit must never wait for (or fail on) a connection to the real host.
        if not ctx.options.has_changed("connection_strategy"):
            ctx.options.update(connection_strategy="lazy")
        # Only the listed hosts are decrypted: every other TLS connection is tunnelled.
        if self.settings and self.settings.hosts and not ctx.options.has_changed("allow_hosts"):
            ctx.options.update(allow_hosts=allow_hosts(self.settings.hosts))

    async def done(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        await self.replayer.close()
        logger.info("ai-cache: %s", self.tally.summary())

    # Request path

    async def request(self, flow: http.HTTPFlow) -> None:
        if self.settings is None or self.cache is None or flow.response or flow.error:
            return
        protocol = recognise(flow.request.method, path_of(flow.request))
        if protocol is None or not self._host_wanted(flow.request):
            return
        headers = header_map(flow.request)
        found = cacheable_request(flow.request, headers, protocol, self.settings.policy)
        if found is not None and not protocol.expects(found.body):
            return  # only the path looked like an LLM call: leave it untouched
        controls = take_controls(flow.request, headers)
        info: dict[str, Any] = {"protocol": protocol.name, "status": "BYPASS", "key": ""}
        flow.metadata[META] = info
        if found is None or found.refused:
            info["reason"] = found.refused if found else "request body is not a JSON object"
        else:
            info.update(key=found.key, model=found.model, stream=found.stream, request=found.described)
            await self._route(flow, info, controls)
        self.tally.count(info["status"])
        if info["status"] in RECORDING and flow.response is None:
            # Plain bytes are what the capture can scan and the cache can replay.
            flow.request.headers["accept-encoding"] = "identity"

    def _host_wanted(self, request: http.Request) -> bool:
        """The `ai_cache_hosts` allow-list: globs match the host, or host:port."""
        assert self.settings is not None
        if not self.settings.hosts:
            return True
        names = (request.host.lower(), host_of(request), f"{request.host.lower()}:{request.port}")
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.settings.hosts for name in names)

    async def _route(self, flow: http.HTTPFlow, info: dict[str, Any], controls: Controls) -> None:
        """BYPASS, REFRESH, or look up: HIT, or MISS (answered 504 when upstream is off-limits)."""
        assert self.settings is not None and self.cache is not None
        mode = self.settings.mode
        offline = mode == "replay"
        if mode == "off":
            info["reason"] = "ai_cache_mode=off"
        elif controls.bypass and not offline:
            info["reason"] = "client asked"
        elif not self.cache.stores and not offline:
            info["reason"] = "no usable cache store"
        elif (mode == "refresh" or controls.refresh) and not (offline or controls.only_if_cached):
            info["status"] = "REFRESH"
        elif (found := await self.cache.find(info["key"], controls.max_age, any_age=offline)) and not found.stale:
            await self._serve_hit(flow, info, found.entry, found.layer)
        elif not offline and (hit := await self._answer_of_identical_request(info, controls.max_age)):
            info["coalesced"] = True
            await self._serve_hit(flow, info, *hit)
        else:
            info["status"] = "MISS"
            stale = found.stale if found else ""
            if offline or controls.only_if_cached:
                flow.response = await self._no_recording(info, offline, stale)
            else:
                if stale:
                    info["expired"] = stale
                if self.settings.coalesce and not info.get("followed"):
                    info["leader"] = self.flights.lead(info["key"])

    async def _answer_of_identical_request(self, info: dict[str, Any], max_age: float | None) -> tuple[Entry, str] | None:
        """Wait (bounded) for an identical request in flight and take its answer.

        A leader that lands without a usable entry (an error, a reset, an answer too old
        for this client) sends all its followers upstream at once, none of them leading
        (Varnish's hit-for-pass): a chain of new leaders would make the last one wait for
        every answer before it."""
        assert self.settings is not None and self.cache is not None
        if not await self.flights.follow(info["key"], self.settings.coalesce):
            return None
        info["followed"] = True
        return await self.cache.lookup(info["key"], max_age)

    def _cache_headers(self, info: dict[str, Any]) -> list[tuple[str, str]]:
        if not (self.settings and self.settings.headers):
            return []
        headers = [("x-ai-cache-status", info["status"])]
        if info.get("key"):
            headers.append(("x-ai-cache-key", info["key"]))
        if info["status"] == "HIT":
            headers += [("x-ai-cache-age", str(int(info["age"]))), ("x-ai-cache-layer", info["layer"])]
        return headers

    async def _serve_hit(self, flow: http.HTTPFlow, info: dict[str, Any], entry: Entry, layer: str) -> None:
        assert self.settings is not None
        info.update(status="HIT", layer=layer, age=entry.age(), format=entry.format,
                    size=len(entry.body), saved_tokens=sum(entry.tokens()))
        self.tally.tokens_saved += info["saved_tokens"]
        self.tally.bytes_served += len(entry.body)
        headers = self._cache_headers(info)
        speed = self.settings.replay_speed
        if speed > 0 and entry.format != "json" and len(entry.chunks) > 1:
            port = await self.replayer.ensure_started()
            info["token"] = self.replayer.register(entry, headers, speed)
            info["original_url"] = flow.request.url
            send_to_replay_server(flow, port, info["token"])
        else:
            flow.response = immediate_response(entry, headers)
            flow.is_replay = "response"

    async def _no_recording(self, info: dict[str, Any], offline: bool, stale: str) -> http.Response:
        """The 504 for a miss that may not go upstream: what is missing, why it missed (the
        prompt, the nearest recording and where it differs) and what to do. `x-should-retry:
        false` stops the SDKs' retries, which cannot help."""
        assert self.settings is not None and self.cache is not None
        why = "ai_cache_mode=replay" if offline else "the client sent Cache-Control: only-if-cached"
        request = info.get("request", {})
        what = (f"this {info['protocol']} request (model {info.get('model') or '-'}, "
                f"{request.get('host', '')}{request.get('path', '')}, key {info['key'][:16]})")
        if stale:
            missing, explained = f"the recording of {what} is {stale}", {}
            info["reason"] = f"recording {stale}, answered 504 ({why})"
        else:
            explanation = await explain_miss(self.cache.disk, request, info.get("model", ""), self.settings.policy)
            missing, explained = f"no recording for {what}: {explanation.sentence()}", explanation.as_json()
            info["reason"] = f"no recording, answered 504 ({why}); {explanation.sentence()}"
        message = (
            f"ai-cache: {missing}; {why} forbids contacting upstream. Record it by running "
            f"once with ai_cache_mode=record (the default) and the upstream reachable."
        )
        body = {"type": "error", "error": {"type": "ai_cache_miss", "code": "ai_cache_no_recording",
                                           "message": message, "key": info["key"], **explained}}
        info["served"] = True
        headers = [("content-type", "application/json"), ("x-should-retry", "false"), *self._cache_headers(info)]
        return http.Response.make(504, json.dumps(body), make_headers(headers))

    # Response path

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        info = flow.metadata.get(META)
        if not info or flow.response is None or self.settings is None:
            return
        if info.get("token"):  # paced replay: our own server, just pass it on chunk by chunk
            flow.response.stream = True
            return
        if flow.response.raw_content is not None and info["status"] in RECORDING and not info.get("served"):
            # Upstream bodies arrive after this hook; one already here was made by an addon.
            info["served"] = True
            info["reason"] = "answered by another addon, not upstream"
        for name, value in self._cache_headers(info):
            flow.response.headers[name] = value
        if info["status"] not in RECORDING or info.get("served") or flow.response.status_code != 200:
            return
        capture = self._new_capture(info, flow.response)
        if (info.get("stream") or capture.format != "json") and not flow.response.stream:
            flow.response.stream = capture

    def _new_capture(self, info: dict[str, Any], response: http.Response) -> StreamCapture:
        """A capture for this flow's protocol, tagged by what the answer says it is."""
        assert self.settings is not None
        fmt = body_format(response.headers.get("content-type", ""))
        return StreamCapture(BY_NAME[info["protocol"]], fmt, self.settings.max_body,
                             response.headers.get("content-encoding", ""))

    async def response(self, flow: http.HTTPFlow) -> None:
        info = flow.metadata.get(META)
        if not info or flow.response is None or self.cache is None:
            return
        if info.get("original_url"):
            flow.request.url = info.pop("original_url")
            flow.request.headers.pop(TOKEN_HEADER, None)
        if info["status"] == "HIT":
            outcome = f"age {info['age']:.0f}s" + (
                f", saved {info['saved_tokens']} tokens" if info["saved_tokens"] else ""
            ) + (", waited for an identical request in flight" if info.get("coalesced") else "")
            logger.info("ai-cache: %s", flow_line(info, where(flow), info["size"], outcome))
            return
        self._conclude(flow, info)

    def _conclude(self, flow: http.HTTPFlow, info: dict[str, Any], ended_by: str = "") -> None:
        """Store what was recorded if it is complete, release followers, log one line
        (for a stored answer once the write finished: it says whether it was stored).

        `ended_by` is the error a flow ended with: the capture still decides, because a
        client that closes right after the terminal event leaves a complete stream."""
        written: asyncio.Task[Written] | None = None
        checked = False
        outcome = info.get("reason", "") or ended_by
        try:
            if info["status"] in RECORDING and not info.get("served"):
                entry, capture, why_not = self._recorded_entry(flow, info, ended_by)
                if entry is not None and capture is not None:
                    checked = capture.needs_full_check
                    written = self._store(entry, capture, visible=not checked)
                else:
                    outcome = f"not stored: {why_not}"
                    self.tally.not_storing(why_not)
        finally:  # whatever happened, the followers of a leader must not wait in vain
            self._release_followers(info, written if checked else None)
        size = 0
        if flow.response is not None:
            size = len(flow.response.raw_content or b"")
            if isinstance(flow.response.stream, StreamCapture):
                size = flow.response.stream.size
        line = functools.partial(flow_line, info, where(flow), size)
        if written is None:
            logger.info("ai-cache: %s", line(outcome))
        else:
            then = f" (complete; then {ended_by.rstrip('.')})" if ended_by else ""
            written.add_done_callback(lambda task: self._report_write(task, line, checked, then))

    def _store(self, entry: Entry, capture: StreamCapture, visible: bool) -> asyncio.Task[Written]:
        """Summarise and write in the background. An answer that needs a full check (an
        error needle showed, or a large JSON body) is checked there first and must not be
        `visible` (served) before it is written."""

        def prepare(entry: Entry) -> None:
            if capture.needs_full_check and (problem := capture.full_check()):
                raise NotStorable(problem)
            summarise(entry)
            if (size := entry.encoded_size()) > max_body:
                raise NotStorable(f"too large: the entry has {size} bytes, above ai_cache_max_body")

        assert self.cache is not None and self.settings is not None
        max_body = self.settings.max_body
        return self.cache.store_soon(entry, prepare, visible=visible)

    def _release_followers(self, info: dict[str, Any], hidden: asyncio.Task[Written] | None) -> None:
        """A leader's followers look up as soon as its answer is visible: at once, or when a
        `hidden` entry (one that needed a full check) has been written."""
        if not info.get("leader"):
            return
        if hidden is None:
            self.flights.land(info["key"])
        else:
            hidden.add_done_callback(lambda _: self.flights.land(info["key"]))

    def _report_write(self, task: asyncio.Task[Written], line: Callable[[str], str], checked: bool, then: str) -> None:
        """The flow's line once its write finished, and the tally: `stored` only if it was."""
        if task.cancelled():
            written = Written(problem="the store write was cancelled")
        elif error := task.exception():
            written = Written(problem=f"the store write failed: {error!r}")
        else:
            written = task.result()
        if written.layers:
            self.tally.stored += 1
        else:
            self.tally.not_storing(written.problem)
        logger.info("ai-cache: %s", line(store_outcome(written.layers, written.problem, checked) + then))

    def _recorded_entry(
        self, flow: http.HTTPFlow, info: dict[str, Any], ended_by: str = ""
    ) -> tuple[Entry | None, StreamCapture | None, str]:
        assert self.settings is not None
        response = flow.response
        if response is None:
            return None, None, ended_by or "no response"
        if response.status_code != 200:
            return None, None, f"upstream answered {response.status_code}"
        capture = response.stream
        if ended_by and not (isinstance(capture, StreamCapture) and capture.protocol.terminal_proves_end):
            return None, None, ended_by  # only a stream's terminal event outlives a broken end
        if not isinstance(capture, StreamCapture):
            if capture:
                return None, None, "the response was streamed without capture"
            capture = self._new_capture(info, response)  # decodes within the cap; `.content` would not
            capture(response.raw_content or b"")
        why_not = capture.incompleteness()
        if why_not:
            return None, None, why_not
        info["format"] = capture.format
        entry = Entry(
            key=info["key"],
            format=capture.format,
            body=capture.body,
            headers=replayable_headers(list(response.headers.items(multi=True))),
            chunks=capture.chunks,
            meta={"protocol": info["protocol"], "model": info.get("model", ""),
                  "stream": info.get("stream", False), "request": info["request"]},
        )
        return entry, capture, ""

    def error(self, flow: http.HTTPFlow) -> None:
        info = flow.metadata.get(META)
        if not info:
            return
        if info.get("token"):
            self.replayer.forget(info["token"])
            logger.debug("ai-cache: paced replay ended early: %s", flow.error)
        elif info["status"] in RECORDING:
            self._conclude(flow, info, str(flow.error.msg if flow.error else "the flow failed"))
