"""The addon's options: declarations, parsing, and one immutable Settings value.

Numbers are declared as `str` and parsed here, as mitmproxy does for body_size_limit:
an int option given a non-int makes the script fail to load silently. Every parse error
names its option, so a bad value stops startup with a clear message.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions

from .keys import KeyPolicy
from .normalize import compile_rules
from .state import Mode

PREFIX = "ai_cache_"
MODES = tuple(mode.value for mode in Mode)
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}

# name, type, default, help
OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    (
        "ai_cache_dir",
        str,
        "~/.cache/ai-cache",
        "Directory of the L1 cache (diskcache), created if missing. An unusable directory "
        "degrades the addon to pass-through with one warning.",
    ),
    (
        "ai_cache_mode",
        str,
        "record",
        "record: read-through cache (answer hits, fetch and store misses). replay: never "
        "contact upstream; a miss answers 504 explaining that no recording exists. refresh: "
        "always fetch and overwrite. off: pass everything through.",
    ),
    (
        "ai_cache_ttl",
        str,
        "0",
        "How long entries stay valid, in seconds or with a unit (90s, 30m, 12h, 7d); 0 keeps "
        "them forever. Judged from when the answer was recorded, in every layer.",
    ),
    (
        "ai_cache_max_body",
        str,
        "10MiB",
        "Largest answer stored, in bytes or with a unit (512KiB, 10MiB). Larger answers and "
        "streams still reach the client in full; they are just not stored.",
    ),
    (
        "ai_cache_fixtures",
        str,
        "",
        "Directory of fixture files (the export format, one file per answer) served in front "
        "of L1 and L2, as layer 'fixtures'; in record and refresh modes new answers are also "
        "written there. Empty: none. With ai_cache_mode=replay, CI needs only the committed files.",
    ),
    (
        "ai_cache_run_log",
        str,
        "",
        "File the proxy appends one JSON line to per LLM call (status, layer, fixture file, "
        "the 504's explanation) and per write, and the fixture files used at shutdown: what "
        "the pytest plugin and with-ai-cache read. Empty: none.",
    ),
    ("ai_cache_headers", bool, True, "Add X-AI-Cache-Status, -Key, -Age and -Layer to answers of recognised requests."),
    (
        "ai_cache_ignore_fields",
        str,
        "",
        "Comma-separated request body fields left out of the key when they do not change "
        "the answer, e.g. 'user,metadata' or a nested 'metadata.user_id'.",
    ),
    (
        "ai_cache_scope_headers",
        str,
        "",
        "Comma-separated request headers whose values (hashed, never stored) are folded into "
        "the key to isolate tenants; 'authorization' or 'x-api-key' means one cache per API key.",
    ),
    (
        "ai_cache_secret_params",
        str,
        "",
        "Comma-separated query parameters that carry credentials, on top of the built-in ones "
        "(key, api_key, subscription-key, code, sig, token, access_token, secret, password, ...): "
        "forwarded upstream, never stored, logged or part of the key. Case-insensitive.",
    ),
    (
        "ai_cache_hosts",
        str,
        "",
        "Comma-separated hosts whose LLM calls are cached, globs allowed ('api.openai.com,"
        "*.anthropic.com,localhost:11434'); empty caches recognised calls to any host. When set, "
        "mitmproxy decrypts only these hosts (allow_hosts, unless set) and tunnels other TLS untouched.",
    ),
    (
        "ai_cache_key_host",
        bool,
        True,
        "Put the upstream host in the key. Turn off to replay recordings against another host "
        "(a staging gateway, a reverse proxy on another port).",
    ),
    (
        "ai_cache_coalesce",
        str,
        "60",
        "Single flight: an identical request arriving while the first is still in flight waits "
        "up to this many seconds (or 2m, ...) for that answer instead of paying for it again; "
        "0 sends every request upstream. Followers of a stream get it live from its first byte; "
        "with ai_cache_redis_url, proxies sharing that Redis wait for each other too.",
    ),
    (
        "ai_cache_replay_speed",
        str,
        "0",
        "Pace of replayed streams: 0 sends a cached stream at once; 1 replays it at the "
        "recorded pace; 2 twice as fast, 0.5 half as fast.",
    ),
    (
        "ai_cache_redis_url",
        str,
        "",
        "Redis for the shared L2 cache, empty for none: redis://[user:pass@]host:6379/0, "
        "rediss:// for TLS, unix:///path/redis.sock, redis+cluster://host:7000 for a cluster.",
    ),
    (
        "ai_cache_redis_timeout",
        str,
        "100",
        "Milliseconds any Redis call may take before it counts as failed and the request goes "
        "on without L2. Failures open a circuit breaker that skips Redis for a growing cool-down.",
    ),
    ("ai_cache_redis_prefix", str, "ai-cache:", "Prefix of every Redis key the cache writes."),
    (
        "ai_cache_redis_pool",
        str,
        "256",
        "Most Redis connections (= concurrent calls) the proxy opens. A call that finds them "
        "all busy waits up to ai_cache_redis_timeout for one, then goes on without L2; busy "
        "connections never count as Redis failing.",
    ),
    (
        "ai_cache_connection_log",
        bool,
        True,
        "Keep mitmproxy's client/server connect and disconnect lines (four per connection). "
        "make run and with-ai-cache turn them off: one line per LLM call. Warnings stay.",
    ),
    (
        "ai_cache_normalize",
        str,
        "",
        "Comma-separated rules that replace volatile text in every string of the request body "
        "by a placeholder before the key is computed (the stored request stays as sent): "
        "datetime, date, time, uuid, hexid, tmpdir, or re:PATTERN (write a comma in it as \\,).",
    ),
    (
        "ai_cache_metrics",
        str,
        "",
        "[HOST:]PORT to serve GET /metrics (Prometheus text format) and GET /stats (the same "
        "numbers as JSON) on; HOST defaults to 127.0.0.1. Empty: no metrics endpoint.",
    ),
    (
        "ai_cache_metrics_models",
        bool,
        False,
        "Add a model label to the request counter. Off by default: every model name seen makes new series.",
    ),
    (
        "ai_cache_semantic",
        str,
        "off",
        "on: on an exact miss, answer with a stored answer to a question close in meaning (the "
        "embedded last user turn), when everything else in the request is identical and the "
        "lexical guard agrees. Needs ai_cache_embed_url. Never in replay or refresh mode.",
    ),
    (
        "ai_cache_semantic_threshold",
        str,
        "0.95",
        "Least cosine similarity of two questions' embeddings for a semantic hit, above 0 and up to 1.",
    ),
    (
        "ai_cache_semantic_messages",
        str,
        "1",
        "How many trailing user messages a semantic lookup embeds.",
    ),
    (
        "ai_cache_embed_url",
        str,
        "",
        "Embeddings endpoint for the semantic layer: an OpenAI-compatible URL such as "
        "http://127.0.0.1:11434/v1/embeddings or https://api.openai.com/v1/embeddings, or "
        "Ollama's native http://127.0.0.1:11434/api/embed.",
    ),
    ("ai_cache_embed_model", str, "", "Model the embeddings endpoint is asked for."),
    (
        "ai_cache_embed_key_env",
        str,
        "OPENAI_API_KEY",
        "Name of the environment variable holding the embeddings endpoint's API key, sent as "
        "a bearer token when set (the key never appears in an option, a log line or an entry).",
    ),
    (
        "ai_cache_embed_timeout",
        str,
        "2000",
        "Milliseconds an embedding call may take; a slower or failing embedder means exact "
        "caching only (a circuit breaker skips it for a growing cool-down), never a failed request.",
    ),
)
OPTION_NAMES = frozenset(name for name, *_ in OPTIONS)


def misset_options(deferred: Mapping[str, Any]) -> list[str]:
    """What is wrong with the `ai_cache_*` settings mitmproxy put aside until the addon
    declared its options: a misspelt name (ignored without a word by mitmproxy) or an
    option set twice (the script then fails to load without a word). One message each."""
    problems = []
    for name, value in deferred.items():
        if name in OPTION_NAMES:
            given = getattr(value, "val", None)  # mitmproxy's unconverted `--set` strings
            if isinstance(given, list) and len(given) > 1:
                problems.append(f"{name} is set {len(given)} times; set each option once")
        elif name.startswith(PREFIX):  # compare what follows the prefix, which all share
            close = difflib.get_close_matches(
                name[len(PREFIX) :], [n[len(PREFIX) :] for n in sorted(OPTION_NAMES)], n=1
            )
            problems.append(f"unknown option {name}" + (f" (did you mean {PREFIX}{close[0]}?)" if close else ""))
    return problems


def overridden_settings(deferred: Mapping[str, Any], argv: Sequence[str]) -> list[str]:
    """The `ai_cache_*` options given with `--set` whose value the confdir's config.yaml
    replaced: mitmproxy reads config.yaml after `--set` (which it needs for `confdir`), so
    a developer's config.yaml could silently turn `ai_cache_mode=replay` back into record."""
    given: dict[str, str] = {}
    for before, setting in zip(argv, argv[1:], strict=False):
        if before == "--set":
            name, _, value = setting.partition("=")
            given[name] = value
    for arg in argv:
        if arg.startswith("--set="):
            name, _, value = arg[len("--set=") :].partition("=")
            given[name] = value
    problems = []
    for name, value in deferred.items():
        replaced = name in given and not hasattr(value, "val")  # `.val`: still --set's own strings
        if name in OPTION_NAMES and replaced and str(value).lower() != given[name].lower():
            problems.append(
                f"{name}: --set {name}={given[name]} is overridden by config.yaml in the confdir "
                f"({name}: {value!r}), which mitmproxy reads after --set; remove it there"
            )
    return problems


def parse_number(text: str, units: Mapping[str, float], what: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"{text!r} is not a {what}")
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_duration(text: str) -> float:
    """Seconds from '3600', '90s', '30m', '12h', '7d', '2w'."""
    return parse_number(text, DURATION_UNITS, "duration (e.g. 3600, 30m, 12h, 7d)")


def parse_size(text: str) -> int:
    """Bytes from '1048576', '512KiB', '10MiB', '1g'."""
    return int(parse_number(text, SIZE_UNITS, "size (e.g. 1048576, 512KiB, 10MiB)"))


def parse_listen(text: str) -> tuple[str, int] | None:
    """(host, port) from '[HOST:]PORT' ('9464', '0.0.0.0:9464', '[::1]:9464'); None when empty."""
    if not text.strip():
        return None
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not [HOST:]PORT with a port from 1 to 65535")
    return host, int(port)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class SemanticSettings:
    """The semantic layer's options (see semantic/)."""

    threshold: float
    messages: int
    embed_url: str
    embed_model: str
    embed_key_env: str
    embed_timeout: float  # seconds


@dataclass(frozen=True)
class Settings:
    directory: str
    mode: Mode
    ttl: float
    max_body: int
    headers: bool
    policy: KeyPolicy
    hosts: tuple[str, ...]  # lower-cased globs; empty = any host
    coalesce: float  # seconds a follower waits for an identical in-flight request; 0 = off
    replay_speed: float
    redis_url: str
    redis_timeout: float  # seconds
    redis_prefix: str
    redis_pool: int
    connection_log: bool
    metrics: tuple[str, int] | None  # where /metrics and /stats are served; None = off
    metrics_models: bool
    semantic: SemanticSettings | None  # None: off
    fixtures: str  # the fixture directory; "" = none
    run_log: str

    @property
    def fixtures_writable(self) -> bool:
        """Only recording modes write fixture files: replay never changes the directory."""
        return self.mode in (Mode.RECORD, Mode.REFRESH)

    @classmethod
    def from_options(cls, options: Any) -> Settings:
        """Parse the ai_cache_* options; an OptionsError names the first bad one."""

        def parsed(name: str, parse, check=lambda v: True, rule: str = ""):
            value = getattr(options, name)
            try:
                result = parse(value)
            except ValueError as e:
                raise exceptions.OptionsError(f"{name}: {e}") from None
            if not check(result):
                raise exceptions.OptionsError(f"{name}: {value!r} {rule}")
            return result

        mode = options.ai_cache_mode.strip().lower()
        if mode not in MODES:
            raise exceptions.OptionsError(f"ai_cache_mode: {options.ai_cache_mode!r} is not one of {', '.join(MODES)}")
        redis_url = options.ai_cache_redis_url.strip()
        if redis_url and not re.match(r"^(rediss?|unix|rediss?\+cluster)://", redis_url):
            raise exceptions.OptionsError(
                "ai_cache_redis_url: must start with redis://, rediss://, unix:// or redis+cluster://"
            )
        return cls(
            directory=options.ai_cache_dir,
            mode=Mode(mode),
            ttl=parsed("ai_cache_ttl", parse_duration),
            max_body=parsed("ai_cache_max_body", parse_size, lambda v: v > 0, "must be above 0"),
            headers=options.ai_cache_headers,
            hosts=tuple(h.lower() for h in parse_list(options.ai_cache_hosts)),
            policy=KeyPolicy(
                ignore_fields=parse_list(options.ai_cache_ignore_fields),
                scope_headers=tuple(h.lower() for h in parse_list(options.ai_cache_scope_headers)),
                include_host=options.ai_cache_key_host,
                secret_params=frozenset(p.lower() for p in parse_list(options.ai_cache_secret_params)),
                normalize=parsed("ai_cache_normalize", compile_rules),
            ),
            coalesce=parsed("ai_cache_coalesce", parse_duration),
            replay_speed=parsed(
                "ai_cache_replay_speed",
                float,
                lambda v: 0 <= v < float("inf"),
                "must be 0 (at once) or a positive speed factor",
            ),
            redis_url=redis_url,
            redis_timeout=parsed(
                "ai_cache_redis_timeout", float, lambda v: 0 < v <= 60000, "must be between 0 and 60000 milliseconds"
            )
            / 1000,
            redis_prefix=options.ai_cache_redis_prefix,
            redis_pool=parsed(
                "ai_cache_redis_pool",
                int,
                lambda v: 1 <= v <= 100_000,
                "must be a number of connections from 1 to 100000",
            ),
            connection_log=options.ai_cache_connection_log,
            metrics=parsed("ai_cache_metrics", parse_listen),
            metrics_models=options.ai_cache_metrics_models,
            semantic=semantic_settings(options, parsed),
            fixtures=options.ai_cache_fixtures.strip(),
            run_log=options.ai_cache_run_log.strip(),
        )


def semantic_settings(options: Any, parsed: Any) -> SemanticSettings | None:
    """The semantic layer's settings, None when it is off; OptionsError names a bad option."""
    switch = options.ai_cache_semantic.strip().lower()
    if switch not in ("on", "off"):
        raise exceptions.OptionsError(f"ai_cache_semantic: {options.ai_cache_semantic!r} is not on or off")
    if switch == "off":
        return None
    url = options.ai_cache_embed_url.strip()
    if not re.match(r"^https?://[^/]+", url):
        raise exceptions.OptionsError(
            "ai_cache_embed_url: ai_cache_semantic=on needs an http:// or https:// embeddings URL"
        )
    return SemanticSettings(
        threshold=parsed("ai_cache_semantic_threshold", float, lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
        messages=parsed("ai_cache_semantic_messages", int, lambda v: 1 <= v <= 100, "must be from 1 to 100"),
        embed_url=url,
        embed_model=options.ai_cache_embed_model.strip(),
        embed_key_env=options.ai_cache_embed_key_env.strip(),
        embed_timeout=parsed(
            "ai_cache_embed_timeout", float, lambda v: 0 < v <= 60000, "must be between 0 and 60000 milliseconds"
        )
        / 1000,
    )


def allow_hosts(globs: tuple[str, ...]) -> list[str]:
    """mitmproxy's allow_hosts for ai_cache_hosts: regexes searched in "host:port", so each
    glob is anchored, and one without a port takes any port."""
    return ["^" + fnmatch.translate(glob if ":" in glob else f"{glob}:*") for glob in globs]
