"""The mitmproxy addon: thin glue between hooks, keys, single flight, recording, replay
and the stores.

Per-flow state is a `FlowState` (state.py), viewed as a plain dict in
`flow.metadata["ai_cache"]` (it survives `-w` flow files); the live stream capture rides
on `flow.response.stream` itself. `AICache` is the only addon with per-flow hooks: paced
replay (replay.py), comments, metrics and the run log are driven from them, since
mitmproxy's dispatch of every flow event to every addon cost 45 µs a MISS for four more.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import sys

from mitmproxy import ctx, exceptions, http

from .capture import body_format
from .commands import Commands
from .comments import Comments
from .controls import Controls, take_controls
from .entry import Entry
from .fanout import Broadcast
from .flights import SingleFlight
from .keys import cacheable_request, header_map, host_of, path_of
from .lease import fleet_leases
from .metrics import Metrics
from .nearest import explain_miss
from .options import OPTION_NAMES, OPTIONS, Settings, allow_hosts, misset_options, overridden_settings
from .protocols import recognise
from .recording import FlowObserver, Recorder, new_capture, tell, where
from .redis_store import redact
from .replay import PacedReplay
from .report import FlowLines, Tally, flow_line, hit_outcome, human_size, show_connection_lines
from .responses import add_headers, cache_headers, immediate_response, no_recording
from .runlog import RunLog
from .semantic import SemanticLayer
from .state import FlowState, Mode, Status, attach, state_of
from .tiers import TieredCache, open_cache

logger = logging.getLogger(__name__)
STORE_SETTINGS = (
    "directory",
    "redis_url",
    "redis_timeout",
    "redis_prefix",
    "redis_pool",
    "fixtures",
    "fixtures_writable",
)


class AICache:
    """Looks requests up, answers hits, and has misses recorded; counts them all in its
    `tally`, tells `when_answered` of each recognised flow, and its `recorder`'s observers
    of each recording's outcome."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.cache: TieredCache | None = None
        self.pacer = PacedReplay()
        self.when_answered: list[FlowObserver] = []  # in the response hook, before the answer goes out
        self.flights = SingleFlight()
        self.tally = Tally()
        self.lines = FlowLines()  # one line per flow, logged a loop turn's lines at a time
        self.recorder = Recorder(self.flights, self.tally, self.lines)
        self.semantic: SemanticLayer | None = None  # ai_cache_semantic=on
        self.saving_flows = False  # a -w flow file: mitmproxy writes each flow after its response hooks

    def load(self, loader) -> None:
        for name, typespec, default, help_text in OPTIONS:
            loader.add_option(name, typespec, default, help_text)
        # Errors logged while the proxy starts stop it; raising here would not (see misset_options).
        deferred = getattr(loader.master.options, "deferred", {})
        for problem in misset_options(deferred) + overridden_settings(deferred, sys.argv):
            logger.error("ai-cache: %s", problem)

    def configure(self, updated: set[str]) -> None:
        if "save_stream_file" in updated:
            self.saving_flows = bool(ctx.options.save_stream_file)
        if not updated & OPTION_NAMES:
            return
        try:
            settings = Settings.from_options(ctx.options)
            stores_changed = self.settings is None or any(
                getattr(self.settings, f) != getattr(settings, f) for f in STORE_SETTINGS
            )
            if stores_changed:
                self._open_stores(settings)
        except exceptions.OptionsError as e:
            if self.settings is not None:
                raise  # a change while running: mitmproxy rolls it back and reports it
            # At startup mitmproxy prints a raised error with its traceback; one logged error
            # line stops the proxy just the same, and the addon stays unconfigured meanwhile.
            logger.error("ai-cache: %s", e)
            return
        old, self.settings = self.settings or settings, settings
        assert self.cache is not None
        self.cache.ttl = settings.ttl
        if stores_changed or settings.semantic != old.semantic:
            self._open_semantic(settings)
        show_connection_lines(settings.connection_log)
        logger.info(
            "ai-cache: mode=%s dir=%s ttl=%s max_body=%s coalesce=%s replay_speed=%s%s",
            settings.mode,
            self.cache.disk.directory
            if self.cache.disk and not self.cache.disk.read_only
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
            raise exceptions.OptionsError(f"ai_cache_redis_url: {e}") from None
        old, self.cache = self.cache, cache
        self.flights.use_fleet(fleet_leases(cache.stores))
        if old is not None:
            self._close_later(old)

    def _open_semantic(self, settings: Settings) -> None:
        assert self.cache is not None
        old, self.semantic = self.semantic, None
        if old is not None:
            self.recorder.observers.remove(old.concluded)
            old.close()
        if settings.semantic is not None and settings.fixtures:
            logger.info("ai-cache: no semantic lookups with ai_cache_fixtures: a test gets only its own answers")
        elif settings.semantic is not None:
            try:
                self.semantic = SemanticLayer(settings.semantic, self.cache)
            except ValueError as e:
                raise exceptions.OptionsError(f"ai_cache_embed_url: {e}") from None
            self.recorder.observers.append(self.semantic.concluded)  # answers stored: their questions too
            self.semantic.start()

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
        await self.pacer.done()
        if self.cache is not None:
            await self.cache.drain()
            await asyncio.sleep(0)  # the writes' callbacks: they start the fleet leases' releases
            await self.flights.drain()  # which need Redis, closed next
            await self.cache.close()
        if self.semantic is not None:
            self.semantic.close()
        self.lines.flush()
        logger.info("ai-cache: %s", self.tally.summary())

    # Request path

    async def request(self, flow: http.HTTPFlow) -> None:
        if self.settings is None or self.cache is None or flow.response or flow.error:
            return
        settings, cache = self.settings, self.cache
        protocol = recognise(flow.request.method, path_of(flow.request))
        if protocol is None or not self._host_wanted(flow.request, settings):
            return
        headers = header_map(flow.request)
        found = cacheable_request(flow.request, headers, protocol, settings.policy)
        if found is not None and not protocol.expects(found.body):
            return  # only the path looked like an LLM call: leave it untouched
        controls = take_controls(flow.request, headers)
        state = FlowState(protocol.name)
        attach(flow, state)
        if found is None or found.refused:
            state.reason = found.refused if found else "request body is not a JSON object"
        else:
            state.key, state.model, state.stream, state.request = found.key, found.model, found.stream, found.described
            if self.semantic is not None:
                self.semantic.ask(flow, protocol, found, controls, settings)
            await self._route(flow, state, controls, settings, cache)
        self.tally.routed(state)
        if state.status.recording and flow.response is None:
            # Plain bytes are what the capture can scan and the cache can replay.
            flow.request.headers["accept-encoding"] = "identity"

    @staticmethod
    def _host_wanted(request: http.Request, settings: Settings) -> bool:
        """The `ai_cache_hosts` allow-list: globs match the host, or host:port."""
        if not settings.hosts:
            return True
        names = (request.host.lower(), host_of(request), f"{request.host.lower()}:{request.port}")
        return any(fnmatch.fnmatchcase(name, glob) for glob in settings.hosts for name in names)

    async def _route(
        self, flow: http.HTTPFlow, state: FlowState, controls: Controls, settings: Settings, cache: TieredCache
    ) -> None:
        """BYPASS, REFRESH, or look up: HIT, or MISS (answered 504 when upstream is off-limits)."""
        mode = settings.mode
        offline = mode is Mode.REPLAY
        lookup = functools.partial(cache.lookup, state.key, controls.max_age)
        if mode is Mode.OFF:
            state.reason = "ai_cache_mode=off"
        elif controls.bypass and not offline:
            state.reason = "client asked"
        elif not cache.stores and not offline:
            state.reason = "no usable cache store"
        elif (mode is Mode.REFRESH or controls.refresh) and not (offline or controls.only_if_cached):
            state.status = Status.REFRESH
        elif (found := await cache.find(state.key, controls.max_age, any_age=offline)) and not found.stale:
            await self._serve_hit(flow, state, found.entry, found.layer, settings)
        elif not offline and (hit := await self.flights.answer(state, settings.coalesce, lookup)):
            state.coalesced = True
            if isinstance(hit, Broadcast):
                await self._serve_live(flow, state, hit, settings)
            else:
                await self._serve_hit(flow, state, *hit, settings)
        elif self.semantic and (match := await self.semantic.lookup(flow, state)):
            state.key = match.entry.key  # X-AI-Cache-Key: the entry answered, asked another way
            await self._serve_hit(flow, state, match.entry, "semantic", settings)
        else:
            state.status = Status.MISS
            stale = found.stale if found else ""
            if offline or controls.only_if_cached:
                flow.response = await self._no_recording(state, offline, stale, settings, cache)
            elif settings.coalesce and (hit := await self.flights.lead(state, settings.coalesce, lookup)):
                state.coalesced = True  # another proxy of the fleet answered it
                await self._serve_hit(flow, state, *hit, settings)
            elif stale:
                state.expired = stale

    async def _serve_hit(
        self, flow: http.HTTPFlow, state: FlowState, entry: Entry, layer: str, settings: Settings
    ) -> None:
        state.status, state.layer, state.age, state.format = Status.HIT, layer, entry.age(), entry.format
        state.size, state.saved_tokens = len(entry.body), sum(entry.tokens())
        headers = cache_headers(state) if settings.headers else []
        if self.pacer.wanted(entry, settings.replay_speed):
            await self.pacer.pace(flow, state, entry, headers, settings.replay_speed)
        else:
            flow.response = immediate_response(entry, headers)
            flow.is_replay = "response"

    async def _serve_live(
        self, flow: http.HTTPFlow, state: FlowState, broadcast: Broadcast, settings: Settings
    ) -> None:
        """Join the stream of the identical request in flight, from its first byte."""
        state.status, state.layer, state.age, state.format = Status.HIT, "live", 0.0, broadcast.format
        await self.pacer.pace(flow, state, broadcast, cache_headers(state) if settings.headers else [])

    async def _no_recording(
        self, state: FlowState, offline: bool, stale: str, settings: Settings, cache: TieredCache
    ) -> http.Response:
        """The 504 for a miss that may not go upstream, with why it missed."""
        why = "ai_cache_mode=replay" if offline else "the client sent Cache-Control: only-if-cached"
        if stale:
            explanation = None
            state.reason = f"recording {stale}, answered 504 ({why})"
        else:
            explanation = await explain_miss(
                cache.fixtures or cache.disk, state.request or {}, state.model or "", settings.policy
            )
            state.reason = f"no recording, answered 504 ({why}); {explanation.sentence()}"
        state.served = True
        return no_recording(state, why, stale, explanation, cache_headers(state) if settings.headers else [])

    # Response path

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.response is None or self.settings is None:
            return
        if state.token:  # answered by the replay server
            self.pacer.responseheaders(flow, state)
            return
        if flow.response.raw_content is not None and state.recording:
            # Upstream bodies arrive after this hook; one already here was made by an addon.
            state.served = True
            state.reason = "answered by another addon, not upstream"
        if self.settings.headers:
            add_headers(flow.response, cache_headers(state))
        if not state.recording or flow.response.status_code != 200 or flow.response.stream:
            return
        if state.stream or body_format(flow.response.headers.get("content-type", "")) != "json":
            capture = new_capture(state, flow.response, self.settings.max_body)  # a JSON answer's comes whole
            flow.response.stream = capture
            if state.leader:  # its followers get the stream live
                headers = [(k, v) for k, v in flow.response.headers.items(multi=True)]
                broadcast = Broadcast(flow.response.status_code, headers, capture.format, self.settings.max_body)
                capture.listener = broadcast.feed
                self.flights.go_live(state, broadcast)

    def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or flow.response is None or self.cache is None or self.settings is None:
            return
        if state.token:  # the URL back from the replay server's, before anyone logs it
            self.pacer.response(flow, state)
        tell(self.when_answered, flow, state)  # before any conclusion: a run log's call line comes first
        if state.status is Status.HIT:
            self.lines.add(flow_line(state, where(flow), state.size or 0, hit_outcome(state)))
        else:
            # mitmproxy sends the answer once every response hook returned: recording it
            # (checks, entry, single flight, log line) comes right after, off the client's wait;
            # in the hook when a flow file is written, or it would lack the flow's verdict.
            args = (flow, state, self.cache, self.settings.max_body)
            if self.saving_flows:
                self.recorder.conclude(*args)
            else:
                asyncio.get_running_loop().call_soon(self.recorder.conclude, *args)

    def error(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or self.cache is None or self.settings is None:
            return
        if state.token:
            self.pacer.error(flow, state)
        ended_by = str(flow.error.msg if flow.error else "the flow failed")
        if state.status is Status.HIT and state.token:  # a replayed or live stream that did not end well
            outcome = f"{hit_outcome(state)}; then {ended_by.rstrip('.')}"
            self.lines.add(flow_line(state, where(flow), state.size or 0, outcome))
        if not state.status.recording:
            return
        self.recorder.conclude(flow, state, self.cache, self.settings.max_body, ended_by)


def make_addons() -> list[object]:
    """The addons mitmproxy loads, fresh for every (re)load of the script: the observers
    keep only their lifecycle hooks (options, servers, files); AICache tells them of flows."""
    cache = AICache()
    Comments(cache)  # no hooks of its own: it only observes
    return [cache, Metrics(cache), Commands(cache), RunLog(cache)]
