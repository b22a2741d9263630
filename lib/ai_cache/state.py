"""Per-flow state: what ai-cache decided about a flow, typed, with a plain-dict view.

The hooks share one `FlowState` per recognised flow. `flow.metadata["ai_cache"]` holds a
live plain-dict view of it (fields that are set, enums as their text), so `-w` flow files,
mitmweb and scripts see it without importing this module.
"""

from __future__ import annotations

import enum
import weakref
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mitmproxy import http

META = "ai_cache"


class Status(enum.StrEnum):
    """What the cache did with a flow; its text is the `x-ai-cache-status` header and log word."""

    HIT = "HIT"
    MISS = "MISS"
    REFRESH = "REFRESH"
    BYPASS = "BYPASS"

    @property
    def recording(self) -> bool:
        """The answer comes from upstream and may be stored."""
        return self in (Status.MISS, Status.REFRESH)


class Mode(enum.StrEnum):
    """`ai_cache_mode`."""

    RECORD = "record"
    REPLAY = "replay"
    REFRESH = "refresh"
    OFF = "off"


@dataclass(init=False)
class FlowState:
    """Everything the hooks decide and learn about one flow. `None` is "not set": such
    fields stay out of the dict view, as keys never set stayed out of the old dict."""

    protocol: str
    status: Status = Status.BYPASS
    key: str = ""
    model: str | None = None
    stream: bool | None = None
    request: dict[str, Any] | None = None  # the request as described for humans (no secrets)
    reason: str | None = None  # why it was bypassed / not stored, for the log line
    layer: str | None = None  # a hit's layer
    similarity: float | None = None  # a semantic hit's cosine similarity
    age: float | None = None  # a hit's age in seconds
    format: str | None = None  # json, sse, ndjson
    size: int | None = None  # a hit's body size
    saved_tokens: int | None = None
    expired: str | None = None  # a miss because the entry was too old: why
    coalesced: bool | None = None  # a hit that waited for an identical request in flight
    followed: bool | None = None  # waited for a leader (and then never leads itself)
    leader: bool | None = None  # True: this flow leads its key's single flight
    served: bool | None = None  # answered here or by another addon: nothing to record
    token: str | None = None  # paced replay's one-time token
    original_url: str | None = None  # the URL before paced replay redirected the flow

    def __init__(self, protocol: str, **fields: Any) -> None:
        """Unset fields are the class's defaults: a flow's state is made for every
        recognised request, and setting all twenty fields one by one cost 4 µs."""
        object.__setattr__(self, "_view", {"protocol": protocol, "status": Status.BYPASS.value, "key": ""})
        object.__setattr__(self, "protocol", protocol)
        for name, value in fields.items():
            if name not in FIELD_NAMES:
                raise TypeError(f"FlowState has no field {name!r}")
            setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        """Keep the dict view in step: one dict write per change, nothing per chunk."""
        object.__setattr__(self, name, value)
        view: dict[str, Any] = self.__dict__["_view"]
        if value is None:
            view.pop(name, None)
        else:
            view[name] = _plain(value)

    @property
    def view(self) -> dict[str, Any]:
        """The plain-dict view kept in `flow.metadata`."""
        return self.__dict__["_view"]

    @property
    def recording(self) -> bool:
        """Its answer comes from upstream and nothing else answered it: it may be stored."""
        return self.status.recording and not self.served


FIELD_NAMES = frozenset(field.name for field in fields(FlowState))


def _plain(value: Any) -> Any:
    """What the dict view holds: an enum's value (flow files keep plain data)."""
    return value.value if isinstance(value, enum.Enum) else value


_states: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()  # not a copy's


def attach(flow: http.HTTPFlow, state: FlowState) -> None:
    """Give `flow` its state, and its metadata the view of it."""
    _states[flow] = state
    flow.metadata[META] = state.view


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    """The flow's state, None for a flow ai-cache did not recognise (or a copy of one)."""
    return _states.get(flow)
