"""``clean_company_name``: the company's name as people write it, for matching and display.

From the first non-empty field of ``config.source_fields``: whitespace and surrounding quotes or
punctuation go, then (repeatedly, since exports stack them: "Acme Co., Ltd. - Official Site") noise
such as "(formerly X)", "| LinkedIn", "- Official Site", trademark signs and legal-form suffixes
("Inc.", "GmbH", "Pty Ltd", "sp. z o.o."), and finally ALL-CAPS or all-lowercase names get title
case. Mixed-case names are kept as typed (eBay, HubSpot): their casing is information.

Casing is a heuristic, stated here so results can be explained: in a re-cased name, tokens of up to
two letters and tokens without vowels stay upper case ("AT&T", "KPMG", "HR"); digits keep "3M"; an
ALL-CAPS name that is a single token of at most four letters is kept as is (IBM, SAP, HSBC);
connecting words (of, and, de, ...) are lower case inside a name.

A legal suffix is only removed when a name remains before it, and a value that is nothing but a
legal form ("Inc.") or has no letters or digits is rejected with ``TerminalError``. Placeholders
("n/a", "unknown", "-") count as empty and the next field is tried.

Config: ``source_fields`` (ordered list), ``strip_leading_the`` (default false: "The Home Depot"
keeps its article unless asked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared.errors import TerminalError
from shared.step_inputs import NAME_FIELDS
from shared.steps.base import (
    StepContext,
    config_fields,
    config_flag,
    field_value,
    present_keys,
)

# Declared with the step's inputs (shared.step_inputs), so the import checks the same list.
DEFAULT_SOURCE_FIELDS = NAME_FIELDS

PLACEHOLDERS = frozenset(
    {
        "n/a",
        "na",
        "n.a.",
        "#n/a",
        "none",
        "null",
        "nil",
        "nan",
        "undefined",
        "unknown",
        "tbd",
        "-",
        "--",
        "---",
        "?",
        "not available",
        "no name",
    }
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _abbr(letters: str) -> str:
    """``"llc"`` -> a pattern for LLC, L.L.C., L.L.C, llc."""
    return r"\.?".join(re.escape(ch) for ch in letters) + r"\.?"


_LTD = r"(?:ltd\.?|limited)"
_KG = r"(?:kgaa|kg|ohg)"
# Longer forms come first only for readability: the regex search is leftmost, so at a given
# position the whole remaining tail must match one alternative anyway.
_LEGAL_FORMS = [
    rf"\(?pty\.?\)?\s*{_LTD}",
    rf"pte\.?\s*{_LTD}",
    rf"pvt\.?\s*{_LTD}",
    r"private\s+limited",
    r"proprietary\s+limited",
    r"sdn\.?\s*bhd\.?",
    r"bhd\.?",
    r"pty\.?",
    r"inc\.?",
    r"incorporated",
    r"corp\.?",
    r"corporation",
    r"&\s*co\.?",
    r"co\.?",
    r"ltd\.?",
    r"limited",
    r"lt[ée]e\.?",
    r"limit[ée]e",
    _abbr("pllc"),
    _abbr("llc"),
    _abbr("lllp"),
    _abbr("llp"),
    _abbr("lp"),
    _abbr("plc"),
    _abbr("ulc"),
    rf"(?:gmbh|ag|se)\s*&\s*co\.?\s*{_KG}",
    r"g?gmbh",
    r"ag",
    _KG,
    r"ug(?:\s*\(haftungsbeschr[äa]nkt\))?",
    r"e\.\s?v\.",
    r"se",
    _abbr("sa") + r"(?:b\.?)?(?:\s*de\s*" + _abbr("cv") + r")?",
    _abbr("sasu"),
    _abbr("sas"),
    _abbr("sarl"),
    r"s[àa]rl",
    _abbr("sau"),
    _abbr("slu"),
    _abbr("sl"),
    _abbr("srl"),
    _abbr("spa"),
    _abbr("bv"),
    _abbr("nv"),
    _abbr("kk"),
    r"kabushiki\s+kaisha",
    r"oyj?",
    r"ab",
    r"asa?",
    r"a/s",
    r"aps",
    r"kft\.?",
    r"zrt\.?",
    r"nyrt\.?",
    r"sp\.?\s*z\s*o\.?\s*o\.?",
    _abbr("sro"),
    _abbr("doo"),
    r"ooo",
    r"p?jsc",
    r"ltda\.?",
]
_LEGAL = "|".join(_LEGAL_FORMS)
_LEGAL_TAIL = re.compile(rf"(?:\s*,\s*|\s+)(?P<part>(?:{_LEGAL}))\s*$", re.IGNORECASE)
_LEGAL_ONLY = re.compile(rf"(?:{_LEGAL})(?:[\s,]+(?:{_LEGAL}))*", re.IGNORECASE)
# Alone, these may be a real name (SAS the airline, SAP-style acronyms): accepted as a name.
_AMBIGUOUS_ALONE = frozenset(
    {"sa", "sas", "se", "ag", "ab", "as", "asa", "kk", "oy", "bv", "nv", "kg", "spa", "ooo", "lp"}
)

_FORMERLY = r"(?:formerly(?:\s+known\s+as)?|previously|fka|f\.k\.a\.?|f/k/a)(?![a-z])"
_NOISE_PATTERNS = [
    # "(formerly Foo)", "[now part of Bar]", "(a.k.a. Baz)" anywhere in the name.
    re.compile(
        r"\s*[(\[]\s*(?:formerly|previously|fka|f\.?k\.?a\.?|f/k/a|aka|a\.k\.a\.?|a/k/a|now|"
        r"acquired\s+by|part\s+of|(?:a\s+)?subsidiary\s+of)(?![a-z])[^)\]]*[)\]]",
        re.IGNORECASE,
    ),
    # ", formerly Foo Inc" up to the end.
    re.compile(rf"[\s,;]+{_FORMERLY}\s*:?\s+\S.*$", re.IGNORECASE),
    # Page-title tails scraped along with the name: "Acme - Official Site", "Acme | LinkedIn".
    re.compile(
        r"\s*(?:\||·|•|:|\s[-\u2013\u2014]|[-\u2013\u2014]\s)\s*"
        r"(?:official\s+(?:web\s*)?site|home\s*page|home|welcome|linked\s*in|facebook|twitter|"
        r"instagram|crunchbase(?:\s+company\s+profile)?|company\s+profile|overview|"
        r"about(?:\s+us)?)\s*$",
        re.IGNORECASE,
    ),
    re.compile(r"^(?:home|welcome)\s*(?:\||·|•|:|[-\u2013\u2014])\s*(?=\S)", re.IGNORECASE),
    re.compile(r"^welcome\s+to\s+(?=\S)", re.IGNORECASE),
    re.compile(r"\s*[™®©℠]"),
]

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"\s+")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e\u201a\u2039\u203a"
_EDGE_JUNK = " " + _QUOTES + ",;:-\u2013\u2014|*•·_~/\\"
_WRAPPERS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_INITIALISM = re.compile(r"(?:^|\s)(?:[^\W\d_]\.){2,}$")
_LEADING_THE = re.compile(r"^the\s+(?=\S)", re.IGNORECASE)

_CONNECTORS = _words(
    "of and the for de del la le les du des der den van von di da y e et und on in at by to a an or"
)
# Short words that are words, not acronyms, when they appear in an ALL-CAPS or lowercase name.
_SHORT_WORDS = _words("my go no so we up do be me is st mr mrs dr mt ft")
_VOWELS = frozenset("aeiouyàáâäãåæèéêëìíîïòóôöõøùúûü")
_ORDINAL = re.compile(r"^(st|nd|rd|th)$")


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", _INVISIBLE.sub("", text)).strip(_EDGE_JUNK)
    # "(Acme Corp)" or "[Acme]": an outer wrapper is formatting, not part of the name.
    while len(text) > 2 and _WRAPPERS.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
        text = text[1:-1].strip(_EDGE_JUNK)
    return text


def _has_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _remove_noise(name: str, removed: list[str]) -> str:
    for pattern in _NOISE_PATTERNS:
        while (match := pattern.search(name)) and _has_alnum(
            rest := (name[: match.start()] + " " + name[match.end() :]).strip()
        ):
            removed.append(match.group(0).strip(" ,;"))
            name = _SPACES.sub(" ", rest).strip(_EDGE_JUNK)
    return name


def _remove_legal_suffix(name: str) -> tuple[str, str | None]:
    match = _LEGAL_TAIL.search(name)
    if match is None:
        return name, None
    rest = name[: match.start()].strip(_EDGE_JUNK)
    # "The Limited", "& Co": never leave only an article or connector behind.
    if not _has_alnum(rest) or rest.lower() in _CONNECTORS:
        return name, None
    return rest, match.group("part")


def _strip_final_dot(name: str) -> str:
    if name.endswith(".") and not _INITIALISM.search(name):
        return name.rstrip(".").rstrip(_EDGE_JUNK)
    return name


def _title_word(word: str) -> str:
    """Title-case one word: "o'reilly" -> "O'Reilly", "mcdonald's" -> "McDonald's", "3m" -> "3M",
    "21st" -> "21st", "booking.com" -> "Booking.com"."""
    chars = list(word.lower())
    i = 0
    while i < len(chars):
        if not chars[i].isalpha():
            i += 1
            continue
        j = i
        while j < len(chars) and chars[j].isalpha():
            j += 1
        run = "".join(chars[i:j])
        prev = chars[i - 1] if i > 0 else ""
        if prev == "":
            capital = True
        elif prev == "'":
            before = i - 2
            single_before = (
                before >= 0
                and chars[before].isalpha()
                and (before == 0 or not chars[before - 1].isalpha())
            )
            capital = single_before and len(run) >= 2  # O'Reilly, D'Angelo; not Macy's
        elif prev.isdigit():
            capital = len(run) <= 2 and not _ORDINAL.match(run)  # 3M, 4K; not 21st
        else:
            capital = prev in "-/&(+"
        if capital:
            chars[i] = chars[i].upper()
            if run.startswith("mc") and len(run) > 3:
                chars[i + 2] = chars[i + 2].upper()
        i = j
    return "".join(chars)


def _recase_token(token: str, *, first: bool, single: bool, from_upper: bool) -> str:
    letters = [ch for ch in token.lower() if ch.isalpha()]
    if not letters:
        return token
    word = "".join(letters)
    if token.lower() in _CONNECTORS and not first:
        return token.lower()
    if token.lower() in _SHORT_WORDS:
        return _title_word(token)
    if from_upper and single and len(letters) <= 4:
        return token.upper()
    if any(ch.isdigit() for ch in token):
        return _title_word(token)  # 3M, 7-Eleven, 21st
    if "&" in token and all(len(part) <= 2 for part in token.split("&")):
        return token.upper()  # AT&T, P&G, H&M
    if _INITIALISM.search(token) or len(letters) <= 2 or not _VOWELS.intersection(word):
        return token.upper()
    return _title_word(token)


def fix_case(name: str) -> str:
    """Title-case an ALL-CAPS or all-lowercase name; keep a mixed-case one as typed."""
    cased = [ch for ch in name if ch.isupper() or ch.islower()]
    if not cased:
        return name
    has_upper = any(ch.isupper() for ch in cased)
    has_lower = any(ch.islower() for ch in cased)
    if has_upper and has_lower:
        return name
    tokens = name.split(" ")
    return " ".join(
        _recase_token(token, first=i == 0, single=len(tokens) == 1, from_upper=has_upper)
        for i, token in enumerate(tokens)
    )


def clean_name(value: str, *, strip_leading_the: bool = False) -> tuple[str, list[str]]:
    """The cleaned name and the parts removed; raises ``TerminalError`` when no name is left."""
    removed: list[str] = []
    name = _tidy(value)
    legal_run: int | None = None  # where the current run of suffixes starts in `removed`
    while True:
        before = name
        noise_count = len(removed)
        name = _remove_noise(name, removed)
        if len(removed) != noise_count:
            legal_run = None
        name, part = _remove_legal_suffix(name)
        if part is not None:
            # Suffixes come off right to left; report them left to right ("Co.", "Ltd.").
            legal_run = len(removed) if legal_run is None else legal_run
            removed.insert(legal_run, part)
        if name == before:
            name = _strip_final_dot(name)
            if name == before:
                break
    if strip_leading_the and (match := _LEADING_THE.match(name)):
        removed.append(match.group(0).strip())
        name = name[match.end() :]
    if not _has_alnum(name):
        raise TerminalError(f"company name {value.strip()!r} has no letters or digits")
    if _LEGAL_ONLY.fullmatch(name) and name.lower().replace(".", "") not in _AMBIGUOUS_ALONE:
        raise TerminalError(
            f"company name {value.strip()!r} is only a legal form, not a company name"
        )
    return fix_case(name), removed


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def find_name(raw: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    fields = config_fields(config, "source_fields", DEFAULT_SOURCE_FIELDS)
    strip_the = config_flag(config, "strip_leading_the")
    skipped: list[str] = []
    for field in fields:
        found = field_value(raw, field)
        if found is None or _is_blank(found[1]):
            continue
        key, value = found
        if not isinstance(value, str):
            skipped.append(f"{key}={value!r} is not text ({type(value).__name__})")
            continue
        if _SPACES.sub(" ", value).strip(_EDGE_JUNK).lower() in PLACEHOLDERS or (
            value.strip().lower() in PLACEHOLDERS
        ):
            skipped.append(f"{key}={value!r} is a placeholder")
            continue
        try:
            name, removed = clean_name(value, strip_leading_the=strip_the)
        except TerminalError as exc:
            raise TerminalError(f"no usable company name: {key}: {exc}") from None
        return {"name": name, "original_name": value, "removed": removed, "source_field": key}
    if skipped:
        raise TerminalError("no usable company name: " + "; ".join(skipped))
    raise TerminalError(
        f"no company name: no value in any of {', '.join(fields)} ({present_keys(raw)})"
    )


async def clean_company_name(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Result: ``name`` (cleaned), ``original_name`` (the raw value), ``removed`` (the parts taken
    off, in order) and ``source_field``."""
    return find_name(raw, ctx.config)
