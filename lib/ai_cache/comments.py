"""The cache's verdict on each flow, where mitmweb and mitmproxy's console show it.

Every recognised flow gets a `flow.comment` (`ai-cache HIT l1 age 42s, saved 31 tokens`,
`ai-cache MISS stored`, `ai-cache MISS not stored: incomplete stream`) and a hit gets a
marker, so the flow list shows the cache at a glance. A recorded answer's outcome is only
known once its background write finished: the `Recorder` tells us then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import ctx, hooks, http

from .recording import Conclusion
from .report import hit_outcome
from .state import FlowState, Status

if TYPE_CHECKING:
    from .addon import AICache

HIT_MARKER = ":zap:"  # a mitmproxy marker (an emoji shortcode, as `flow.mark` takes)


def hit_comment(state: FlowState) -> str:
    return " ".join(["ai-cache HIT", *([state.layer] if state.layer else []), hit_outcome(state)])


def concluded_comment(state: FlowState, conclusion: Conclusion) -> str:
    return f"ai-cache {state.status}" + (f" {conclusion.outcome}" if conclusion.outcome else "")


class Comments:
    """Writes the comment and marker: told of answered flows and recordings' outcomes by
    `AICache` and its `Recorder` (it has no hooks of its own)."""

    def __init__(self, cache: AICache) -> None:
        cache.when_answered.append(self.answered)
        cache.recorder.observers.append(self.concluded)

    def answered(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if state.status is not Status.HIT:
            return
        flow.comment = hit_comment(state)
        flow.marked = HIT_MARKER  # the response hook's own update shows both

    def concluded(self, flow: http.HTTPFlow, state: FlowState, conclusion: Conclusion) -> None:
        flow.comment = concluded_comment(state, conclusion)
        # A write may end after the flow did: mitmweb and the console redraw it on `update`.
        if ctx.master.addons.get("view") is not None:  # mitmdump has no view to redraw
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
