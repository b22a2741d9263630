"""The lexical guard: a close embedding is not enough for a semantic hit.

Embeddings place "turn on dark mode" and "turn off dark mode" at cosine 0.93-0.98, and
"what is 2+2" and "what is 2+3" at 0.89, close to real paraphrases (0.94-0.96): no
threshold separates them. The words that flip an answer are few and visible, so a
candidate must also have the same numbers and arithmetic in the same order, the same
quoted strings and code (os.path.join, my_func, print()), the same negation and
polarity words (in a few languages, and opposites made with a prefix: lock/unlock,
valid/invalid), no opposite sides of an antonym pair (best/worst), the same names,
days and units (Paris is not London, English to French is not French to English, today
is not tomorrow) and no swap around to/than/from (a list to a dict is not a dict to a
list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
# In text order: a number as written (a minus sign directly before it makes it negative;
# "3.10" is not "3.1", "1.2.3" is one), an arithmetic sign (a dash or slash only between
# numbers or spaces: not in "e-mail" or "and/or"), or a word (contractions and
# possessives included).
TOKEN = re.compile(
    r"(?P<number>(?:(?<![\w)\]])-)?\d+(?:\.\d+)*)"
    r"|(?P<operator>(?<=[\d\s])[-/x×](?=\s*\d)|(?<=\s)[-/](?=\s)|[+*×÷^%=<>])"
    r"|(?P<word>[^\W\d_]+(?:['’][^\W\d_]+)*)"
)
# "double", `code`, “curly”, 'single' (not an apostrophe: no letter outside the quotes).
QUOTED = re.compile(r'"([^"\n]+)"|“([^”\n]+)”|`+([^`]+)`+|(?<![\w\'])\'([^\'\n]+)\'(?![\w\'])')
# Code outside quotes: dotted names of 2+ letter parts (os.path.join, config.yaml, not
# e.g.), snake_case, and names called with parentheses (print()).
CODE = re.compile(r"[A-Za-z_]\w+(?:(?:\.|::|->)[A-Za-z_]\w+)+|\b\w*_\w+|[A-Za-z_]\w*(?=\()")
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
OPERATORS = {"x": "*", "×": "*", "÷": "/"} | {
    word: sign
    for sign, words in {
        "+": "plus",
        "-": "minus",
        "*": "times multiplied",
        "/": "divided",
        "^": "squared cubed power",
        "%": "percent percentage",
    }.items()
    for word in words.split()
}
# Words that turn an answer around, grouped by what they mean (stems and forms map to one).
POLARITY = {
    word: meaning
    for meaning, words in {
        "not": "not no never none nothing nobody nowhere neither nor cannot without except unless "
        "unable avoid avoiding prevent preventing lack lacking hardly barely "
        "nicht kein keine keinen keiner nie niemals ohne ne pas non sans jamais não nao nunca jamás "
        "senza niet geen",
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
# Antonyms, weaker than polarity words: refused only when each text has a side of the
# pair and the sides differ ("the best way to learn X" and "how should I learn X" agree).
ANTONYMS = [
    (frozenset(one.split()), frozenset(other.split()))
    for one, other in (
        ("best", "worst"),
        ("good better", "bad worse"),
        ("most", "least"),
        ("fast faster fastest quick quicker quickest quickly", "slow slower slowest slowly"),
        ("long longer longest", "short shorter shortest"),
        ("old older oldest", "new newer newest latest"),
        ("hot hotter hottest warm", "cold colder coldest cool"),
        ("cheap cheaper cheapest", "expensive"),
        ("easy easier easiest", "hard harder hardest difficult"),
        ("pros advantage advantages benefit benefits", "cons disadvantage disadvantages drawback drawbacks"),
        ("light", "dark"),
        ("black", "white"),
        ("same", "different"),
        ("read reading", "write writing"),
        ("send sending", "receive receiving"),
        ("buy buying", "sell selling"),
        ("win winning", "lose losing"),
        ("push", "pull"),
        ("open opening", "close closing"),
        ("server", "client"),
        ("frontend", "backend"),
        ("sync synchronous synchronously", "async asynchronous asynchronously"),
        ("horizontal horizontally", "vertical vertically"),
        ("row rows", "column columns"),
        ("north", "south"),
        ("east", "west"),
        ("left", "right"),
    )
]
# Words that point one way: the word after one (articles skipped) says which way
# ("a list to a dict" is not "a dict to a list"; "into" is "to").
DIRECTIONS = {"to": "to", "into": "to", "than": "than", "from": "from", "vs": "vs", "versus": "vs"}
ARTICLES = frozenset("a an the my your our their his her its this that these those some".split())
# Words that name a day or a unit however they are cased: compared like names (present
# in both, in the same order: 5 km in miles is not 5 miles in km), forms mapped to one.
TERMS = {
    word: forms.split()[0]
    for forms in (
        "today", "tomorrow", "yesterday", "tonight",
        "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
        "january", "february", "april", "june", "july", "august", "september", "october",
        "november", "december",  # not march or may: verbs too (capitalised, they are names)
        "km kilometer kilometers kilometre kilometres", "mi mile miles", "meter meters metre metres",
        "cm centimeter centimeters centimetre centimetres", "mm millimeter millimeters millimetre millimetres",
        "inch inches", "ft foot feet", "yard yards", "kg kilo kilos kilogram kilograms", "gram grams",
        "lb lbs pound pounds", "oz ounce ounces", "celsius centigrade", "fahrenheit", "kelvin",
        "liter liters litre litres", "ml milliliter milliliters millilitre millilitres", "gallon gallons",
        "mph", "kph", "usd dollar dollars", "eur euro euros", "gbp", "yen", "kb kilobyte kilobytes",
        "mb megabyte megabytes", "gb gigabyte gigabytes", "tb terabyte terabytes",
        "seconds", "minute minutes", "hour hours", "day days", "week weeks", "month months", "year years",
    )
    for word in forms.split()
}  # fmt: skip
# Opposites made with a prefix (lock/unlock, encrypt/decrypt, ascending/descending): a
# word of one text whose stem, under the other prefix, is a word of the other text.
OPPOSITE_PREFIXES = (
    ("", "un"), ("", "dis"), ("", "de"), ("", "non"), ("", "anti"), ("", "in"), ("", "im"), ("", "ir"),
    ("", "il"), ("en", "de"), ("in", "de"), ("in", "ex"), ("im", "ex"), ("in", "out"), ("up", "down"),
    ("as", "des"),
)  # fmt: skip
MIN_STEM = 3
SENTENCE_START = ".!?:;\n\"'“‘(*#>-"  # a capital after these starts a sentence
# What sentences start with anyway: capitalised there, these name nothing; any other word
# capitalised at a sentence's start may be a name ("Paris: what's the weather like?").
STARTERS = frozenset(
    """
    what how why who whom whose when where which whether is are was were am be been being can could would
    should will shall may might must do does did done has have had having not no yes
    i me my mine we us our you your it its he him his she her they them their this that these those there
    here the a an some any every each all both either neither one another other such
    in on at for to from of with without by about as if then than and or but so because since after
    before while until during into onto over under between through against among per via
    hi hello hey dear thanks thank please ok okay sure well now also just again still yet even only
    let tell explain give write list show describe summarize summarise translate convert calculate compute
    compare define find check help make create build generate fix repair solve suggest recommend provide
    implement debug refactor optimize optimise rewrite correct improve add remove delete update change use
    get set run read open close start stop install sort count print return draft plan outline answer
    classify extract analyze analyse evaluate review consider imagine assume suppose given say ask
    """.split()
)


@dataclass(frozen=True)
class Features:
    """What must be the same in a question and a candidate's stored question."""

    numbers: tuple[str, ...]
    operators: tuple[str, ...]
    quoted: frozenset[str]  # and code outside quotes
    polarity: frozenset[str]
    words: tuple[str, ...]  # lower-cased, possessives cut, in order
    names: tuple[str, ...]  # words written as names (capitalised inside a sentence, iPhone, SQL), TERMS

    @property
    def pointed(self) -> set[tuple[str, str]]:
        """(direction, the word it points at) for each direction word."""
        found = set()
        for i, word in enumerate(self.words):
            if word in DIRECTIONS:
                target = next((w for w in self.words[i + 1 :] if w not in ARTICLES), "")
                found.add((DIRECTIONS[word], target))
        return found


def is_name(word: str, text: str, start: int) -> bool:
    if any(c.isupper() for c in word[1:]):
        return True
    stem = re.split("['’]", word)[0]  # I'm, What's, Let's
    if not word[0].isupper() or stem == "I":
        return False
    before = text[:start].rstrip(" \t")
    return (bool(before) and before[-1] not in SENTENCE_START) or stem.lower() not in STARTERS


def features(text: str) -> Features:
    text = THOUSANDS.sub("", text)
    numbers: list[str] = []
    operators: list[str] = []
    polarity: set[str] = set()
    words: list[str] = []
    names: list[str] = []
    for m in TOKEN.finditer(text):
        if number := m.group("number"):
            numbers.append(number)
        elif operator := m.group("operator"):
            operators.append(OPERATORS.get(operator, operator))
        else:
            token = m.group("word")
            word = re.sub(r"['’]s$", "", token.lower())
            word = TERMS.get(word, word)
            words.append(word)
            if word in NUMBER_WORDS:
                numbers.append(NUMBER_WORDS[word])
            if word in OPERATORS:
                operators.append(OPERATORS[word])
            if meaning := "not" if word.endswith(("n't", "n’t")) else POLARITY.get(word):
                polarity.add(meaning)
            if (word in TERMS or is_name(token, text, m.start())) and word not in names:
                names.append(word)
    quoted = frozenset(" ".join(next(g for g in m.groups() if g).split()) for m in QUOTED.finditer(text))
    quoted |= frozenset(CODE.findall(text))
    return Features(tuple(numbers), tuple(operators), quoted, frozenset(polarity), tuple(words), tuple(names))


def opposites(a: set[str], b: set[str]) -> bool:
    """Whether a word of `a` is a word of `b` with an opposite prefix (or the other way)."""
    for one, other in ((a, b), (b, a)):
        for word in one:
            for mine, theirs in OPPOSITE_PREFIXES:
                stem = word[len(mine) :]
                if word.startswith(mine) and len(stem) >= MIN_STEM and theirs + stem in other:
                    return True
    return False


def antonyms(a: set[str], b: set[str]) -> bool:
    """Whether the texts take different sides of a pair, each taking one."""
    for pair in ANTONYMS:
        sides_a = {i for i, side in enumerate(pair) if side & a}
        sides_b = {i for i, side in enumerate(pair) if side & b}
        if sides_a and sides_b and sides_a != sides_b:
            return True
    return False


def swapped(a: Features, b: Features) -> bool:
    """Whether a direction points at another word of both texts in each ("a list to a
    dict" and "a dict to a list"); one without the direction ("how to X", "how can I X")
    is no swap."""
    words_a, words_b = set(a.words), set(b.words)
    pointed_b = b.pointed
    return any(
        way == other_way and target != other and target in words_b and other in words_a
        for way, target in a.pointed
        for other_way, other in pointed_b
    )


def same_names(a: Features, b: Features) -> bool:
    """Each text's names are words of the other (however cased), in the same order."""
    names = set(a.names) | set(b.names)
    if not names <= set(a.words) or not names <= set(b.words):
        return False
    return [w for w in dict.fromkeys(a.words) if w in names] == [w for w in dict.fromkeys(b.words) if w in names]


def difference(question: str, stored: str) -> str:
    """Why `stored` may not answer `question` although their embeddings are close; "" if it may."""
    a, b = features(question), features(stored)
    if a.numbers != b.numbers:
        return "different numbers"
    if a.operators != b.operators:
        return "different arithmetic"
    if a.quoted != b.quoted:
        return "different quoted text or code"
    words_a, words_b = set(a.words), set(b.words)
    if a.polarity != b.polarity or opposites(words_a - words_b, words_b - words_a):
        return "different negation or polarity words"
    if antonyms(words_a, words_b):
        return "opposite words"
    if not same_names(a, b):
        return "different names"
    if swapped(a, b):
        return "the other way round"
    return ""
