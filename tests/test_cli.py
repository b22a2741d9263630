"""The `ai-cache` command on a real diskcache (and a real Redis), called as `main([...])`."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from ai_cache.cli import main
from ai_cache.disk import DiskStore
from ai_cache.entry import Entry
from ai_cache.fixture_store import write_unused
from ai_cache.semantic.vectors import LocalVectors
from helpers import JSON_BODY, NDJSON_CHUNKS, SSE_CHUNKS, deep, fill, key_of, sample_entries, stored

SECRETS = ("SECRET-COOKIE", "sk-SECRET-KEY", "Bearer sk-SECRET-AUTH", "SECRET-QUERY")


def test_installed_console_script_help():
    script = Path(sys.executable).parent / "ai-cache"
    for args in ([], ["export"], ["clear"]):
        done = subprocess.run([script, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: ai-cache")
    assert "--redis-url" in done.stdout and "--yes" in done.stdout


def test_stats(cli, cache_dir):
    code, out, _ = cli("--dir", cache_dir, "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["entries"] == 3
    assert stats["bytes"] == len(JSON_BODY) + sum(map(len, SSE_CHUNKS)) + sum(map(len, NDJSON_CHUNKS))
    assert stats["formats"] == {"json": 1, "ndjson": 1, "sse": 1}
    assert stats["protocols"] == {"anthropic-messages": 1, "ollama": 1, "openai-chat": 1}
    assert stats["models"] == {"claude-sonnet-4": 1, "gpt-4o": 1, "llama3.2": 1}
    assert stats["tokens"] == {"input": 33, "output": 16}
    assert 5 * 86400 <= stats["oldest_age"] < 5 * 86400 + 60
    assert 10 <= stats["newest_age"] < 70

    code, out, _ = cli("stats", "--dir", cache_dir, "--format", "sse")
    assert code == 0
    assert "entries    1 (" in out
    assert "tokens     20 input, 7 output\n" in out  # the sse entry's tokens only, not all 33


def test_ls_newest_first_and_filters(cli, cache_dir):
    code, out, _ = cli("--dir", cache_dir, "ls")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert [line.split()[:3] for line in lines] == [
        [key_of("json")[:12], lines[0].split()[1], "json"],
        [key_of("sse")[:12], "3h", "sse"],
        [key_of("ndjson")[:12], "5d", "ndjson"],
    ]
    assert re.fullmatch(r"\d+s", lines[0].split()[1])  # seconds old
    assert "openai-chat" in lines[0] and "gpt-4o" in lines[0] and lines[0].endswith("hello json")

    def keys(*filters: str) -> list[str]:
        code, out, _ = cli("--dir", cache_dir, "ls", "--json", *filters)
        assert code == 0
        return [row["key"] for row in json.loads(out)]

    assert keys() == [key_of("json"), key_of("sse"), key_of("ndjson")]
    assert keys("--model", "claude*") == [key_of("sse")]
    assert keys("--protocol", "ollama") == [key_of("ndjson")]
    assert keys("--format", "json") == [key_of("json")]
    assert keys("--older-than", "1h") == [key_of("sse"), key_of("ndjson")]
    assert keys("--newer-than", "1d") == [key_of("json"), key_of("sse")]
    assert keys("--older-than", "1h", "--newer-than", "1d") == [key_of("sse")]
    assert cli("--dir", cache_dir, "ls", "--older-than", "soon")[0] == 2


def test_show_by_prefix(cli, cache_dir):
    code, out, _ = cli("--dir", cache_dir, "show", key_of("sse")[:6])
    assert code == 0
    assert key_of("sse") in out and "claude-sonnet-4" in out and "4 chunks over 0.750s" in out
    assert "POST https://api.anthropic.com/v1/messages" in out
    assert "response body:\n" + b"".join(SSE_CHUNKS).decode(errors="replace") in out

    code, out, _ = cli("--dir", cache_dir, "show", key_of("json")[:8])
    assert code == 0 and '"content": "hello"' in out  # pretty-printed


def test_show_raw_prints_the_exact_bytes(cache_dir, capsysbinary):
    assert main(["--dir", str(cache_dir), "show", "--raw", key_of("sse")[:8]]) == 0
    assert capsysbinary.readouterr().out == b"".join(SSE_CHUNKS)


def test_show_ambiguous_and_unknown_keys(cli, tmp_path):
    entry = sample_entries()[0]
    twins = [Entry(**{**vars(entry), "key": "ab" + digit * 62}) for digit in "01"]
    cache_dir = fill(tmp_path / "cache", twins)

    code, out, err = cli("--dir", cache_dir, "show", "ab")
    assert code == 1 and out == ""
    assert err.startswith("ai-cache: key prefix 'ab' is ambiguous: 2 entries match")
    assert cli("--dir", cache_dir, "show", "ab1")[0] == 0

    code, _, err = cli("--dir", cache_dir, "show", "ffff")
    assert code == 1 and err.startswith("ai-cache: no entry with a key starting 'ffff'")
    assert cli("--dir", cache_dir, "delete", "ffff")[0] == 1


def test_missing_cache_directory(cli, tmp_path):
    code, _, err = cli("--dir", tmp_path / "nowhere", "ls")
    assert code == 1 and "no cache in" in err
    assert not (tmp_path / "nowhere").exists()


def test_export_is_deterministic_and_import_round_trips(cli, cache_dir, tmp_path):
    first, again, copy_dir, second = (tmp_path / n for n in ("first", "again", "copy", "second"))
    assert cli("--dir", cache_dir, "export", first) == (0, f"exported 3 entries to {first}\n", "")
    cli("--dir", cache_dir, "export", again)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(
        [
            f"openai-chat-gpt-4o-{key_of('json')[:16]}.json",
            f"anthropic-messages-claude-sonnet-4-{key_of('sse')[:16]}.json",
            f"ollama-llama3.2-{key_of('ndjson')[:16]}.json",
        ]
    )
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in names)

    assert cli("--dir", copy_dir, "import", first) == (0, f"imported 3 entries into {copy_dir}\n", "")
    originals, copies = stored(cache_dir), stored(copy_dir)
    assert copies.keys() == originals.keys()
    for key, original in originals.items():
        copy = copies[key]
        assert (copy.body, copy.chunks, copy.created_at, copy.format, copy.status) == (
            original.body,
            original.chunks,
            original.created_at,
            original.format,
            original.status,
        )

    cli("--dir", copy_dir, "export", second)
    assert sorted(p.name for p in second.iterdir()) == names
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_stream_chunks_read_as_text_unless_split_mid_character(cli, cache_dir, tmp_path):
    cli("--dir", cache_dir, "export", tmp_path / "out", "--format", "sse")
    (path,) = (tmp_path / "out").iterdir()
    body = json.loads(path.read_text(encoding="utf-8"))["body"]
    assert [sorted(chunk)[1] for chunk in body] == ["text", "text", "base64", "base64"]
    assert body[1] == {"at": 0.25, "text": SSE_CHUNKS[1].decode()}
    assert "héllo ✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False: readable as is


def test_bad_fixture_files_are_reported_and_skipped(cli, cache_dir, tmp_path):
    fixtures = tmp_path / "fixtures"
    cli("--dir", cache_dir, "export", fixtures)
    json_file = next(fixtures.glob("openai-chat-*.json"))
    document = json.loads(json_file.read_text())
    (fixtures / "broken.json").write_text('{"ai_cache_fixture": 1, "key": ')
    del document["status"]
    (fixtures / "no-status.json").write_text(json.dumps({**document, "key": key_of("a")}))
    document["status"] = 200
    document["chunks"] = [[0.0, 3], [0.1, 4]]
    (fixtures / "bad-chunks.json").write_text(json.dumps({**document, "key": key_of("b")}))

    copy_dir = tmp_path / "copy"
    code, out, err = cli("--dir", copy_dir, "import", fixtures)
    assert code == 1
    assert out == f"imported 3 entries into {copy_dir}; skipped 3 bad files\n"
    errors = dict(line.split(": ", 2)[1:] for line in err.splitlines())
    assert errors.keys() == {str(fixtures / n) for n in ("broken.json", "no-status.json", "bad-chunks.json")}
    assert errors[str(fixtures / "broken.json")].startswith("not valid JSON")
    assert errors[str(fixtures / "no-status.json")] == "missing field 'status'"
    assert errors[str(fixtures / "bad-chunks.json")].startswith("chunk lengths add up to 7, the body has")
    assert stored(copy_dir).keys() == stored(cache_dir).keys()


def test_json_answers_have_one_body_and_version_1_files_still_import(cli, cache_dir, tmp_path):
    fixtures = tmp_path / "fixtures"
    cli("--dir", cache_dir, "export", fixtures, "--format", "json")
    (path,) = fixtures.iterdir()
    document = json.loads(path.read_text())
    # No serialisation gives back JSON_BODY's mixed spacing: its exact text alone, not twice.
    assert document["body_text"] == JSON_BODY.decode() and "body" not in document

    # A version 1 file carried both, which must agree.
    version_1 = {**document, "ai_cache_fixture": 1, "body": {**json.loads(JSON_BODY), "id": "edited"}}
    path.write_text(json.dumps(version_1))
    code, _, err = cli("--dir", tmp_path / "copy", "import", fixtures)
    assert code == 1 and "'body' and 'body_text' disagree" in err

    del version_1["body_text"], version_1["chunks"]  # hand-written style: the parsed body alone
    path.write_text(json.dumps(version_1))
    assert cli("--dir", tmp_path / "copy", "import", fixtures)[0] == 0
    (entry,) = stored(tmp_path / "copy").values()
    assert json.loads(entry.body)["id"] == "edited"


def test_credentials_never_reach_fixture_files(cli, cache_dir, tmp_path):
    cli("--dir", cache_dir, "export", tmp_path / "out")
    text = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir())
    assert "x-request-id" in text and "openai-beta" in text and '"alt"' in text  # the rest stays
    for secret in SECRETS:
        assert secret not in text
    for name in ("set-cookie", "x-api-key", "authorization"):
        assert name not in text.lower()


def test_purge_removes_only_old_entries(cli, cache_dir):
    code, out, _ = cli("--dir", cache_dir, "purge", "--older-than", "1h")
    assert (code, out) == (0, f"purged 2 entries from {cache_dir}\n")
    assert stored(cache_dir).keys() == {key_of("json")}
    assert cli("--dir", cache_dir, "purge")[0] == 2  # --older-than is required


def test_counts_of_one_are_singular(cli, cache_dir, tmp_path):
    fixtures, copy_dir = tmp_path / "fixtures", tmp_path / "copy"
    assert cli("--dir", cache_dir, "export", fixtures, "--format", "json") == (
        0,
        f"exported 1 entry to {fixtures}\n",
        "",
    )
    (fixtures / "broken.json").write_text("{")
    code, out, _ = cli("--dir", copy_dir, "import", fixtures)
    assert (code, out) == (1, f"imported 1 entry into {copy_dir}; skipped 1 bad file\n")
    assert cli("--dir", copy_dir, "purge", "--older-than", "1s") == (0, f"purged 1 entry from {copy_dir}\n", "")
    assert cli("--dir", copy_dir, "clear", "--yes") == (0, f"deleted 0 entries from {copy_dir}\n", "")


def test_import_of_a_directory_without_fixture_files_fails(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a fixture")
    code, out, err = cli("--dir", tmp_path / "copy", "import", empty)
    assert (code, out) == (1, "")
    assert err == f"ai-cache: no fixture files (*.json) in {empty}: nothing imported\n"


def test_delete_by_prefix(cli, cache_dir):
    code, out, _ = cli("--dir", cache_dir, "delete", key_of("sse")[:5])
    assert code == 0 and out == f"deleted {key_of('sse')[:12]} from l1\n"
    assert stored(cache_dir).keys() == {key_of("json"), key_of("ndjson")}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_clear_asks_on_a_terminal_and_refuses_without_one(cli, cache_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    code, _, err = cli("--dir", cache_dir, "clear")
    assert code == 2 and "refusing to delete all 3 entries" in err and "--yes" in err
    assert len(stored(cache_dir)) == 3

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, out, _ = cli("--dir", cache_dir, "clear")
    assert code == 1 and f"Delete all 3 entries in {cache_dir}? [y/N]" in out
    assert len(stored(cache_dir)) == 3

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    assert cli("--dir", cache_dir, "clear")[0] == 0
    assert stored(cache_dir) == {}


def test_clear_with_yes(cli, cache_dir):
    assert cli("--dir", cache_dir, "clear", "--yes") == (0, f"deleted 3 entries from {cache_dir}\n", "")
    assert stored(cache_dir) == {}


def test_clear_drops_every_semantic_question_even_of_entries_gone_by_themselves(cli, cache_dir):
    index = LocalVectors(cache_dir)
    vector = np.ones(4, dtype=np.float32) / 2
    index.add_sync(sample_entries()[0].key, "p", "a question kept with its entry", 1.0, vector)
    index.add_sync("e" * 64, "p", "a question whose entry expired", 1.0, vector)
    index.count_hit_sync()
    index.close()
    assert cli("--dir", cache_dir, "clear", "--yes")[0] == 0
    code, out, _ = cli("--dir", cache_dir, "stats", "--json")
    assert code == 0 and json.loads(out)["semantic"] == {"questions": 0, "hits": 1}


def test_prune_unused_deletes_what_the_last_run_listed_once_confirmed(cli, cache_dir, tmp_path, monkeypatch):
    fixtures = tmp_path / "fixtures"
    cli("--dir", cache_dir, "export", fixtures)
    code, _, err = cli("prune-unused", fixtures)
    assert code == 1 and "no .ai-cache-unused in" in err and "run the tests with these fixtures first" in err
    names = sorted(p.name for p in fixtures.iterdir())
    unused = write_unused(fixtures, {names[0]})
    assert unused == names[1:]

    code, out, _ = cli("prune-unused", fixtures, "--dry-run")
    assert (code, out) == (0, "".join(f"would delete: {fixtures / n}\n" for n in unused))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = cli("prune-unused", fixtures)
    assert code == 2 and f"refusing to delete 2 unused fixture files in {fixtures} without --yes" in err
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    assert cli("prune-unused", fixtures)[0] == 1
    assert sorted(p.name for p in fixtures.glob("*.json")) == names

    code, out, _ = cli("prune-unused", fixtures, "--yes")
    assert code == 0 and out.endswith(f"deleted 2 unused fixture files in {fixtures}\n")
    assert [p.name for p in fixtures.iterdir()] == names[:1]  # the list went with them


def test_redis_layer(cli, cache_dir, tmp_path, start_redis):
    redis = start_redis()
    l2 = ["--redis-url", redis.url, "--redis-prefix", "t:"]
    cli("--dir", cache_dir, "export", tmp_path / "fixtures")
    assert cli("--dir", tmp_path / "copy", *l2, "import", tmp_path / "fixtures")[0] == 0

    only_l2 = ["--dir", tmp_path / "nowhere", *l2]
    code, out, _ = cli(*only_l2, "ls", "--json")
    assert code == 0
    assert [(row["key"], row["layers"]) for row in json.loads(out)] == [
        (key_of("json"), ["l2"]),
        (key_of("sse"), ["l2"]),
        (key_of("ndjson"), ["l2"]),
    ]
    code, out, _ = cli(*only_l2, "show", "--raw", key_of("ndjson")[:8])
    assert out == b"".join(NDJSON_CHUNKS).decode()

    assert cli("--dir", tmp_path / "copy", *l2, "delete", key_of("sse")[:8])[1].endswith("from l1, l2\n")
    assert json.loads(cli(*only_l2, "stats", "--json")[1])["entries"] == 2
    assert cli("--dir", tmp_path / "copy", *l2, "clear", "--yes")[0] == 0
    assert json.loads(cli(*only_l2, "stats", "--json")[1])["entries"] == 0

    redis.stop()
    code, _, err = cli(*only_l2, "ls")
    assert code == 1 and "ai-cache: Redis at" in err


# `ai-cache delete` (and purge/clear) ignore L1 delete failures: "deleted ..." and exit 0.
#    (A locked database, disk I/O error, read-only filesystem: DiskStore swallows it.)
def test_cli_delete_fails_loudly_when_the_store_cannot_delete(tmp_path, monkeypatch, capsys):
    import diskcache

    from ai_cache import cli
    from ai_cache.entry import Entry

    directory = tmp_path / "cache"
    store = DiskStore(directory)
    key = "ab" * 32
    assert store.put_sync(Entry(key, "json", b"{}", []), None)
    store.close_sync()

    def locked(self, *args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(diskcache.Cache, "delete", locked)
    status = cli.main(["--dir", str(directory), "delete", key[:8]])
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert DiskStore(directory).get_sync(key) is not None  # the entry is still there
    assert status != 0, f"exit 0 with: {out.strip()}"


def test_export_survives_an_entry_that_cannot_be_exported(cli, tmp_path, caplog):
    bad = replace(sample_entries()[0], key=key_of("deep"), meta={"request": {"body": json.loads(deep(500))}})
    cache_dir = fill(tmp_path / "cache", [*sample_entries(), bad])
    code, out, _ = cli("--dir", cache_dir, "export", tmp_path / "out")
    assert code == 0 and len(list((tmp_path / "out").iterdir())) == 3
    assert f"discarding unreadable L1 entry {key_of('deep')[:12]}: meta nested deeper" in caplog.text
