"""How a judge's answer names the texts it rates, resolved against the n texts shown.

The prompt asks for "Text 1".."Text n"; judges also write "Response B", "(b)", "Answer II",
"the second response", "Completion 3", `<text id="3">`, `<evaluation text="3">` or JSON keys in
any of these. `resolve_names` finds every such reference, decides which one naming scheme the
answer uses (numbers, letters or roman numerals), checks it against the n texts and rewrites each
reference to the canonical "Text k" that the rest of the parser reads. It refuses (returns a
reason, and the caller leaves every text unread) when the answer mixes letters with numbers, or
names a letter or numeral outside the n texts: then nobody can say which text a rating belongs to.
A number out of range stays as it is (the parser ignores a block for a text that was not shown).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

NOUNS = (r"text|response|output|answer|completion|generation|candidate|option|reply|submission|sample|passage"
         r"|assistant|summary|solution|translation|essay|story|poem")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_ORDINAL_NUMS = r"1st|2nd|3rd|[4-9]th|10th"
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ORDINAL_NUM_RE = re.compile(_ORDINAL_NUMS, re.IGNORECASE)
_DIGITS_RE = re.compile(r"\d+")
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10}

# "Response B", "Answer II", "Text #3", "Output two", "text_b" (an I only with punctuation after it:
# "the answer I would give" is English, not a name).
_NOUN_REF_RE = re.compile(
    rf"\b(?P<noun>{NOUNS})(?P<sep>[ \t]*(?:#|no\.|number)?[ \t]*|_|-)"
    rf"(?P<id>\d+\b|(?:{'|'.join(_NUMBER_WORDS)})\b(?![ \t]*(?:of|out)\b)|(?-i:[IVX]{{2,4}})(?![\w'])"
    rf"|(?-i:I)(?=[ \t]*[:.)*\]_\-\u2013\u2014\"|<]|[ \t]*$)|(?-i:[A-HJ-Z])(?![\w'\u2019])|\((?-i:[a-j])\)|(?-i:[a-j])(?=[\"'>]))",
    re.IGNORECASE | re.MULTILINE,
)
# A JSON key that is a bare letter or numeral: {"A": {...}, "B": {...}}
_KEY_REF_RE = re.compile(r'(?<=")(?P<id>[A-J]|[IVX]{2,4})(?="[ \t]*:)')
# "the second response", "2nd answer"
_ORDINAL_REF_RE = re.compile(
    rf"\b(?:the[ \t]+)?(?P<ord>{'|'.join(_ORDINALS)}|{_ORDINAL_NUMS})[ \t]+(?P<noun>{NOUNS})\b(?!s)",
    re.IGNORECASE,
)
# A bare letter label opening a line: "(b) 4/5", "B) ...", "**B:** 4", "- A: 4"
_BARE_LETTER_RE = re.compile(r"^(?P<pre>[ \t]*(?:[-+*\u2022][ \t]+)?[*_#]*[ \t]*)(?:\((?P<a>[a-jA-J])\)[*_]*[:.]?|(?P<b>[A-J])[*_]*[:)])(?=[ \t*_]|$)", re.MULTILINE)
# A table cell that is only a letter: "| (b) | 4 |", "| **B** | 4 |"
# The "(" first, so re scans for that literal instead of trying four look-behinds at every position.
_OF_LETTER_RE = re.compile(r"\((?:(?<=\bof \()|(?<=\bfor \()|(?<=\bOf \()|(?<=\bFor \())(?P<id>[a-jA-J])\)")
_CELL_LETTER_RE = re.compile(r"(?<=\|)[ \t]*[*_]*\(?(?P<id>[A-Ja-j])\)?[*_]*[ \t]*(?=\|)")
# XML with a name attribute: <text id="3">, <evaluation text="B">, <response index='2'>
_XML_ATTR_RE = re.compile(
    r"<(?P<tag>[A-Za-z_][\w\-]*)[^<>\n]*?\b(?:id|text|text_id|index|number|n|response|name|ref)[ \t]*=[ \t]*[\"']?"
    rf"(?:(?:{NOUNS})[ \t_\-]*)?(?P<id>\d+|[A-Za-z](?![A-Za-z])|[IVX]{{2,4}}(?![A-Za-z]))[\"']?[^<>\n]*>",
    re.IGNORECASE,
)
# Cheap pre-tests on an ASCII answer lowered (same length, same word boundaries): where a noun starts,
# and whether an ordinal stands before a noun at all. The full patterns then run only there.
_NOUN_START_RE = re.compile(rf"(?:{NOUNS})")
_ORDINAL_HINT_RE = re.compile(
    rf"(?:{'|'.join(_ORDINALS)}|1st|2nd|3rd|4th|5th|6th|7th|8th|9th|0th)[ \t]+(?:{NOUNS})")


def _noun_refs(text: str) -> Iterator[re.Match[str]]:
    """_NOUN_REF_RE.finditer(text), trying the pattern only where a noun starts a word."""
    if not text.isascii():  # re's case folding goes beyond str.lower there
        yield from _NOUN_REF_RE.finditer(text)
        return
    lowered, pos = text.lower(), 0
    for start in _NOUN_START_RE.finditer(lowered):
        p = start.start()
        if p < pos or (p > 0 and (lowered[p - 1].isalnum() or lowered[p - 1] == "_")):
            continue  # inside the last match, or not at a word boundary
        m = _NOUN_REF_RE.match(text, p)
        if m:
            yield m
            pos = m.end()


def _ordinal_refs(text: str) -> Iterator[re.Match[str]]:
    """_ORDINAL_REF_RE.finditer(text), skipped when no ordinal stands before a noun."""
    if text.isascii() and not _ORDINAL_HINT_RE.search(text.lower()):
        return iter(())
    return _ORDINAL_REF_RE.finditer(text)


_CLOSE_ATTR_TAG_RE = re.compile(r"</(?:evaluation|assessment|verdict|review|item|entry|result|judgement|judgment)>", re.IGNORECASE)


@dataclass(frozen=True)
class Names:
    text: str  # the answer with every reference rewritten to "Text k"
    problem: str | None  # why no reference can be trusted; None when the names resolve
    named: bool  # the answer names at least one text (so it must not be read by position)


def _kind(token: str) -> tuple[str, int | str]:
    """('number', k) | ('letter', 'B') | ('roman', 'II') | ('ambiguous', 'I')"""
    t = token.strip("()")
    if t.isdigit():
        return "number", int(t)
    if t.lower() in _NUMBER_WORDS:
        return "number", _NUMBER_WORDS.index(t.lower()) + 1
    if t.lower() in _ORDINALS:
        return "number", _ORDINALS.index(t.lower()) + 1
    if _ORDINAL_NUM_RE.fullmatch(t):
        return "number", int(_DIGITS_RE.match(t)[0])  # type: ignore[index]
    if t.upper() in _ROMAN and len(t) > 1:
        return "roman", t.upper()
    if t.upper() in ("I", "V", "X"):
        return "ambiguous", t.upper()
    return "letter", t.upper()


def _scheme(kinds: list[tuple[str, int | str]], n: int) -> tuple[str | None, str | None]:
    """The one scheme the answer uses, or the reason it has none."""
    schemes = {k for k, _ in kinds}
    if "ambiguous" in schemes:  # a lone I / V / X: a letter when other letters are used, else a numeral
        letters_in_range = all(ord(v) - 64 <= n for k, v in kinds if k == "ambiguous")  # type: ignore[arg-type]
        if "letter" in schemes:
            schemes = (schemes - {"ambiguous"}) | {"letter"}
        elif "roman" in schemes or not letters_in_range:
            schemes = (schemes - {"ambiguous"}) | {"roman"}
        else:
            return None, "the answer names a text 'I', 'V' or 'X', which may be a letter or a roman numeral"
    if len(schemes) > 1:
        return None, f"the answer names texts in more than one scheme ({' and '.join(sorted(schemes))})"
    return (schemes.pop() if schemes else None), None


def _index(kind: str, value: int | str) -> int:
    if kind == "number":
        return int(value)
    if kind == "roman" or (kind == "ambiguous" and value in _ROMAN):
        return _ROMAN[str(value)]
    return ord(str(value)) - 64


def resolve_names(text: str, n: int) -> Names:
    """Every reference to a text rewritten to "Text k" (see the module docstring)."""
    refs: list[tuple[int, int, str, tuple[str, int | str]]] = []  # start, end, replacement prefix, kind
    for m in _XML_ATTR_RE.finditer(text):
        rating_tag = m["tag"].lower() in ("rating", "score")
        refs.append((m.start(), m.end(), "xml-rating" if rating_tag else "xml", _kind(m["id"])))
    covered = bytearray(len(text) + 1)  # characters already part of a reference: O(1) overlap checks

    def take(s: int, e: int) -> None:
        covered[s:e] = b"\x01" * (e - s)

    def free(s: int, e: int) -> bool:
        return covered.find(1, s, e) < 0

    for s, e, _, _ in refs:
        take(s, e)

    for m in _ordinal_refs(text):
        if free(m.start(), m.end()):
            refs.append((m.start(), m.end(), "noun", _kind(m["ord"])))
            take(m.start(), m.end())
    for m in _noun_refs(text):
        if free(m.start(), m.end()):
            token = m["id"]
            kind = _kind(token)
            if kind[0] == "letter" and m["sep"] == "" and not token.startswith("("):
                continue  # "Texts", "Outputs": a plural, not "Text S"
            refs.append((m.start(), m.end(), "noun", kind))
            take(m.start(), m.end())
    for m in _KEY_REF_RE.finditer(text) if '"' in text else ():  # its look-behind needs a '"'
        if free(m.start(), m.end()):
            refs.append((m.start(), m.end(), "noun", _kind(m["id"])))
            take(m.start(), m.end())
    for m in _OF_LETTER_RE.finditer(text):  # "Evaluation of (c)"
        if free(m.start(), m.end()):
            refs.append((m.start(), m.end(), "noun", ("letter", m["id"].upper())))
            take(m.start(), m.end())
    for m in _CELL_LETTER_RE.finditer(text) if "|" in text else ():  # its look-behind needs a "|"
        if free(m.start(), m.end()):
            refs.append((m.start(), m.end(), "cell", ("letter", m["id"].upper())))
            take(m.start(), m.end())
    for m in _BARE_LETTER_RE.finditer(text):
        if free(m.start(), m.end()):
            letter = m["a"] or m["b"]
            refs.append((m.start(), m.end(), "bare:" + m["pre"], ("letter", letter.upper())))
            take(m.start(), m.end())
    if not refs:
        return Names(text, None, False)
    scheme, problem = _scheme([k for _, _, _, k in refs], n)
    if problem:
        return Names(text, problem, True)
    resolved = [(s, e, how, _index(scheme if k[0] == "ambiguous" else k[0], k[1])) for s, e, how, k in refs]  # type: ignore[arg-type]
    if scheme in ("letter", "roman"):
        outside = sorted({k for *_, k in resolved if not 1 <= k <= n})
        if outside:
            return Names(text, f"the answer names a text by {scheme} that is not among the {n} texts shown", True)
    return Names(_rewrite(text, resolved), None, True)


def _rewrite(text: str, resolved: list[tuple[int, int, str, int]]) -> str:
    out: list[str] = []
    pos = 0
    for s, e, how, k in sorted(resolved):
        out.append(text[pos:s])
        if how.startswith("xml"):
            out.append(f"\n#### Output for Text {k}\n" + ("Rating: " if how == "xml-rating" else ""))
        elif how == "cell":
            out.append(f" Text {k} ")
        elif how.startswith("bare:"):
            out.append(f"{how[5:]}Text {k}:")
        else:
            out.append(f"Text {k}")
        pos = e
    out.append(text[pos:])
    return _CLOSE_ATTR_TAG_RE.sub("", "".join(out))


_VALUE_RE = re.compile(
    rf"^\s*(?:(?:{NOUNS})[\s_\-#]*)?(?P<id>\d+|(?-i:[A-J])|(?-i:[IVX]{{2,4}}))\s*$", re.IGNORECASE
)


def name_value(value: object, n: int) -> int | None:
    """A JSON item's name ("text": 2, "id": "B", "response": "Response II") -> k, None if not a name."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    m = _VALUE_RE.match(str(value))
    if not m:
        return None
    kind, v = _kind(m["id"])
    if kind == "ambiguous":
        kind = "roman" if ord(str(v)) - 64 > n else "letter"
    return _index(kind, v)
