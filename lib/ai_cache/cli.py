"""`ai-cache`: look into, export, import and prune what the addon recorded, offline.

Acts on L1 (the cache directory) and, given --redis-url, on L2 too: listings are the
union of both layers (L1's copy wins), deletions and imports reach both. Errors go to
stderr as `ai-cache: ...`; exit status 0 is success, 1 failure, 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import logging
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from . import ADDON_PATH
from .disk import DiskStore
from .entry import FORMATS, Entry
from .fixture_store import UNUSED_LIST, read_unused
from .fixtures import export_dir, import_dir
from .options import OPTIONS, parse_duration
from .protocols import BY_NAME
from .redis_store import DEFAULT_MAX_VALUE, DEFAULT_POOL, RedisStore, redact
from .report import human_age, human_size, plural
from .semantic.vectors import RedisVectors, forget_questions, local_vectors
from .store import Store
from .tiers import open_cache

T = TypeVar("T")
# Seconds: unlike a proxied request, a person at a terminal can wait for Redis.
REDIS_TIMEOUT = 5.0


class CLIError(Exception):
    """Reported as `ai-cache: <message>`; the command exits with `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def option_default(name: str) -> Any:
    """The addon's default, so the CLI finds the cache the proxy writes without flags."""
    return next(default for option, _, default, _ in OPTIONS if option == name)


# The cache, as the addon's tiered cache


@dataclass(frozen=True)
class Stores:
    """What `open_cache` reads, from the command line."""

    directory: str
    redis_url: str
    redis_prefix: str
    redis_timeout: float = REDIS_TIMEOUT
    redis_pool: int = DEFAULT_POOL
    max_body: int = DEFAULT_MAX_VALUE  # whatever the proxies' ai_cache_max_body, within reason
    ttl: float = 0.0  # no expiry on writes: the addon judges freshness from each `created_at`
    fixtures: str = ""  # the CLI acts on L1 and L2; fixture files are its export/import
    fixtures_writable: bool = False


@dataclass
class Stored:
    entry: Entry
    layers: list[str]


class Cache:
    """The addon's tiered cache, L1 only when the directory holds a cache (or `create`),
    run on one event loop per command. Unlike the proxy, the CLI reports a store that
    fails instead of going on without it."""

    def __init__(self, directory: Path, redis_url: str, redis_prefix: str, create: bool) -> None:
        self.directory = directory
        self.redis_url = redis_url
        try:
            self.tiers = open_cache(Stores(str(directory), redis_url, redis_prefix), create=create, fail_open=False)
        except (OSError, sqlite3.Error) as e:
            raise CLIError(f"cannot open the cache in {directory}: {e}") from None
        except ValueError as e:
            raise CLIError(f"--redis-url: {e}") from None
        if not self.tiers.stores:
            raise CLIError(f"no cache in {directory} (--dir chooses another directory)")
        self.loop = asyncio.Runner()
        # The semantic layer's questions: they go with their entries.
        self.vectors = local_vectors(directory, create=False) if self.tiers.disk else None
        redis = next((s for s in self.tiers.stores if isinstance(s, RedisStore)), None)
        self.remote_vectors = RedisVectors(redis) if redis is not None else None

    @property
    def where(self) -> str:
        places = [str(self.directory)] if self.tiers.disk else []
        return " + ".join(places + ([redact(self.redis_url)] if self.redis_url else []))

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        """`work` on the command's event loop. Redis fails open, the CLI must not: a Redis
        that failed meanwhile fails the command."""
        result = self.loop.run(work)
        if any(isinstance(store, RedisStore) and store.breaker.is_open for store in self.tiers.stores):
            raise CLIError(f"Redis at {redact(self.redis_url)} failed; L2 was not fully read or written")
        return result

    def keys(self) -> list[str]:
        return self._run(self.tiers.keys())

    def entries(self, keys: Iterable[str] | None = None) -> list[Stored]:
        """The entries under `keys` (default: all), each with the layers holding it."""
        return [Stored(entry, layers) for entry, layers in self._run(self.tiers.copies(keys)).values()]

    def find(self, prefix: str) -> Stored:
        """The one entry whose key starts with `prefix`."""
        prefix = prefix.strip().lower()
        matches = self._run(self.tiers.matching(prefix))
        if len(matches) > 1:
            shown = ", ".join(k[:12] for k in matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise CLIError(f"key prefix {prefix!r} is ambiguous: {entry_count(len(matches))} match ({shown})")
        found = self.entries(matches)
        if not found:
            raise CLIError(f"no entry with a key starting {prefix!r} in {self.where}")
        return found[0]

    def put(self, entries: list[Entry]) -> None:
        """Store in each layer in turn, stopping at the first that fails."""

        async def put_all(store: Store) -> list[bool]:
            return [await store.put(entry, self.tiers.expiry(store, entry)) for entry in entries]

        for store in self.tiers.stores:
            failed = self._run(put_all(store)).count(False)
            if failed and isinstance(store, DiskStore):
                raise CLIError(f"could not write {entry_count(failed)} to {self.directory}")

    def delete(self, keys: list[str]) -> None:
        """Delete from each layer in turn, stopping at the first that fails."""

        async def delete_all(store: Store) -> list[str]:
            failures = []
            for key in keys:
                if not await store.delete(key) and isinstance(store, DiskStore) and store.failure:
                    failures.append(store.failure)
            return failures

        for store in self.tiers.stores:
            if failures := self._run(delete_all(store)):
                raise CLIError(f"could not delete {entry_count(len(failures))} in {self.directory}: {failures[-1]}")
        self._run(forget_questions(self.vectors, self.remote_vectors, keys))

    def clear_questions(self) -> None:
        """Every semantic question, also those whose entries expired or were evicted."""
        self._run(forget_questions(self.vectors, self.remote_vectors, None))

    def semantic_counts(self) -> tuple[int, int] | None:
        """(questions stored, semantic hits) of L1, None when the semantic layer never ran here."""
        return self.vectors.counts_sync() if self.vectors is not None else None

    def close(self) -> None:
        try:
            self.loop.run(self.tiers.close())
        finally:
            self.loop.close()
            if self.vectors is not None:
                self.vectors.close()


# Presentation


def table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)] + row[-1:]) for row in rows]


def entry_count(n: int) -> str:
    """ "1 entry", "2 entries": every count of entries the CLI prints."""
    return plural(n, "entry", "entries")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def readable_body(entry: Entry) -> str:
    text = entry.body.decode("utf-8", errors="replace")
    if entry.format == "json":
        try:
            return pretty_json(json.loads(text))
        except ValueError:
            pass
    return text


def listing(stored: Stored, now: float) -> dict[str, Any]:
    """What `ls --json` says about an entry."""
    entry, meta = stored.entry, stored.entry.meta
    tokens_in, tokens_out = entry.tokens()
    return {
        "key": entry.key,
        "created_at": entry.created_at,
        "age": round(entry.age(now), 3),
        "format": entry.format,
        "status": entry.status,
        "protocol": meta.get("protocol", ""),
        "model": meta.get("model", ""),
        "stream": meta.get("stream", False),
        "size": len(entry.body),
        "chunks": len(entry.chunks),
        "tokens": {"input": tokens_in, "output": tokens_out},
        "preview": meta.get("preview", ""),
        "layers": stored.layers,
    }


def counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda item: (-item[1], item[0])))


def statistics(stored: list[Stored], now: float) -> dict[str, Any]:
    entries = [s.entry for s in stored]
    ages = [e.age(now) for e in entries]
    usage = [e.tokens() for e in entries]
    return {
        "entries": len(entries),
        "bytes": sum(len(e.body) for e in entries),
        "formats": counts(e.format for e in entries),
        "protocols": counts(e.meta.get("protocol") or "-" for e in entries),
        "models": counts(e.meta.get("model") or "-" for e in entries),
        "oldest_age": round(max(ages), 3) if ages else None,
        "newest_age": round(min(ages), 3) if ages else None,
        "tokens": {"input": sum(i for i, _ in usage), "output": sum(o for _, o in usage)},
    }


# Commands


def selected(args: argparse.Namespace, cache: Cache, now: float) -> list[Stored]:
    """The entries passing the filter options, newest first."""

    def wanted(entry: Entry) -> bool:
        age = entry.age(now)
        model = str(entry.meta.get("model", "")).lower()
        return (
            (args.model is None or fnmatch.fnmatchcase(model, args.model.lower()))
            and (args.protocol is None or entry.meta.get("protocol") == args.protocol)
            and (args.format is None or entry.format == args.format)
            and (args.older_than is None or age > args.older_than)
            and (args.newer_than is None or age < args.newer_than)
        )

    return sorted((s for s in cache.entries() if wanted(s.entry)), key=lambda s: -s.entry.created_at)


def cmd_stats(args: argparse.Namespace, cache: Cache) -> int:
    stats = statistics(selected(args, cache, now := time.time()), now)
    if (semantic := cache.semantic_counts()) is not None:
        stats["semantic"] = {"questions": semantic[0], "hits": semantic[1]}
    if args.json:
        print(pretty_json(stats))
        return 0

    def tally(name: str) -> str:
        return ", ".join(f"{value} {n}" for value, n in stats[name].items()) or "-"

    ages = "-"
    if stats["entries"]:
        ages = f"newest {human_age(stats['newest_age'])}, oldest {human_age(stats['oldest_age'])}"
    lines = [
        ["cache", cache.where],
        ["entries", f"{stats['entries']} ({human_size(stats['bytes'])})"],
        ["formats", tally("formats")],
        ["protocols", tally("protocols")],
        ["models", tally("models")],
        ["age", ages],
        ["tokens", f"{stats['tokens']['input']} input, {stats['tokens']['output']} output"],
    ]
    if semantic is not None:
        lines.append(["semantic", f"{plural(semantic[0], 'question')} stored, {plural(semantic[1], 'hit')}"])
    print("\n".join(table(lines)))
    return 0


def cmd_ls(args: argparse.Namespace, cache: Cache) -> int:
    stored = selected(args, cache, now := time.time())
    if args.json:
        print(pretty_json([listing(s, now) for s in stored]))
        return 0
    rows = [
        [
            s.entry.key[:12],
            human_age(s.entry.age(now)),
            s.entry.format,
            s.entry.meta.get("protocol") or "-",
            s.entry.meta.get("model") or "-",
            human_size(len(s.entry.body)),
            s.entry.meta.get("preview", ""),
        ]
        for s in stored
    ]
    for line in table(rows):
        print(line)
    return 0


def request_line(request: dict[str, Any]) -> str:
    query = [tuple(pair) for pair in request.get("query") or []]  # urlencode wants tuples
    url = f"{request.get('scheme', 'https')}://{request.get('host', '')}{request.get('path', '')}"
    return f"{request.get('method', 'POST')} {url}{'?' + urlencode(query) if query else ''}"


def cmd_show(args: argparse.Namespace, cache: Cache) -> int:
    stored = cache.find(args.key)
    entry, meta = stored.entry, stored.entry.meta
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(entry.body)
        sys.stdout.buffer.flush()
        return 0
    created = datetime.fromtimestamp(entry.created_at, UTC).isoformat(timespec="seconds")
    shape = entry.format
    if entry.chunks and entry.format != "json":
        shape += f", {len(entry.chunks)} chunks over {entry.chunks[-1][0]:.3f}s"
    request = meta.get("request") or {}
    tokens_in, tokens_out = entry.tokens()
    fields = [
        ["key", entry.key],
        ["format", shape],
        ["status", str(entry.status)],
        ["protocol", meta.get("protocol") or "-"],
        ["model", meta.get("model") or "-"],
        ["created", f"{created} ({human_age(entry.age())} ago)"],
        ["size", human_size(len(entry.body))],
        ["tokens", f"{tokens_in} input, {tokens_out} output"],
        ["layers", ", ".join(stored.layers)],
        ["request", request_line(request) if request else "-"],
        ["preview", meta.get("preview") or "-"],
        *(["header", f"{name}: {value}"] for name, value in entry.headers),
    ]
    print("\n".join(table(fields)))
    if "body" in request:
        print(f"\nrequest body:\n{pretty_json(request['body'])}")
    elif "body_preview" in request:  # a large body: its start and its hash were kept
        print(
            f"\nrequest body ({request.get('body_size')} bytes, sha256 {request.get('body_sha256')}), "
            f"beginning:\n{request['body_preview']}"
        )
    print(f"\nresponse body:\n{readable_body(entry)}")
    return 0


def cmd_export(args: argparse.Namespace, cache: Cache) -> int:
    paths = export_dir([s.entry for s in selected(args, cache, time.time())], args.target)
    print(f"exported {entry_count(len(paths))} to {args.target}")
    return 0


def cmd_import(args: argparse.Namespace, cache: Cache) -> int:
    if not args.source.is_dir():
        raise CLIError(f"{args.source} is not a directory")
    found, errors = import_dir(args.source)
    if not found and not errors:
        raise CLIError(f"no fixture files (*.json) in {args.source}: nothing imported")
    for path, reason in errors:
        print(f"ai-cache: {path}: {reason}", file=sys.stderr)
    cache.put(found)
    skipped = f"; skipped {plural(len(errors), 'bad file')}" if errors else ""
    print(f"imported {entry_count(len(found))} into {cache.where}{skipped}")
    return 1 if errors else 0


def cmd_purge(args: argparse.Namespace, cache: Cache) -> int:
    doomed = [s.entry.key for s in selected(args, cache, time.time())]
    cache.delete(doomed)
    print(f"purged {entry_count(len(doomed))} from {cache.where}")
    return 0


def cmd_delete(args: argparse.Namespace, cache: Cache) -> int:
    stored = cache.find(args.key)
    cache.delete([stored.entry.key])
    print(f"deleted {stored.entry.key[:12]} from {', '.join(stored.layers)}")
    return 0


def confirmed(args: argparse.Namespace, what: str) -> bool:
    """--yes, or a person at a terminal answering y; without a terminal, a usage error."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CLIError(f"refusing to delete {what} without --yes (no terminal to ask)", status=2)
    try:
        answer = input(f"Delete {what}? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing deleted")
    return False


def cmd_clear(args: argparse.Namespace, cache: Cache) -> int:
    keys = cache.keys()
    if not confirmed(args, f"all {entry_count(len(keys))} in {cache.where}"):
        return 1
    cache.delete(keys)
    cache.clear_questions()
    print(f"deleted {entry_count(len(keys))} from {cache.where}")
    return 0


def cmd_prune_unused(args: argparse.Namespace) -> int:
    """Delete the fixture files the last run (the pytest plugin, with-ai-cache) did not use."""
    if not args.directory.is_dir():
        raise CLIError(f"{args.directory} is not a directory")
    if not (args.directory / UNUSED_LIST).is_file():
        raise CLIError(f"no {UNUSED_LIST} in {args.directory}: run the tests with these fixtures first")
    names = read_unused(args.directory)
    for name in names:
        print(f"{'would delete' if args.dry_run else 'unused'}: {args.directory / name}")
    if not names:
        print(f"no unused fixture file in {args.directory}")
        return 0
    what = f"{plural(len(names), 'unused fixture file')} in {args.directory}"
    if args.dry_run or not confirmed(args, what):
        return 0 if args.dry_run else 1
    for name in names:
        (args.directory / name).unlink(missing_ok=True)
    (args.directory / UNUSED_LIST).unlink()
    print(f"deleted {what}")
    return 0


# Arguments


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_filters(parser: argparse.ArgumentParser, need_age: bool = False) -> None:
    group = parser.add_argument_group("filters")
    group.add_argument("--model", metavar="GLOB", help="only this model; a glob like 'gpt-4o*' works")
    group.add_argument(
        "--protocol",
        choices=sorted(BY_NAME),
        metavar="NAME",
        help=f"only this protocol family: {', '.join(sorted(BY_NAME))}",
    )
    group.add_argument("--format", choices=FORMATS, help="only this body format")
    group.add_argument(
        "--older-than",
        type=duration,
        metavar="DURATION",
        required=need_age,
        help="only entries recorded longer ago than this (90s, 30m, 12h, 7d)",
    )
    group.add_argument(
        "--newer-than", type=duration, metavar="DURATION", help="only entries recorded more recently than this"
    )


def add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Given before the command or after it: a command's copy defaults to SUPPRESS so
    that, when not given there, it leaves the value given before the command alone."""

    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    directory, prefix = option_default("ai_cache_dir"), option_default("ai_cache_redis_prefix")
    parser.add_argument(
        "--dir",
        default=default(directory),
        metavar="DIR",
        help=f"the L1 cache directory, as the addon's ai_cache_dir (default: {directory})",
    )
    parser.add_argument(
        "--redis-url",
        default=default(""),
        metavar="URL",
        help="also act on this Redis L2 (redis://host:6379/0, rediss://, unix://, redis+cluster://)",
    )
    parser.add_argument(
        "--redis-prefix",
        default=default(prefix),
        metavar="PREFIX",
        help=f"prefix of the cache's Redis keys (default: {prefix})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ai-cache",
        description="Inspect, export, import and prune the cache recorded by the ai-cache mitmproxy addon.",
    )
    add_global_options(parser, defaults=True)
    parser.set_defaults(create=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace, Cache], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_global_options(sub, defaults=False)
        sub.set_defaults(run=run)
        return sub

    sub = command("stats", cmd_stats, "Count entries, bytes and tokens by protocol, model and format.")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    add_filters(sub)
    sub = command("ls", cmd_ls, "List entries, newest first: key, age, format, protocol, model, size, prompt.")
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    add_filters(sub)
    sub = command("show", cmd_show, "Print one entry's metadata, request and answer.")
    sub.add_argument("key", help="the entry's key or a unique prefix of it")
    sub.add_argument("--raw", action="store_true", help="print only the exact answer bytes")
    sub = command("export", cmd_export, "Write entries as reviewable JSON fixture files, one per entry.")
    sub.add_argument("target", type=Path, metavar="DIR", help="directory for the files (created)")
    add_filters(sub)
    sub = command("import", cmd_import, "Store the fixture files of a directory; bad files are reported and skipped.")
    sub.add_argument("source", type=Path, metavar="DIR", help="directory of *.json fixture files")
    sub.set_defaults(create=True)
    sub = command("purge", cmd_purge, "Delete the entries older than a duration.")
    add_filters(sub, need_age=True)
    sub = command("delete", cmd_delete, "Delete one entry.")
    sub.add_argument("key", help="the entry's key or a unique prefix of it")
    sub = command("clear", cmd_clear, "Delete every entry.")
    sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    text = (
        "Delete the fixture files the last test run did not use, as listed in DIR/"
        f"{UNUSED_LIST} by the pytest plugin or with-ai-cache --fixtures."
    )
    sub = commands.add_parser("prune-unused", help=text, description=text)
    sub.add_argument("directory", type=Path, metavar="DIR", help="the fixture directory")
    sub.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    sub.add_argument("--dry-run", "-n", action="store_true", help="only list the files that would be deleted")
    text = 'Print the path of the addon file for mitmproxy: mitmdump -s "$(ai-cache addon-path)".'
    commands.add_parser("addon-path", help=text, description=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has reported: 2
        return int(e.code or 0)
    if args.command == "addon-path":
        print(ADDON_PATH)
        return 0
    logging.basicConfig(format="%(message)s")  # the stores' warnings, already `ai-cache: `-prefixed
    try:
        if args.command == "prune-unused":  # fixture files only: no cache to open
            return cmd_prune_unused(args)
        cache = Cache(Path(args.dir).expanduser(), args.redis_url, args.redis_prefix, args.create)
        try:
            return args.run(args, cache)
        finally:
            cache.close()
    except CLIError as e:
        print(f"ai-cache: {e}", file=sys.stderr)
        return e.status
    except BrokenPipeError:
        # `ai-cache ls | head`: the reader left early, which is not a failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
