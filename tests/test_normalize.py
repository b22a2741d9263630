"""ai_cache.normalize: each rule, stable placeholders, a fixed order, escapes, errors."""

from __future__ import annotations

import json
import uuid

import pytest

from ai_cache.keys import KeyPolicy, cacheable_request, header_map
from ai_cache.nearest import compare
from ai_cache.normalize import compile_rules, split_rules
from ai_cache.protocols import recognise
from helpers import chat_flow

RULE_CASES = [
    ("datetime", "at 2026-11-27T21:08:33Z.", "at <datetime>."),
    ("datetime", "2026-11-27 21:08:33.123+01:00", "<datetime>"),
    ("datetime", "2026-11-27T21:08:33.123456", "<datetime>"),
    ("datetime", "now: Fri Nov 27 21:08:33 UTC 2026", "now: <datetime>"),
    ("datetime", "Fri Nov 27 21:08:33 2026", "<datetime>"),
    ("datetime", "Date: Fri, 27 Nov 2026 21:08:33 +0000", "Date: <datetime>"),
    ("date", "due 2026-11-27, 27/11/2026 or 11/27/2026", "due <date>, <date> or <date>"),
    ("date", "November 27, 2026 and 27 Nov 2026 and 3rd December 2026", "<date> and <date> and <date>"),
    ("date", "version 1.2.3, 3.14, year 2026, 10/2026", "version 1.2.3, 3.14, year 2026, 10/2026"),
    ("time", "at 21:08:33 or 21:08 or 21:08:33.5", "at <time> or <time> or <time>"),
    ("time", "9:05 pm, not 25:99 or 1:2:3:4", "<time>, not 25:99 or 1:2:3:4"),
    ("uuid", "run 123e4567-E89B-12d3-a456-426614174000.", "run <uuid>."),
    ("uuid", "x123e4567-e89b-12d3-a456-426614174000", "x123e4567-e89b-12d3-a456-426614174000"),
    ("hexid", "commit 9fceb02d0ae598e95dc970b74767f19372d61af8", "commit <hexid>"),
    ("hexid", "req_0123456789abcdef0123 id=ABCDEF0123456789", "req_<hexid> id=<hexid>"),
    ("hexid", "short 0123456789abcde, word g0123456789abcdef01", "short 0123456789abcde, word g0123456789abcdef01"),
    ("hexid", "letters only: deadbeefdeadbeefdeadbeef", "letters only: deadbeefdeadbeefdeadbeef"),
    ("tmpdir", "wrote /tmp/pytest-of-ci/pytest-7/test_a0/out.txt ok", "wrote <tmpdir> ok"),
    ("tmpdir", 'open "/var/folders/x1/abc/T/tmpq9" and /private/tmp/z', 'open "<tmpdir>" and <tmpdir>'),
    ("tmpdir", r"in C:\Users\ann\AppData\Local\Temp\tmp1a2b\f.py now", "in <tmpdir> now"),
    ("tmpdir", "keep /home/ann/tmp/x and /usr/lib/tmp/y", "keep /home/ann/tmp/x and /usr/lib/tmp/y"),
    (r"re:run-\d+", "run-42 and run-7", "<re> and <re>"),
]


@pytest.mark.parametrize("rules,text,expected", RULE_CASES)
def test_each_rule(rules, text, expected):
    assert compile_rules(rules).text(text) == expected


def test_placeholders_are_stable_across_values():
    normalize = compile_rules("datetime,uuid,hexid,tmpdir")
    monday = f"at 2026-11-23T08:00:00Z run {uuid.uuid4()} req {'a1' * 10} in /tmp/pytest-of-a/pytest-1/t0"
    tuesday = f"at 2026-11-24T17:45:12.5+02:00 run {uuid.uuid4()} req {'b2' * 12} in /tmp/pytest-of-b/pytest-9/t3"
    assert normalize.text(monday) == normalize.text(tuesday) == "at <datetime> run <uuid> req <hexid> in <tmpdir>"


def test_order_given_does_not_matter():
    text = "2026-11-27T21:08:33Z, 2026-11-27, 21:08"
    one, other = compile_rules("datetime,date,time"), compile_rules("time, date,DATETIME,date")
    assert one == other and one.rules == ("datetime", "date", "time")
    assert one.text(text) == other.text(text) == "<datetime>, <date>, <time>"


def test_pattern_rules_follow_the_built_ins_in_the_order_given():
    normalize = compile_rules(r"re:<date> \d+,date,re:\d+")
    assert normalize.rules == ("date", r"re:<date> \d+", r"re:\d+")
    assert normalize.text("2026-11-27 7 and 8") == "<re> and <re>"


def test_a_comma_in_a_pattern_is_escaped():
    assert split_rules(r"uuid, re:\d{1\,3}x ,re:a\\,date") == ["uuid", r"re:\d{1,3}x", r"re:a\\", "date"]
    assert compile_rules(r"re:v\d{1\,2}\b").text("v1 v12 v123") == "<re> <re> v123"


@pytest.mark.parametrize(
    "text,error",
    [
        ("datetime,uid", "unknown rule 'uid' (rules: tmpdir, datetime, date, time, uuid, hexid, re:PATTERN)"),
        ("re:(a", "bad pattern '(a': missing ), unterminated subpattern"),
        ("re:x*", "bad pattern 'x*': it matches the empty string"),
    ],
)
def test_bad_rules_are_named(text, error):
    with pytest.raises(ValueError) as raised:
        compile_rules(text)
    assert str(raised.value).startswith(error)


def test_strings_only_keys_untouched():
    value = {"2026-11-27": ["at 21:08", 2026, None, {"t": "21:09:00"}], "n": 12.5}
    assert compile_rules("date,time")(value) == {"2026-11-27": ["at <time>", 2026, None, {"t": "<time>"}], "n": 12.5}
    assert not compile_rules(" , ") and compile_rules("") == compile_rules(",")


def key(body: dict, rules: str = "") -> tuple[str, dict]:
    flow = chat_flow(body)
    found = cacheable_request(
        flow.request,
        header_map(flow.request),
        recognise("POST", flow.request.path),
        KeyPolicy(normalize=compile_rules(rules)),
    )
    assert found is not None
    return found.key, found.described["body"]


def test_the_key_sees_normalised_text_and_the_stored_copy_the_original():
    first = {"model": "m", "messages": [{"role": "user", "content": f"today is 2026-11-27, run {uuid.uuid4()}"}]}
    second = {"model": "m", "messages": [{"role": "user", "content": f"today is 2026-11-28, run {uuid.uuid4()}"}]}
    assert key(first, "date,uuid")[0] == key(second, "date,uuid")[0]
    assert key(first)[0] != key(second)[0] and key(first)[0] != key(first, "date,uuid")[0]
    assert key(first, "date,uuid")[1] == first  # the request copy stays as sent


def test_a_megabyte_prompt_is_normalised_whole():
    line = "Step 12 of the plan: compare the results with the notes from the last meeting.\n"
    volatile = f"at 2026-11-27T21:08:33Z run {uuid.uuid4()} in /tmp/pytest-of-ci/pytest-3/x\n"
    prompt = (line * 12 + volatile) * (1_000_000 // (len(line) * 12 + len(volatile)))
    normalize = compile_rules("datetime,date,time,uuid,hexid,tmpdir")
    result = normalize({"messages": [{"role": "user", "content": prompt}]})
    assert "2026" not in json.dumps(result) and result["messages"][0]["content"].count("<datetime>") > 900


def test_a_replay_miss_explanation_ignores_normalised_text():
    def described(content: str) -> dict:
        return {"body": {"model": "m", "messages": [{"role": "user", "content": content}]}}

    wanted, recorded = described("at 2026-11-24T09:00:00Z: hi"), described("at 2026-11-23T08:00:00Z: hello")
    assert compare(wanted, recorded, KeyPolicy()) == ("messages[0].content", 1)
    assert compare(wanted, recorded, KeyPolicy(normalize=compile_rules("datetime"))) == ("messages[0].content", 1)
    same = described("at 2026-11-23T07:00:00Z: hi")
    assert compare(wanted, same, KeyPolicy(normalize=compile_rules("datetime"))) == ("", 0)
    assert compare(wanted, same, KeyPolicy()) == ("messages[0].content", 1)
