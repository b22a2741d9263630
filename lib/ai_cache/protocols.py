"""Provider protocol families: the one place a provider's wire format is known.

Each family is one class: which paths are its own, the body fields every real call has,
how it streams, its terminal and error events, where it reports token usage, where the
prompt is, and which headers change its answers or carry its credentials. Adding a
provider is one class passed to `register`, plus its test data.

Recognition is by method and path shape on any host, so OpenAI-compatible servers
(Azure, Ollama's /v1, vLLM, OpenRouter, Groq...) are covered without a host list. When
several families' shapes fit a path, the most specific (longest) shape wins: that is
how `/chat/completions` is chat and not legacy completions, without depending on the
order of the registry.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, ClassVar

from .sse import Event, iter_events
from .summary import edge_events, one_line, text_of


def json_value(text: str | bytes) -> Any:
    """The parsed JSON value; raises ValueError for anything that is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:  # absurdly deep nesting is no answer worth keeping either
        raise ValueError("JSON nested too deeply") from None


def json_object(text: str | bytes) -> dict[str, Any] | None:
    """The parsed JSON object, or None for anything else (arrays, garbage, truncation)."""
    try:
        value = json_value(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


# An `"error"` key with a value that is not null (`"error": null` is in good answers).
# The value's first byte must be present, so a chunk ending at `"error": nu` is no match.
ERROR_KEY = rb'"error"\s*:\s*[\[{"0-9tf-]'
# Credentials every request may carry, whatever its family: never in a key, an entry,
# an export or a log line. Each family adds its own.
BASE_CREDENTIAL_HEADERS = frozenset({"cookie", "proxy-authorization"})


# What stands in a request for the text a semantic lookup embeds: the rest must match exactly.
QUESTION_PLACEHOLDER = "\u0000ai-cache:embedded-text\u0000"
# Parts that are plain text, by their `type` (OpenAI, Anthropic, Responses); a Gemini
# part is text when `text` is its only field besides these.
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
GEMINI_TEXT_EXTRAS = frozenset({"text", "thought"})
# Turn fields that carry tool calls or non-text content (OpenAI, Ollama).
TOOL_OR_MEDIA_FIELDS = ("tool_calls", "function_call", "images", "audio", "tool_call_id")
CHAT_ROLES = frozenset({"user", "assistant", "system", "developer", "model"})


@dataclass(frozen=True)
class Question:
    """What a semantic lookup compares (`text`: the last user turn(s)) and the request
    body with that text replaced by QUESTION_PLACEHOLDER (`rest`: must match exactly)."""

    text: str
    rest: dict[str, Any]


def path_shape(shape: str) -> re.Pattern[str]:
    """`models/*:generateContent` as a pattern for a path's last segments: literal
    segments, `*` standing for one or more characters within a segment."""
    parts = (re.escape(part).replace(r"\*", "[^/]+") for part in shape.split("/"))
    return re.compile("/" + "/".join(parts) + "$")


class Protocol(ABC):
    """One provider family. Subclasses declare their facts; the methods here apply them."""

    name: ClassVar[str]
    # The path endings that are this family's (see `path_shape`); the longest that fits wins.
    path_shapes: ClassVar[tuple[str, ...]]
    # Path segments that make a fitting path someone else's (OpenAI Assistants'
    # /threads/{id}/messages is no Anthropic call).
    excluded_segments: ClassVar[frozenset[str]] = frozenset()
    # Body fields a real call of this family always has: a JSON POST to a path that only
    # looks like ours (a chat app's /channels/1/messages) passes through untouched.
    required_fields: ClassVar[tuple[str, ...]]
    # How its streams are framed (the answer's content type decides what a capture parses).
    stream_format: ClassVar[str] = "sse"
    # Bytes every error event contains, and the pattern that confirms one: a stream
    # without the needle needs no event-by-event search, keeping the capture at memory speed.
    error_needles: ClassVar[tuple[bytes, ...]] = (b'"error"',)
    error_pattern: ClassVar[re.Pattern[bytes]] = re.compile(ERROR_KEY)
    # Whether the terminal event alone proves the stream complete, however the connection
    # ended after it: SDKs close the response at the sentinel while servers end the body
    # a moment later, so a complete stream often ends in mitmproxy's `error` hook.
    terminal_proves_end: ClassVar[bool] = True
    # Where answers report tokens: (container, input field, output field), the container
    # "" for the answer object itself; `usage_nested` names objects that wrap an answer
    # inside a stream event (Responses' response.completed, Anthropic's message_start).
    usage_fields: ClassVar[tuple[tuple[str, str, str], ...]]
    usage_nested: ClassVar[tuple[str, ...]] = ()
    # Body fields holding the prompt, in the order a preview looks for text.
    prompt_fields: ClassVar[tuple[str, ...]]
    # Request headers that change the answer (so they are part of the key) and that carry
    # credentials (so they are never stored), on top of BASE_CREDENTIAL_HEADERS.
    answer_headers: ClassVar[tuple[str, ...]] = ()
    own_credential_headers: ClassVar[frozenset[str]] = frozenset()
    # Semantic lookups: the list of turns (None: the family has none), the turn's role
    # and content fields, the role of a turn without one; bytes that show a tool call
    # in an answer (such an answer is no semantic entry).
    turns_field: ClassVar[str | None] = None
    content_field: ClassVar[str] = "content"
    default_role: ClassVar[str] = ""
    tool_call_needles: ClassVar[tuple[bytes, ...]] = ()

    def __init__(self) -> None:
        self._shapes = tuple((len(shape), path_shape(shape)) for shape in self.path_shapes)

    @property
    def credential_headers(self) -> frozenset[str]:
        return BASE_CREDENTIAL_HEADERS | self.own_credential_headers

    def fit(self, path: str) -> int:
        """How specific this family's best shape fitting `path` is: 0 when none fits."""
        if self.excluded_segments and not self.excluded_segments.isdisjoint(path.split("/")[:-1]):
            return 0
        return max((length for length, pattern in self._shapes if pattern.search(path)), default=0)

    def expects(self, body: dict[str, Any]) -> bool:
        return all(name in body for name in self.required_fields)

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        """Only a JSON `true` makes a streaming request."""
        return body.get("stream") is True

    def model(self, body: dict[str, Any], path: str) -> str:
        """The body's model, else a deployment name in the path (Azure's)."""
        model = body.get("model")
        if isinstance(model, str):
            return model
        azure = re.search(r"/deployments/([^/]+)/", path)
        return azure.group(1) if azure else ""

    def event_type(self, event: Event) -> str:
        """The SSE `event:` name, else the JSON `type` field some servers send instead."""
        if event.name != "message":
            return event.name
        obj = json_object(event.data) if '"type"' in event.data else None
        kind = obj.get("type") if obj else None
        return kind if isinstance(kind, str) else "message"

    @abstractmethod
    def is_terminal(self, event: Event) -> bool:
        """Whether this event ends a complete stream."""

    def is_error(self, event: Event) -> bool:
        if '"error"' not in event.data:
            return False
        obj = json_object(event.data)
        return obj is not None and obj.get("error") is not None

    def usage(self, body: bytes, fmt: str) -> dict[str, int]:
        """Input/output tokens the answer reports; streams report them cumulatively, so
        take maxima. A stream is parsed only at its edges, where providers report usage."""
        if fmt == "json":
            obj = json_object(body)
            objects = [obj] if obj else []
        else:
            objects = [o for e in edge_events(body, fmt) if (o := json_object(e.data))]
        tokens_in = tokens_out = 0
        for obj in objects:
            nodes = [obj] + [obj[n] for n in self.usage_nested if isinstance(obj.get(n), dict)]
            for node in nodes:
                for container, in_name, out_name in self.usage_fields:
                    usage = node.get(container) if container else node
                    if isinstance(usage, dict):
                        i, o = usage.get(in_name), usage.get(out_name)
                        tokens_in = max(tokens_in, i if isinstance(i, int) else 0)
                        tokens_out = max(tokens_out, o if isinstance(o, int) else 0)
        return {"input": tokens_in, "output": tokens_out} if tokens_in or tokens_out else {}

    def preview(self, body: dict[str, Any], width: int = 60) -> str:
        """The last prompt text of a request, on one line (the body itself when it has none)."""
        for name in self.prompt_fields:
            value = body.get(name)
            if isinstance(value, list) and value:
                value = value[-1]
            if text := text_of(value):
                return one_line(text, width)
        return one_line(json.dumps(body)[:width], width)

    def answers_wanted(self, body: dict[str, Any]) -> int:
        """How many answers one call asks for (`n`)."""
        n = body.get("n", 1)
        return n if isinstance(n, int) else 1

    def question(self, body: dict[str, Any], count: int = 1) -> Question | str:
        """The last `count` user turns' text and the body without it, or why a semantic
        lookup must not be made: tool calls or results, non-text parts, several answers."""
        if self.turns_field is None:
            return f"no semantic lookup for {self.name}"
        if self.answers_wanted(body) != 1:
            return "asks for several answers"
        turns = body.get(self.turns_field)
        if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
            return "no conversation to read"
        for turn in turns:
            if problem := self.turn_problem(turn):
                return problem
        asked = last_user_turns(turns, "role", self.default_role)[-count:]
        if not asked:
            return "no user turn"
        replaced = {id(turn) for turn in asked}
        rest = [{**t, self.content_field: QUESTION_PLACEHOLDER} if id(t) in replaced else t for t in turns]
        text = "\n".join(text_of(turn.get(self.content_field)) for turn in asked)
        return Question(text, {**body, self.turns_field: rest})

    def turn_problem(self, turn: dict[str, Any]) -> str:
        """Why a turn rules semantic lookups out ("" when it does not)."""
        if turn.get("role", self.default_role) not in CHAT_ROLES or turn.get("type", "message") != "message":
            return "tool calls or results in the conversation"
        if any(turn.get(name) for name in TOOL_OR_MEDIA_FIELDS):
            return "tool calls or non-text content in the conversation"
        content = turn.get(self.content_field)
        parts = (
            content if isinstance(content, list) else [] if content is None or isinstance(content, str) else [content]
        )
        if not all(is_text_part(part) for part in parts):
            return "non-text content or tool parts in the conversation"
        return ""

    def calls_tools(self, answer: bytes) -> bool:
        """Whether an answer (JSON or stream bytes) contains a tool call."""
        return any(needle in answer for needle in self.tool_call_needles)

    def delta_text(self, event: dict[str, Any]) -> str:
        """The answer text one parsed stream event adds (chat-style `choices[].delta`)."""
        return "".join(
            text_of(choice.get("delta", {}).get("content") or choice.get("text", ""))
            for choice in event.get("choices") or []
            if isinstance(choice, dict) and isinstance(choice.get("delta", {}), dict)
        )

    def stream_text(self, body: bytes, fmt: str) -> str:
        """A stream's answer text, assembled from its events: for people reading a fixture."""
        return "".join(self.delta_text(obj) for event in iter_events(body, fmt) if (obj := json_object(event.data)))


def is_text_part(part: Any) -> bool:
    if isinstance(part, str):
        return True
    if not isinstance(part, dict):
        return False
    if "type" in part:
        return part["type"] in TEXT_PART_TYPES
    return "text" in part and GEMINI_TEXT_EXTRAS.issuperset(part)


def last_user_turns(turns: Any, role_key: str, default_role: str = "") -> list[dict[str, Any]]:
    """The last run of consecutive user turns in a list of turns (after them, only
    assistant or tool turns, such as an Anthropic prefill)."""
    if not isinstance(turns, list):
        return []
    found: list[dict[str, Any]] = []
    for turn in reversed(turns):
        is_user = isinstance(turn, dict) and turn.get(role_key, default_role) == "user"
        if is_user:
            found.append(turn)
        elif found:
            break
    return found[::-1]


class OpenAIChat(Protocol):
    name = "openai-chat"
    path_shapes = ("chat/completions",)
    required_fields = ("messages",)
    usage_fields = (("usage", "prompt_tokens", "completion_tokens"),)
    prompt_fields = ("messages",)
    answer_headers = ("openai-beta",)
    # `api-key` is Azure OpenAI's; OpenAI-compatible gateways also take `x-api-key`.
    own_credential_headers = frozenset({"authorization", "api-key", "x-api-key"})
    turns_field: ClassVar[str | None] = "messages"
    tool_call_needles: ClassVar[tuple[bytes, ...]] = (b'"tool_calls"', b'"function_call"')

    def is_terminal(self, event: Event) -> bool:
        return event.data == "[DONE]"


class OpenAICompletions(OpenAIChat):
    name = "openai-completions"
    path_shapes = ("completions",)
    required_fields = ("prompt",)
    prompt_fields = ("prompt",)
    turns_field = None  # one prompt holding instructions and question alike


class OpenAIResponses(OpenAIChat):
    name = "openai-responses"
    path_shapes = ("responses",)
    failures = frozenset({"error", "response.failed", "response.incomplete"})
    required_fields = ("model",)
    error_needles = (b'"error"', b"event: error", b"event:error", b"response.failed", b"response.incomplete")
    error_pattern = re.compile(ERROR_KEY + rb"|event: ?error\b|response\.failed|response\.incomplete")
    usage_fields = (("usage", "input_tokens", "output_tokens"),)
    usage_nested = ("response",)
    prompt_fields = ("input",)
    turns_field = "input"
    # function_call, web_search_call, mcp_call, ... items in the output
    tool_call_needles = (b'_call"',)

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "response.completed"

    def delta_text(self, event: dict[str, Any]) -> str:
        delta = event.get("delta")
        return delta if event.get("type") == "response.output_text.delta" and isinstance(delta, str) else ""

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and not any(f in event.data for f in self.failures):
            return False
        return self.event_type(event) in self.failures

    def question(self, body: dict[str, Any], count: int = 1) -> Question | str:
        """Only a self-contained request: `previous_response_id` and `conversation` hold
        history the key cannot see (a conversation's grows under the same id)."""
        if body.get("previous_response_id") is not None:
            return "continues a stored response (previous_response_id)"
        if body.get("conversation") is not None:
            return "continues a stored conversation (conversation)"
        if isinstance(body.get("input"), str):
            return Question(body["input"], {**body, "input": QUESTION_PLACEHOLDER})
        return super().question(body, count)


class OpenAIEmbeddings(OpenAIChat):
    name = "openai-embeddings"
    path_shapes = ("embeddings",)
    required_fields = ("input",)
    prompt_fields = ("input",)
    turns_field = None

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        return False


class AnthropicMessages(Protocol):
    name = "anthropic-messages"
    path_shapes = ("messages",)
    excluded_segments = frozenset({"threads"})
    # Anthropic's API rejects calls without max_tokens, so every real one carries it.
    required_fields = ("model", "messages", "max_tokens")
    error_needles = (b'"error"', b"event: error", b"event:error")
    error_pattern = re.compile(ERROR_KEY + rb"|event: ?error\b")
    usage_fields = (("usage", "input_tokens", "output_tokens"),)
    usage_nested = ("message",)
    prompt_fields = ("messages",)
    answer_headers = ("anthropic-version", "anthropic-beta")
    own_credential_headers = frozenset({"x-api-key", "authorization"})
    turns_field = "messages"
    tool_call_needles = (b'"tool_use"', b'"server_tool_use"', b'"mcp_tool_use"')

    def is_terminal(self, event: Event) -> bool:
        return self.event_type(event) == "message_stop"

    def delta_text(self, event: dict[str, Any]) -> str:
        delta = event.get("delta")
        return text_of(delta) if event.get("type") == "content_block_delta" and isinstance(delta, dict) else ""

    def is_error(self, event: Event) -> bool:
        if event.name == "message" and '"error"' not in event.data:
            return False
        return self.event_type(event) == "error"


class Gemini(Protocol):
    name = "gemini"
    path_shapes = ("models/*:generateContent", "models/*:streamGenerateContent")
    required_fields = ("contents",)
    # No sentinel: a later event could still follow a finishReason, so only a body that
    # ended cleanly counts (clients read Gemini streams to the end of the body anyway).
    terminal_proves_end = False
    usage_fields = (("usageMetadata", "promptTokenCount", "candidatesTokenCount"),)
    prompt_fields = ("contents",)
    own_credential_headers = frozenset({"x-goog-api-key", "authorization"})
    turns_field = "contents"
    content_field = "parts"
    default_role = "user"
    tool_call_needles = (b'"functionCall"', b'"executableCode"')

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        return path.endswith(":streamGenerateContent")

    def model(self, body: dict[str, Any], path: str) -> str:
        found = re.search(r"/models/([^/:]+):", path)
        return found.group(1) if found else ""

    def is_terminal(self, event: Event) -> bool:
        """No sentinel: the last event must carry a finishReason."""
        obj = json_object(event.data)
        candidates = obj.get("candidates") if obj else None
        return isinstance(candidates, list) and any(isinstance(c, dict) and c.get("finishReason") for c in candidates)

    def answers_wanted(self, body: dict[str, Any]) -> int:
        config = body.get("generationConfig")
        n = config.get("candidateCount", 1) if isinstance(config, dict) else 1
        return n if isinstance(n, int) else 1

    def delta_text(self, event: dict[str, Any]) -> str:
        candidates = event.get("candidates")
        first = candidates[0] if isinstance(candidates, list) and candidates else None
        return text_of(first.get("content")) if isinstance(first, dict) else ""


class OllamaNative(Protocol):
    name = "ollama"
    path_shapes = ("api/chat", "api/generate")
    required_fields = ("model",)
    stream_format = "ndjson"
    usage_fields = (("", "prompt_eval_count", "eval_count"),)
    prompt_fields = ("messages", "prompt")
    own_credential_headers = frozenset({"authorization"})  # Ollama behind an authenticating proxy
    turns_field = "messages"
    tool_call_needles = (b'"tool_calls"',)

    def wants_stream(self, body: dict[str, Any], path: str) -> bool:
        """Ollama streams unless told `"stream": false`."""
        return body.get("stream", True) is not False

    def is_terminal(self, event: Event) -> bool:
        obj = json_object(event.data)
        return obj is not None and obj.get("done") is True

    def question(self, body: dict[str, Any], count: int = 1) -> Question | str:
        """/api/chat has messages; /api/generate a prompt, taken unless images come with it."""
        if "messages" in body:
            return super().question(body, count)
        if body.get("images") or not isinstance(body.get("prompt"), str):
            return "non-text content or no prompt"
        return Question(body["prompt"], {**body, "prompt": QUESTION_PLACEHOLDER})

    def delta_text(self, event: dict[str, Any]) -> str:
        """/api/chat streams `message.content`, /api/generate `response`."""
        message = event.get("message")
        return text_of(message.get("content")) if isinstance(message, dict) else text_of(event.get("response", ""))


PROTOCOLS: list[Protocol] = []
BY_NAME: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    """Adds a family; its name must be new."""
    if protocol.name in BY_NAME:
        raise ValueError(f"protocol {protocol.name!r} is registered already")
    PROTOCOLS.append(protocol)
    BY_NAME[protocol.name] = protocol
    forget_families()
    return protocol


def forget_families() -> None:
    """Clear what was derived from the registered families (after a registration)."""
    family_of_path.cache_clear()
    answer_headers.cache_clear()
    credential_headers.cache_clear()


def recognise(method: str, path: str) -> Protocol | None:
    """The family of a request, or None: everything else passes through untouched."""
    return family_of_path(path) if method == "POST" else None


@lru_cache(maxsize=4096)
def family_of_path(path: str) -> Protocol | None:
    """The family whose most specific shape fits `path`; remembered, as a client asks the
    same few paths again and again (every family's patterns: 5 µs a request)."""
    best, best_fit = None, 0
    for protocol in PROTOCOLS:
        if (fit := protocol.fit(path)) > best_fit:
            best, best_fit = protocol, fit
    return best


def _union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for group in groups for name in group))


@cache
def answer_headers() -> tuple[str, ...]:
    """Every family's answer-changing headers: each is in the key of every request, as
    OpenAI-compatible gateways forward to several providers (an Anthropic model behind
    /chat/completions may honour anthropic-beta)."""
    return _union(p.answer_headers for p in PROTOCOLS)


@cache
def credential_headers() -> frozenset[str]:
    """Every family's credential headers: none is ever stored, whatever the request's family."""
    return frozenset(_union(p.credential_headers for p in PROTOCOLS)) | BASE_CREDENTIAL_HEADERS


for family in (
    OpenAIChat,
    OpenAICompletions,
    OpenAIResponses,
    OpenAIEmbeddings,
    AnthropicMessages,
    Gemini,
    OllamaNative,
):
    register(family())
