"""Fixture files: cache entries as reviewable JSON, one file per entry, byte-exact both ways.

A file is `{protocol}-{model}-{key[:16]}.json`, pretty-printed with sorted keys (but a
JSON answer's own, kept in the provider's order), so a
re-export of an unchanged cache rewrites identical bytes and diffs stay small:

    {
      "ai_cache_fixture": 2,
      "answer": "Hello! How can I help?",
      "body": [
        {"at": 0.0, "text": "data: {\"choices\": ...}\n\n"},
        {"at": 0.412, "text": "data: [DONE]\n\n"}
      ],
      "created_at": 1732615200.5,
      "format": "sse",
      "headers": [["content-type", "text/event-stream"]],
      "key": "3f2a...",
      "meta": {"model": "gpt-4o", "protocol": "openai-chat", "request": {...}, ...},
      "status": 200
    }

The body, by format:

- `sse` / `ndjson`: the recorded chunks in order, each `{"at": seconds since the first
  chunk, "text": the chunk as UTF-8}`, so the stream reads as text and keeps its pace.
  A chunk that is not UTF-8 on its own (a read that split a character) is stored as
  `{"at", "base64"}` instead; the others stay readable. `answer` is the answer text
  the events assemble to, for review only: import ignores it.
- `json`: one body. `body` is the parsed answer, for reading and editing, with
  `body_style` naming the serialisation that gives back the exact bytes (`indent2`,
  `compact`, `spaced`, with `+ascii` and `+newline`); answers no style reproduces are
  kept as `body_text` alone, bytes that are not UTF-8 as `body_base64`. A hand-written
  `body` without a style answers as `keys.canonical_json(body)`; an edited `body` keeps
  its style (its read timing, which no longer fits, becomes one chunk). The chunk timing, which
  replay ignores for JSON, is kept as `chunks`: `[[seconds, length], ...]`.

Chunk times are written in milliseconds' precision: a re-recorded stream does not change
every line for microseconds of jitter.

Version 1 files (before `answer` and `body_style`) still import: their JSON answers
carried `body` and `body_text` both, which must agree.

Credentials never reach a file: credential headers (and `set-cookie`) are dropped from
the stored headers and `meta.request.headers`, credential parameters from
`meta.request.query`. A stream entry recorded without timing exports as a single chunk
at 0.0; everything else imports back equal to what was exported.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .entry import FORMATS, Entry, EntryError, validated
from .keys import CREDENTIAL_PARAMS, canonical_json
from .protocols import BY_NAME, credential_headers

FIXTURE_VERSION = 2
READABLE_VERSIONS = (1, 2)
TIME_DIGITS = 3  # chunk times in milliseconds
# A temporary file of write_new's this old was left by a writer that was killed mid-write.
STALE_TEMPORARY_SECONDS = 3600.0
# The serialisations `body_style` names: providers answer in one of these.
STYLES: dict[str, dict[str, Any]] = {
    "indent2": {"indent": 2},
    "compact": {"separators": (",", ":")},
    "spaced": {},
}
# A response's set-cookie carries a session credential too.
RESPONSE_CREDENTIAL_HEADERS = frozenset({"set-cookie"})
SLUG_LENGTH = 40


class FixtureError(ValueError):
    """A fixture file that cannot become an entry; the message says why."""


# Export


def scrubbed(entry: Entry) -> Entry:
    """A copy of the entry without credentials, whatever an older version stored."""
    meta = copy.deepcopy(entry.meta)
    secret = credential_headers() | RESPONSE_CREDENTIAL_HEADERS
    request = meta.get("request")
    if isinstance(request, dict):
        if isinstance(request.get("headers"), dict):
            request["headers"] = {k: v for k, v in request["headers"].items() if k.lower() not in secret}
        if isinstance(request.get("query"), list):
            request["query"] = [pair for pair in request["query"] if str(pair[0]).lower() not in CREDENTIAL_PARAMS]
    headers = [(k, v) for k, v in entry.headers if k.lower() not in secret]
    return Entry(entry.key, entry.format, entry.body, headers, entry.created_at, entry.status, list(entry.chunks), meta)


def slug(text: str) -> str:
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")
    return cleaned[:SLUG_LENGTH].rstrip("-") or "unknown"


def file_name(entry: Entry) -> str:
    protocol, model = (str(entry.meta.get(name, "")) for name in ("protocol", "model"))
    return f"{slug(protocol)}-{slug(model)}-{slug(entry.key[:16])}.json"


def _stream_body(entry: Entry) -> dict[str, Any]:
    chunks = entry.chunks or ([(0.0, len(entry.body))] if entry.body else [])
    body, offset = [], 0
    for at, size in chunks:
        piece = entry.body[offset : offset + size]
        offset += size
        try:
            body.append({"at": round(at, TIME_DIGITS), "text": piece.decode("utf-8")})
        except UnicodeDecodeError:
            body.append({"at": round(at, TIME_DIGITS), "base64": base64.b64encode(piece).decode("ascii")})
    protocol = BY_NAME.get(str(entry.meta.get("protocol")))
    answer = protocol.stream_text(entry.body, entry.format) if protocol else ""
    return {"body": body, "answer": answer} if answer else {"body": body}


def styled(value: Any, style: str) -> str:
    """`value` serialised as `body_style` says; ValueError for a style that is none."""
    name, *flags = style.split("+")
    if name not in STYLES or not set(flags) <= {"ascii", "newline"}:
        raise ValueError(style)
    text = json.dumps(value, ensure_ascii="ascii" in flags, **STYLES[name])
    return text + "\n" if "newline" in flags else text


def style_of(value: Any, text: str) -> str | None:
    """The style that serialises `value` back to exactly `text`, if any."""
    flags = "+newline" if text.endswith("\n") else ""
    for name in STYLES:
        for style in (name + flags, f"{name}+ascii{flags}"):
            if styled(value, style) == text:
                return style
    return None


def _json_body(entry: Entry) -> dict[str, Any]:
    fields: dict[str, Any] = {"chunks": [[round(at, TIME_DIGITS), size] for at, size in entry.chunks]}
    try:
        text = entry.body.decode("utf-8")
    except UnicodeDecodeError:
        return fields | {"body_base64": base64.b64encode(entry.body).decode("ascii")}
    try:
        body = json.loads(text)
    except ValueError:
        return fields | {"body_text": text}
    style = style_of(body, text)
    return fields | ({"body": body, "body_style": style} if style else {"body_text": text})


def to_fixture(entry: Entry) -> dict[str, Any]:
    """The fixture document of an entry, credentials removed."""
    entry = scrubbed(entry)
    document = {
        "ai_cache_fixture": FIXTURE_VERSION,
        "key": entry.key,
        "format": entry.format,
        "status": entry.status,
        "created_at": entry.created_at,
        "headers": [list(h) for h in entry.headers],
        "meta": entry.meta,
    }
    return document | (_json_body(entry) if entry.format == "json" else _stream_body(entry))


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: _sorted(value[name]) for name in sorted(value)}
    return [_sorted(item) for item in value] if isinstance(value, list) else value


def dumps(entry: Entry) -> bytes:
    """The fixture file's bytes: keys sorted, but a JSON answer's own (its `body_style`
    gives back its bytes). A lone surrogate, which UTF-8 cannot carry, is written as its
    JSON escape (`\\ud800`), so it reads back the same."""
    document = to_fixture(entry)
    document = {name: value if name == "body" else _sorted(value) for name, value in sorted(document.items())}
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return text.encode("utf-8", "backslashreplace")


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `path` as a new file renamed into place: whatever was there, a symlink
    included, is replaced, never written through."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def remove_stale_temporaries(directory: Path, now: float) -> list[str]:
    """Remove the temporary files of writes that never finished (a proxy killed in the
    middle): older than STALE_TEMPORARY_SECONDS, so no live writer's. Their names."""
    removed = []
    for path in directory.glob(".*.json.*.tmp"):
        try:
            if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                path.unlink()
                removed.append(path.name)
        except OSError:  # gone meanwhile, or not ours to remove: left alone
            continue
    return removed


def export_dir(entries: list[Entry], directory: Path) -> list[Path]:
    """Write one fixture per entry into `directory` (created); files already there stay."""
    directory.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    paths = []
    for entry in entries:
        path = directory / file_name(entry)
        write_new(path, dumps(entry), 0o666 & ~umask)
        paths.append(path)
    return paths


# Import


def _field(document: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in document:
        raise FixtureError(f"missing field {name!r}")
    value = document[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FixtureError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _b64(text: Any, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise FixtureError(f"{where} is not base64") from None


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape: no bytes to answer with
        raise FixtureError(f"{where} holds a lone surrogate, which is not text") from None


def _seconds(value: Any, what: str) -> float:
    """A JSON number as float seconds; `validated` judges the range."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            pass
    raise FixtureError(f"{what} {value!r} is not a number of seconds")


def _read_stream_body(document: dict[str, Any]) -> tuple[bytes, list[tuple[float, int]]]:
    pieces, chunks = [], []
    for i, chunk in enumerate(_field(document, "body", list)):
        if not isinstance(chunk, dict) or "at" not in chunk or ("text" in chunk) == ("base64" in chunk):
            raise FixtureError(f"body chunk {i} needs 'at' and one of 'text' or 'base64'")
        if "text" in chunk:
            if not isinstance(chunk["text"], str):
                raise FixtureError(f"body chunk {i}: 'text' is not a string")
            piece = _utf8(chunk["text"], f"body chunk {i}")
        else:
            piece = _b64(chunk["base64"], f"body chunk {i}")
        pieces.append(piece)
        chunks.append((_seconds(chunk["at"], "chunk time"), len(piece)))
    return b"".join(pieces), chunks


def _read_json_body(document: dict[str, Any]) -> tuple[bytes, list[tuple[float, int]]]:
    if "body_base64" in document:
        body = _b64(document["body_base64"], "body_base64")
    elif "body_text" in document:
        text = _field(document, "body_text", str)
        if "body" in document:
            try:
                same = canonical_json(json.loads(text)) == canonical_json(document["body"])
            except ValueError:
                same = False
            if not same:
                raise FixtureError("'body' and 'body_text' disagree: edit one and delete the other")
        body = _utf8(text, "'body_text'")
    elif "body" in document and "body_style" in document:
        style = _field(document, "body_style", str)
        try:
            body = _utf8(styled(document["body"], style), "'body'")
        except ValueError:
            raise FixtureError(f"body_style {style!r} is none of {', '.join(STYLES)} (+ascii, +newline)") from None
    elif "body" in document:
        body = _utf8(canonical_json(document["body"]), "'body'")
    else:
        raise FixtureError("missing field 'body'")
    chunks = []
    for pair in _field(document, "chunks", list) if "chunks" in document else []:
        length = pair[1] if isinstance(pair, list) and len(pair) == 2 else None
        if isinstance(length, bool) or not isinstance(length, int):
            raise FixtureError(f"chunk {pair!r} is not [seconds, length]")
        chunks.append((_seconds(pair[0], "chunk time"), length))
    if "body_style" in document and sum(length for _, length in chunks) != len(body):
        chunks = [(0.0, len(body))]  # the body was edited: its recorded reads no longer fit
    return body, chunks


def from_fixture(document: Any) -> Entry:
    """The entry a fixture document describes, checked like every entry read from outside
    (see `entry.validated`); FixtureError says what is wrong with it."""
    if not isinstance(document, dict) or document.get("ai_cache_fixture") not in READABLE_VERSIONS:
        raise FixtureError(f'not an ai-cache fixture (needs "ai_cache_fixture": {FIXTURE_VERSION})')
    key = _field(document, "key", str)
    fmt = _field(document, "format", str)
    if fmt not in FORMATS:
        raise FixtureError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    headers = _field(document, "headers", list)
    if not all(isinstance(h, list) and len(h) == 2 and all(isinstance(s, str) for s in h) for h in headers):
        raise FixtureError("'headers' must be a list of [name, value] strings")
    status = _field(document, "status", int)
    body, chunks = (_read_json_body if fmt == "json" else _read_stream_body)(document)
    try:
        return validated(
            Entry(
                key=key,
                format=fmt,
                body=body,
                headers=[(name, value) for name, value in headers],
                created_at=_seconds(_field(document, "created_at", (int, float)), "created_at"),
                status=status,
                chunks=chunks,
                meta=_field(document, "meta", dict),
            )
        )
    except EntryError as e:
        raise FixtureError(str(e)) from None


def load_file(path: Path) -> Entry:
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FixtureError(f"unreadable: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FixtureError("not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise FixtureError(f"not valid JSON: {e}") from None
    return from_fixture(document)


def import_dir(directory: Path) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """Every `*.json` in `directory` as entries, plus (file, reason) for each one skipped."""
    entries: list[Entry] = []
    errors: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            entry = load_file(path)
        except FixtureError as e:
            errors.append((path, str(e)))
            continue
        if entry.key in seen:
            errors.append((path, f"same key as {seen[entry.key].name}"))
            continue
        seen[entry.key] = path
        entries.append(entry)
    return entries, errors
