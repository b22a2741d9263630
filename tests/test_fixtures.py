"""ai_cache.fixtures through the `ai-cache` command: import checks every file like input,
export never writes through a symlink."""

from __future__ import annotations

import json
import math

from helpers import deep, key_of, stored

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
    assert all(json.loads(p.read_text())["ai_cache_fixture"] == 1 for p in out.iterdir())
