"""FlowState: typed per-flow state with a live plain-dict view in flow.metadata."""

from __future__ import annotations

import json

from mitmproxy.test import tflow

from ai_cache.state import META, FlowState, Mode, Status, attach, state_of


def test_the_metadata_view_follows_every_change_and_holds_plain_values():
    flow = tflow.tflow()
    state = FlowState("openai-chat")
    attach(flow, state)
    assert flow.metadata[META] == {"protocol": "openai-chat", "status": "BYPASS", "key": ""}
    state.status, state.leader, state.token = Status.MISS, True, "t"
    view = flow.metadata[META]
    assert view["status"] == "MISS" and type(view["status"]) is str and view["leader"] is True
    state.token = None  # unset again: gone from the view, as a popped key was
    assert "token" not in flow.metadata[META]
    assert json.loads(json.dumps(flow.metadata))[META]["status"] == "MISS"
    assert state_of(flow) is state and state_of(tflow.tflow()) is None


def test_status_text_and_recording():
    assert [s for s in Status if s.recording] == [Status.MISS, Status.REFRESH]
    assert f"{Status.HIT}" == "HIT" and Mode("replay") is Mode.REPLAY
    state = FlowState("p", status=Status.MISS)
    assert state.recording
    state.served = True  # answered by another addon: nothing to record
    assert not state.recording
