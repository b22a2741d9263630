"""ai_cache.fixtures through the `ai-cache` command: import checks every file like input,
export never writes through a symlink."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ai_cache.entry import Entry
from ai_cache.fixtures import FIXTURE_VERSION, FixtureError, dumps, from_fixture
from helpers import deep, key_of, sample_entries, stored

# Import checks every file like input: a bad one is reported with its reason and
# skipped, the others are imported, and the exit status is 1.
BAD_FIXTURES = {
    "deep.json": (lambda d: deep(100_000), "not valid JSON"),
    "crlf.json": (lambda d: {**d, "headers": [["x-evil", "a\r\nset-cookie: pwned=1"]]}, "is not a legal header"),
    "name.json": (lambda d: {**d, "headers": [["bad name", "v"]]}, "is not a legal header"),
    "nul.json": (lambda d: {**d, "headers": [["x-a", "a\u0000b"]]}, "is not a legal header"),
    "204.json": (lambda d: {**d, "status": 204}, "status 204 is not 200"),
    "101.json": (lambda d: {**d, "status": 101}, "status 101 is not 200"),
    "slow.json": (lambda d: {**d, "body": [*d["body"][:-1], {**d["body"][-1], "at": 1e308}]}, "chunk times must"),
    "nan.json": (lambda d: {**d, "body": [*d["body"][:-1], {**d["body"][-1], "at": math.nan}]}, "chunk times must"),
    "surrogate.json": (lambda d: {**d, "body": [{"at": 0, "text": "\ud800"}]}, "holds a lone surrogate"),
    "created.json": (lambda d: {**d, "created_at": math.inf}, "created_at inf is not a time"),
    "format.json": (lambda d: {**d, "format": "html"}, "format 'html' is not one of"),
    "usage.json": (lambda d: {**d, "meta": {**d["meta"], "usage": {"input": "9"}}}, "'usage' counts are not integers"),
}


def test_import_rejects_hostile_files_and_imports_the_rest(cli, cache_dir, tmp_path):
    fixtures = tmp_path / "fixtures"
    cli("--dir", cache_dir, "export", fixtures)
    template = json.loads(next(fixtures.glob("anthropic-*.json")).read_text())
    for name, (make, _) in BAD_FIXTURES.items():
        document = make({**template, "key": key_of(name)})
        (fixtures / name).write_text(document if isinstance(document, str) else json.dumps(document))
    framed = {
        **template,
        "key": key_of("framed"),
        "headers": [
            ["content-type", "text/event-stream"],
            ["transfer-encoding", "chunked"],
            ["content-length", "5"],
            ["connection", "keep-alive"],
            ["set-cookie", "a=b"],
            ["x-request-id", "kept"],
        ],
    }
    (fixtures / "framed.json").write_text(json.dumps(framed))

    code, out, err = cli("--dir", tmp_path / "copy", "import", fixtures)
    assert code == 1
    assert out == f"imported 4 entries into {tmp_path / 'copy'}; skipped {len(BAD_FIXTURES)} bad files\n"
    reasons = dict(line.split(": ", 2)[1:] for line in err.splitlines())
    for name, (_, reason) in BAD_FIXTURES.items():
        assert reason in reasons[str(fixtures / name)], (name, reasons[str(fixtures / name)])
    entries = stored(tmp_path / "copy")
    assert entries.keys() == {*stored(cache_dir).keys(), key_of("framed")}
    assert entries[key_of("framed")].headers == [("content-type", "text/event-stream"), ("x-request-id", "kept")]


# Export writes new files and renames them: a symlink planted under a fixture's name
# is replaced, its target left alone.
def test_export_does_not_write_through_symlinks(cli, cache_dir, tmp_path):
    out = tmp_path / "out"
    cli("--dir", cache_dir, "export", out)
    names = sorted(p.name for p in out.iterdir())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for p in out.iterdir():
        p.unlink()
        p.symlink_to(victim)
    assert cli("--dir", cache_dir, "export", out)[0] == 0
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == names
    assert not any(p.is_symlink() for p in out.iterdir())
    assert all(json.loads(p.read_text())["ai_cache_fixture"] == FIXTURE_VERSION for p in out.iterdir())


# Reviewable files: one body per JSON answer, streams with their answer text, stable timing.

ANSWER = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "Grüße ✓"}}], "n": 1.5}


def json_entry(body: bytes) -> Entry:
    return Entry(key_of(body.decode()), "json", body, [("content-type", "application/json")], chunks=[(0.0, len(body))])


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(ANSWER, indent=2).encode(),  # OpenAI's
        json.dumps(ANSWER, separators=(",", ":"), ensure_ascii=False).encode(),  # Anthropic's
        (json.dumps(ANSWER) + "\n").encode(),
        json.dumps(ANSWER, indent=2, ensure_ascii=False).encode() + b"\n",
    ],
)
def test_a_json_answer_is_one_parsed_body_that_gives_back_the_exact_bytes(body):
    document = json.loads(dumps(json_entry(body)))
    assert document["body"] == ANSWER and "body_text" not in document
    assert from_fixture(document).body == body

    document["body"]["choices"][0]["message"]["content"] = "edited"  # a reviewer's edit, in the same style
    edited = from_fixture(document).body
    assert json.loads(edited)["choices"][0]["message"]["content"] == "edited"
    assert edited == body.replace("Grüße ✓".encode(), b"edited").replace(b"Gr\\u00fc\\u00dfe \\u2713", b"edited")


def test_a_body_style_that_is_none_is_reported():
    document = json.loads(dumps(json_entry(json.dumps(ANSWER).encode())))
    with pytest.raises(FixtureError, match="body_style 'tabs' is none of"):
        from_fixture({**document, "body_style": "tabs"})


def test_streams_carry_their_answer_text_which_import_ignores(cache_dir):
    sse, ndjson = (e for e in sample_entries() if e.format != "json")
    document = json.loads(dumps(sse))
    assert document["answer"] == "héllo ✓✓"
    assert json.loads(dumps(ndjson))["answer"] == "hi"
    assert from_fixture({**document, "answer": "edited"}).body == sse.body


def test_chunk_times_are_kept_to_the_millisecond_so_jitter_does_not_churn_the_diff():
    sse = next(e for e in sample_entries() if e.format == "sse")
    jittered = dataclasses.replace(sse, chunks=[(at + 0.0001 * i, n) for i, (at, n) in enumerate(sse.chunks)])
    assert dumps(jittered) == dumps(sse)
    assert [chunk["at"] for chunk in json.loads(dumps(sse))["body"]] == [0.0, 0.25, 0.5, 0.75]
