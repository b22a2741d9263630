"""Key normalisers: volatile text in a prompt (a timestamp, a run UUID, a temp path)
replaced by a stable placeholder before the key is computed, so a recording made on
Monday replays on Tuesday. Only the key sees the result; the stored request stays as sent.

Rules are named, small patterns composed by name, like vcrpy's matchers. The built-ins
run in the fixed order of RULES, whatever order the option names them in: `tmpdir` first,
then the rules that need a digit in one combined regex pass, skipped for a string without
a digit (an alternation tries them in that order at each position, so a date-time is never
cut into a date and a time); `re:PATTERN` rules follow in the order given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

PATTERN_PREFIX = "re:"
PATTERN_PLACEHOLDER = "<re>"
# Month names in any case after a number; capitalised where they start a match, since a
# case-insensitive alternation tried at every letter of a prompt is what costs most.
_MONTHS = (
    "Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    "|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?"
)
_MONTH = rf"(?i:{_MONTHS})\.?"
_MONTH_FIRST = rf"(?:{_MONTHS})\.?"
_WEEKDAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*"
_CLOCK = r"\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?"
_ZONE = r"(?:Z|[+-]\d{2}:?\d{2}|UTC|GMT|[A-Z]{3,4}T)"
_HEX = "[0-9A-Fa-f]"
_NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"


class Rule(NamedTuple):
    pattern: str
    needs_digit: bool  # never matches a string without a digit
    # The characters a match can start with, as a regex set's contents. The engine tries
    # every position of a string; a one-character lookahead rejects most of them at once.
    first: str


# The built-in rules in precedence order: earlier ones win where matches start together.
RULES: dict[str, Rule] = {
    # A temp path up to the next whitespace or quote: /tmp/…, /var/tmp/…, macOS's
    # /var/folders/… (also under /private), Windows' …\AppData\Local\Temp\…. The lookahead
    # rejects a letter not followed by a colon before trying the alternatives.
    "tmpdir": Rule(
        r"(?=/|[A-Za-z]:)(?<![\w.~/\\])(?:(?:/private)?/(?:var/)?tmp/|(?:/private)?/var/folders/"
        r"|[A-Za-z]:[\\/]+Users[\\/]+[^\\/\s\"'`]+[\\/]+AppData[\\/]+Local[\\/]+Temp[\\/])"
        r"[^\s\"'`]*",
        False,
        "/A-Za-z",
    ),
    # ISO 8601 (T or space, fraction, zone), `date`'s output, RFC 2822 and ctime forms.
    "datetime": Rule(
        rf"(?<!\d)(?:\d{{4}}-\d{{2}}-\d{{2}}[T ]{_CLOCK}(?:\s?{_ZONE})?"
        rf"|(?:{_WEEKDAY},?\s+)?\d{{1,2}}\s+{_MONTH}\s+\d{{4}}\s+{_CLOCK}(?:\s+{_ZONE})?"
        rf"|{_WEEKDAY}\s+{_MONTH_FIRST}\s+\d{{1,2}}\s+{_CLOCK}(?:\s+{_ZONE})?\s+\d{{4}})(?!\d)",
        True,
        r"\dMTWFS",
    ),
    # 2026-11-27, 2026/11/27, 27/11/2026, 11/27/2026, 27.11.2026, November 27, 2026, 27 Nov 2026.
    "date": Rule(
        rf"(?<![\d/.-])(?:\d{{4}}[-/]\d{{1,2}}[-/]\d{{1,2}}|\d{{1,2}}[./]\d{{1,2}}[./]\d{{4}}"
        rf"|{_MONTH_FIRST}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH},?\s+\d{{4}})"
        r"(?![\d/])",
        True,
        r"\dJFMASOND",
    ),
    # 21:08:33, 21:08, 21:08:33.123, 9:05 pm.
    "time": Rule(
        r"(?<![\d:])(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d+)?)?(?:\s?[AaPp]\.?[Mm]\b\.?)?(?![\d:])",
        True,
        r"\d",
    ),
    # 8-4-4-4-12 hex digits in any case; a versioned UUID always holds a digit.
    "uuid": Rule(
        rf"{_NOT_ALNUM_BEFORE}(?=[-A-Fa-f]*\d){_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}{_NOT_ALNUM_AFTER}",
        True,
        "0-9A-Fa-f",
    ),
    # A run of 16+ hex digits holding a digit (commit hashes, request ids), not inside a word.
    "hexid": Rule(rf"{_NOT_ALNUM_BEFORE}(?=[A-Fa-f]*\d){_HEX}{{16,}}{_NOT_ALNUM_AFTER}", True, "0-9A-Fa-f"),
}
_DIGIT = re.compile(r"\d")


def split_rules(text: str) -> list[str]:
    """The option's comma-separated items, each stripped. `\\,` is a literal comma (for a
    comma inside a `re:` pattern); any other backslash is kept as written."""
    items, current = [], ""
    for piece in re.split(r"(\\.|,)", text):
        if piece == ",":
            items.append(current)
            current = ""
        else:
            current += "," if piece == "\\," else piece
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _combined(names: list[str]) -> re.Pattern[str] | None:
    """One alternation of the named built-ins, in precedence order, a group per rule, each
    behind its first-character lookahead and all behind their union (2-3 times faster)."""
    if not names:
        return None
    rules = "|".join(f"(?P<{name}>(?=[{RULES[name].first}]){RULES[name].pattern})" for name in names)
    if len(names) > 1:
        rules = f"(?=[{''.join(RULES[name].first for name in names)}])(?:{rules})"
    return re.compile(rules)


def _placeholder(match: re.Match[str]) -> str:
    return f"<{match.lastgroup}>"


@dataclass(frozen=True)
class Normalizer:
    """The rules of one `ai_cache_normalize` value, compiled; calling it returns a copy of
    a JSON value with every string leaf normalised (object keys untouched)."""

    rules: tuple[str, ...] = ()  # canonical: built-ins in precedence order, then re: rules
    _plain: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _digits: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def text(self, value: str) -> str:
        if self._plain is not None:
            value = self._plain.sub(_placeholder, value)
        if self._digits is not None and _DIGIT.search(value):
            value = self._digits.sub(_placeholder, value)
        for pattern in self._patterns:
            value = pattern.sub(PATTERN_PLACEHOLDER, value)
        return value

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


def compile_rules(text: str) -> Normalizer:
    """A Normalizer from the option's text; ValueError names an unknown rule or a bad pattern."""
    builtins: set[str] = set()
    patterns: list[str] = []
    for item in split_rules(text):
        if item.startswith(PATTERN_PREFIX):
            pattern = item[len(PATTERN_PREFIX) :]
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad pattern {pattern!r}: {e}") from None
            if compiled.fullmatch(""):
                raise ValueError(f"bad pattern {pattern!r}: it matches the empty string")
            if pattern not in patterns:
                patterns.append(pattern)
        elif item.lower() in RULES:
            builtins.add(item.lower())
        else:
            raise ValueError(f"unknown rule {item!r} (rules: {', '.join(RULES)}, re:PATTERN)")
    ordered = [name for name in RULES if name in builtins]
    return Normalizer(
        rules=(*ordered, *(PATTERN_PREFIX + p for p in patterns)),
        _plain=_combined([name for name in ordered if not RULES[name].needs_digit]),
        _digits=_combined([name for name in ordered if RULES[name].needs_digit]),
        _patterns=tuple(re.compile(p) for p in patterns),
    )
