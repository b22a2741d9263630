"""The lexical guard: a close embedding is not enough for a semantic hit.

Embeddings place "turn on dark mode" and "turn off dark mode" at cosine 0.93-0.98, and
"what is 2+2" and "what is 2+3" at 0.89, close to real paraphrases (0.94-0.96): no
threshold separates them. The words that flip an answer are few and visible, so a
candidate must also have the same numbers, the same quoted or code strings and the same
negation and polarity words as the question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER = re.compile(r"\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
# "double", `code`, “curly”, 'single' (not an apostrophe: no letter outside the quotes).
QUOTED = re.compile(r'"([^"\n]+)"|“([^”\n]+)”|`+([^`]+)`+|(?<![\w\'])\'([^\'\n]+)\'(?![\w\'])')
WORD = re.compile(r"[a-z]*n['’]t\b|[a-z]+")
NUMBER_WORDS = {
    word: str(value)
    for value, words in enumerate(
        (
            "zero",
            "first once",  # not "one": far more often a pronoun than a count
            "two second twice double",
            "three third triple",
            "four fourth",
            "five fifth",
            "six sixth",
            "seven seventh",
            "eight eighth",
            "nine ninth",
            "ten tenth",
            "eleven",
            "twelve dozen",
        )
    )
    for word in words.split()
} | {"hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000", "half": "0.5"}
# Words that turn an answer around, grouped by what they mean (stems and forms map to one).
POLARITY = {
    word: meaning
    for meaning, words in {
        "not": "not no never none nothing nobody nowhere neither nor cannot without except unless",
        "off": "off disable disabled disables disabling deactivate stop",
        "on": "on enable enabled enables enabling activate start",
        "false": "false wrong incorrect",
        "true": "true right correct",
        "deny": "deny denied forbid block reject",
        "allow": "allow allowed permit accept",
        "exclude": "exclude excluding excluded remove delete",
        "include": "include including included add insert",
        "less": "less fewer decrease lower reduce smaller minimum min below under",
        "more": "more increase higher raise larger bigger maximum max above over",
        "before": "before earlier previous",
        "after": "after later next",
        "up": "up",
        "down": "down",
        "yes": "yes",
    }.items()
    for word in words.split()
}


@dataclass(frozen=True)
class Features:
    """What must be the same in a question and a candidate's stored question."""

    numbers: tuple[str, ...]
    quoted: frozenset[str]
    polarity: frozenset[str]


def features(text: str) -> Features:
    lowered = THOUSANDS.sub("", text.lower())
    words = WORD.findall(lowered)
    numbers = [str(float(n)).removesuffix(".0") for n in NUMBER.findall(lowered)]
    numbers += [NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS]
    polarity = {"not" if w.endswith(("n't", "n’t")) else POLARITY.get(w, "") for w in words} - {""}
    quoted = frozenset(" ".join(next(g for g in m.groups() if g).split()) for m in QUOTED.finditer(text))
    return Features(tuple(sorted(numbers)), quoted, frozenset(polarity))


def difference(question: str, stored: str) -> str:
    """Why `stored` may not answer `question` although their embeddings are close; "" if it may."""
    a, b = features(question), features(stored)
    if a.numbers != b.numbers:
        return "different numbers"
    if a.quoted != b.quoted:
        return "different quoted text"
    if a.polarity != b.polarity:
        return "different negation or polarity words"
    return ""
