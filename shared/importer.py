"""Stream a CSV file into a new batch, in one transaction, with bounded memory.

The file is read line by line and each row goes straight into ``COPY batch_items (batch_id,
raw_data) FROM STDIN``: a million-row file never sits in memory, and the ``batch_items`` insert
trigger seeds every item's first step as PENDING in the same statement. Nothing is written unless
the whole import succeeds (the batch row, the items and their first steps commit together).

What is checked, before anything is written: the blueprint's steps against ``enrichment_registry``,
the encoding (UTF-8; a BOM is stripped; UTF-16, spreadsheets and archives are named for what they
are), the delimiter (sniffed among ``, ; TAB |``) and the header (normalised to lower_snake_case
keys, well-known aliases mapped to canonical keys, empty or duplicate names refused). A first line
that looks like data (an email or web address, or domains and numbers like the rows under them) is
refused: a file without a header row is imported with ``columns=`` naming its columns. Each step
declares what it reads (``shared.steps.INPUTS``, from its registry config): when no column feeds
a step, every item would fail there, so the import is refused naming what each step needs and the
columns it saw (a wrong delimiter shows up here as a single column).

While streaming: lines may end in LF, CRLF or CR, mixed; NUL characters are removed and counted
in a warning. Rows with more or fewer fields than the header and broken quoting are malformed; by
default one malformed row refuses the whole import (the error lists the first ones with their line
numbers, and the lines a row spans: an unclosed quote swallows every line up to the next quote),
with ``skip_invalid=True`` they are skipped and reported. Blank lines are ignored, values are
trimmed and empty values dropped from ``raw_data``. ``"-"`` reads standard input.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import io
import itertools
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from shared.errors import ConfigurationError, InvalidInput
from shared.pg_state import translate_db_error
from shared.step_inputs import INPUTS, InputsOf, StepInputs, normalize_key

# Canonical keys and the normalised headers that mean them. A header that normalises to the
# canonical key itself is "mapped" too (it is a key the steps know).
CANONICAL_ALIASES: Mapping[str, tuple[str, ...]] = {
    "name": (
        "company",
        "company_name",
        "account",
        "account_name",
        "organization",
        "organisation",
        "organization_name",
        "organisation_name",
        "org_name",
        "business_name",
        "legal_name",
    ),
    "website": (
        "website_url",
        "company_website",
        "company_website_url",
        "url",
        "homepage",
        "home_page",
        "web",
        "web_site",
        "site",
        "company_url",
        "website_address",
    ),
    "domain": ("company_domain", "domain_name", "website_domain", "email_domain", "root_domain"),
    "linkedin_url": (
        "linkedin",
        "company_linkedin",
        "company_linkedin_url",
        "linkedin_company_url",
        "linkedin_profile",
        "linkedin_page",
    ),
    "email": (
        "work_email",
        "email_address",
        "e_mail",
        "business_email",
        "contact_email",
        "company_email",
    ),
    "phone": ("phone_number", "company_phone", "telephone", "tel"),
    "country": ("company_country", "hq_country", "headquarters_country", "country_name"),
    "city": ("company_city", "hq_city", "headquarters_city", "town"),
    "state": ("region", "province", "company_state", "hq_state", "state_region"),
    "industry": ("sector", "company_industry", "vertical", "industries"),
    "employees": (
        "employee_count",
        "employees_count",
        "num_employees",
        "number_of_employees",
        "no_of_employees",
        "nb_employees",
        "headcount",
        "company_size",
        "staff_count",
        "estimated_num_employees",
    ),
    "revenue": ("annual_revenue", "company_revenue", "estimated_revenue"),
    "description": ("company_description", "short_description", "about"),
    "founded_year": ("founded", "year_founded", "founded_in"),
}

ALIASES: Mapping[str, str] = {
    alias: canonical
    for canonical, aliases in CANONICAL_ALIASES.items()
    for alias in (canonical, *aliases)
}

DELIMITERS = (",", ";", "\t", "|")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
MAX_REPORTED_ERRORS = 20  # bad rows listed in a refusal
MAX_KEPT_SKIPPED = 1000  # skipped rows kept in a report (the count is always exact)
SNIFF_BYTES = 64 * 1024
COPY_CHUNK_CHARS = 256 * 1024
DEFAULT_PROGRESS_EVERY = 10_000

MAX_NUL_LINES = 5  # lines named in the NUL warning
_AFTER_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")
_LINE_ENDS = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")
_CAMEL_1 = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_2 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_LINKEDIN = re.compile(r"linked[\s_-]?in", re.IGNORECASE)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")

_REGISTRY_STEPS = (
    "select step_name, modal_function_name, config from public.enrichment_registry"
    " order by step_name"
)
_INSERT_BATCH = (
    "insert into public.batches (client_id, name, blueprint, meta, budget_usd, use_cache, priority)"
    " values (coalesce(%(client_id)s, public.request_client_id(),"
    " '00000000-0000-0000-0000-000000000000'::uuid), %(name)s, %(blueprint)s, %(meta)s,"
    " %(budget_usd)s, %(use_cache)s, %(priority)s)"
    " returning id"
)
_COPY_ITEMS = "copy public.batch_items (batch_id, raw_data) from stdin"
_UPDATE_META = (
    "update public.batches set meta = meta || %(meta)s, updated_at = now() where id = %(id)s"
)


# Headers ------------------------------------------------------------------------------------------


def normalise_header(header: str) -> str:
    """``"Company Name"`` -> ``company_name``, ``"LinkedIn URL"`` -> ``linkedin_url``,
    ``"companyName"`` -> ``company_name``, ``"# Employees"`` -> ``num_employees``."""
    text = unicodedata.normalize("NFKD", header.replace("\ufeff", "").strip())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = _LINKEDIN.sub("linkedin", text)
    text = text.replace("#", " num ").replace("%", " pct ").replace("&", " and ")
    text = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", text))
    return _NON_ALNUM.sub("_", text.lower()).strip("_")


@dataclass(frozen=True, slots=True)
class Column:
    """One CSV column: its header as written and the ``raw_data`` key its values go under."""

    index: int
    header: str
    key: str
    mapped: bool  # key is a canonical key (directly or through an alias)


@dataclass(frozen=True, slots=True)
class HeaderMap:
    columns: tuple[Column, ...]
    warnings: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.columns)

    @property
    def mapped(self) -> dict[str, str]:
        """Header -> canonical key, for headers recognised as a well-known field."""
        return {c.header: c.key for c in self.columns if c.mapped}

    @property
    def unmapped(self) -> dict[str, str]:
        """Header -> key, for headers kept as they are (normalised only)."""
        return {c.header: c.key for c in self.columns if not c.mapped}

    def to_json(self) -> dict[str, Any]:
        return {"mapped": self.mapped, "unmapped": self.unmapped, "warnings": list(self.warnings)}


def map_headers(headers: Sequence[str]) -> HeaderMap:
    """Normalise and map a header row. Raises InvalidInput for empty or duplicate names.

    When several headers mean the same canonical field, one spelled exactly as the canonical key
    wins, else the first one; the others keep their normalised names (with a warning).
    """
    normalised = [normalise_header(h) for h in headers]
    empty = [i + 1 for i, key in enumerate(normalised) if not key]
    if empty:
        where = ", ".join(
            f"column {i} ({headers[i - 1].strip()!r})" if headers[i - 1].strip() else f"column {i}"
            for i in empty
        )
        raise InvalidInput(
            f"the header row has {len(empty)} empty or unusable column name(s): {where}; "
            "name every column (or delete the empty ones)"
        )
    seen: dict[str, int] = {}
    for i, key in enumerate(normalised):
        if key in seen:
            first = seen[key]
            raise InvalidInput(
                f"duplicate column {key!r}: column {first + 1} ({headers[first].strip()!r}) and "
                f"column {i + 1} ({headers[i].strip()!r}) have the same name once normalised to "
                "lower_snake_case; rename one of them"
            )
        seen[key] = i

    owner: dict[str, int] = {}  # canonical key -> the column index that gets it
    for i, key in enumerate(normalised):
        if key in CANONICAL_ALIASES:
            owner[key] = i
    for i, key in enumerate(normalised):
        canonical = ALIASES.get(key)
        if canonical is not None and canonical not in owner:
            owner[canonical] = i

    columns: list[Column] = []
    warnings: list[str] = []
    for i, (header, key) in enumerate(zip(headers, normalised, strict=True)):
        canonical = ALIASES.get(key)
        if canonical is not None and owner[canonical] == i:
            columns.append(Column(i, header.strip(), canonical, True))
            continue
        if canonical is not None:
            other = headers[owner[canonical]].strip()
            warnings.append(
                f"{header.strip()!r} would also map to {canonical!r}, which {other!r} already "
                f"provides: kept as {key!r}"
            )
        columns.append(Column(i, header.strip(), key, False))
    return HeaderMap(tuple(columns), tuple(warnings))


# Reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int  # the CSV line the record starts on (1 = the header)
    reason: str
    end_line: int | None = None  # the line it ends on, when not ``line``

    @property
    def last_line(self) -> int:
        return self.line if self.end_line is None else max(self.line, self.end_line)

    @property
    def lines(self) -> int:
        return self.last_line - self.line + 1

    def __str__(self) -> str:
        if self.lines == 1:
            return f"line {self.line}: {self.reason}"
        return f"lines {self.line}-{self.last_line} ({self.lines:,} lines): {self.reason}"


@dataclass(frozen=True, slots=True)
class ImportProgress:
    rows_read: int
    rows_imported: int
    rows_skipped: int
    bytes_read: int
    total_bytes: int


ProgressCallback = Callable[[ImportProgress], None]


@dataclass(frozen=True, slots=True)
class ImportReport:
    batch_id: UUID
    rows_imported: int
    rows_skipped: int
    skipped: tuple[BadRow, ...]  # the first MAX_KEPT_SKIPPED skipped rows
    blank_lines: int
    headers: HeaderMap
    delimiter: str
    bom: bool
    steps: tuple[str, ...]
    seconds: float  # the whole import, commit included
    # Until the last row was sent; the rest is the server finishing the COPY (the insert trigger
    # seeding first steps) and the commit.
    stream_seconds: float = 0.0
    warnings: tuple[str, ...] = field(default_factory=tuple)
    # Physical lines of the skipped rows: more than rows_skipped when a row spans lines (an
    # unclosed quote swallows every line up to the next quote).
    lines_skipped: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.rows_imported / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": str(self.batch_id),
            "rows_imported": self.rows_imported,
            "rows_skipped": self.rows_skipped,
            "lines_skipped": self.lines_skipped,
            "skipped": [
                {"line": b.line, "end_line": b.last_line, "reason": b.reason} for b in self.skipped
            ],
            "blank_lines": self.blank_lines,
            "headers": self.headers.to_json(),
            "delimiter": self.delimiter,
            "bom": self.bom,
            "steps": list(self.steps),
            "warnings": list(self.warnings),
        }


class MalformedCsv(InvalidInput):
    """Malformed rows refused the import; ``bad_rows`` are the first ones, ``total`` all of them."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow], total: int) -> None:
        super().__init__(message)
        self.bad_rows = tuple(bad_rows)
        self.total = total


class _Lines:
    """The file's physical lines, decoded as UTF-8 one by one, counting bytes for progress.

    Lines end in LF, CRLF or a lone CR, mixed in one file if need be (files pasted together from
    Windows, Unix and old Mac exports): a lone CR inside a line starts a new line, as in Python's
    ``newline=""`` mode that the csv module expects, and a quoted value keeps its line breaks.
    NUL characters are removed (PostgreSQL cannot store them in text or jsonb) and counted, so the
    import can say so.
    """

    def __init__(self, stream: Iterable[bytes], display: str) -> None:
        self._stream = stream
        self._display = display
        self.bytes_read = 0
        self.line_no = 0
        self.nuls = 0  # NUL characters removed
        self.nul_lines: list[int] = []  # the first lines they were on
        self.nul_line_count = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self._stream:
            self.bytes_read += len(raw)
            if self.line_no == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if b"\x00" in raw:
                raw = self._without_nuls(raw)
            cr = raw.find(b"\r")
            if cr != -1 and cr < len(raw) - 1 and not (cr == len(raw) - 2 and raw[-1] == 10):
                for part in _AFTER_LONE_CR.split(raw):  # a lone CR before the LF or CRLF
                    if part:
                        self.line_no += 1
                        yield self._decode(part)
                continue
            self.line_no += 1
            yield self._decode(raw)

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"{self._display}: line {self.line_no} is not valid UTF-8 (byte "
                f"0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); save the file "
                "as UTF-8 (Excel: 'CSV UTF-8'), or convert it, e.g. "
                "iconv -f WINDOWS-1252 -t UTF-8"
            ) from None

    def _without_nuls(self, raw: bytes) -> bytes:
        self.nuls += raw.count(b"\x00")
        self.nul_line_count += 1
        if len(self.nul_lines) < MAX_NUL_LINES:
            self.nul_lines.append(self.line_no + 1)
        return raw.replace(b"\x00", b"")

    def nul_warning(self) -> str | None:
        if not self.nuls:
            return None
        where = ", ".join(map(str, self.nul_lines))
        more = ", ..." if self.nul_line_count > len(self.nul_lines) else ""
        return (
            f"removed {self.nuls:,} NUL character(s) (invisible \\0 bytes, which the database "
            f"cannot store) on line(s) {where}{more}; the values are imported without them"
        )


def sniff_delimiter(sample_lines: Sequence[str]) -> str:
    """The delimiter among ``, ; TAB |`` that splits the sample most consistently.

    Each candidate parses the sample; the winner has the most rows with as many fields as its
    header (and more than one field), then the widest header. Ties go to the comma.
    """
    lines = [line for line in sample_lines if line.strip()]
    if not lines:
        return ","
    best = ","
    best_score: tuple[int, int, int] = (-1, -1, -1)
    for delimiter in DELIMITERS:
        try:
            rows = list(csv.reader(lines, delimiter=delimiter))
        except csv.Error:
            continue
        if not rows:
            continue
        width = len(rows[0])
        consistent = sum(1 for row in rows[1:] if len(row) == width)
        score = (int(width > 1), consistent, width)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _read_head(stream: BinaryIO) -> bytes:
    """The first ``SNIFF_BYTES`` of the file, completed to the end of their last line, so that the
    rest of the stream starts on a line (stdin cannot be rewound: the head is replayed instead)."""
    head = stream.read(SNIFF_BYTES)
    if len(head) == SNIFF_BYTES:
        head += stream.readline()
    return head


def _sample_lines(head: bytes) -> list[str]:
    """The head's lines for sniffing (BOM and NULs dropped, bad UTF-8 replaced)."""
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    text = head.replace(b"\x00", b"").decode("utf-8", errors="replace")
    return [line for line in _LINE_ENDS.split(text) if line]


# Files that are not text at all: what they are and what to do, in the user's words.
_NOT_CSV = (
    (b"PK\x03\x04", "an Excel workbook (.xlsx) or another zip archive, not a CSV file"),
    (b"\xd0\xcf\x11\xe0", "an old Excel workbook (.xls), not a CSV file"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
)


def _check_head(head: bytes, display: str) -> None:
    """Refuse what cannot be a UTF-8 CSV file, before the first line is parsed."""
    if not head:
        raise InvalidInput(f"{display}: the file is empty (expected a header row, then rows)")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InvalidInput(
            f"{display}: the file is UTF-16; save it as UTF-8 (Excel: 'CSV UTF-8') "
            "or convert it: iconv -f UTF-16 -t UTF-8"
        )
    for magic, what in _NOT_CSV:
        if head.startswith(magic):
            raise InvalidInput(
                f"{display}: the file is {what}; in Excel use File > Save As > 'CSV UTF-8'"
            )
    if head.count(b"\x00") * 10 > len(head):
        # Text with a NUL every other byte is UTF-16 saved without its BOM; more is binary.
        raise InvalidInput(
            f"{display}: the file is not text (a tenth or more of its first bytes are NUL): "
            "UTF-16 without a byte order mark, or a binary file; save it as 'CSV UTF-8', or "
            "convert it: iconv -f UTF-16LE -t UTF-8"
        )


_CSV_ERRORS = {
    "unexpected end of data": "a quoted value is never closed (it runs to the end of the file)",
    "new-line character seen in unquoted field": "a line break inside an unquoted value",
    "line contains NUL": "a NUL character (\\0)",
    "expected after": (
        "a closing quote is followed by other characters "
        '(a quote inside a quoted value must be doubled: "")'
    ),
    "field larger than field limit": (
        "a value is longer than {limit} characters (probably an unclosed quote)"
    ),
}


def _csv_error_reason(exc: csv.Error) -> str:
    text = str(exc)
    for needle, reason in _CSV_ERRORS.items():
        if needle in text:
            return reason.format(limit=csv.field_size_limit())
    return f"unreadable CSV: {text}"


def _copy_line(batch_id: str, item: Mapping[str, str]) -> str:
    # COPY text format: JSON escapes every control character, so only backslashes need doubling.
    payload = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
    return f"{batch_id}\t{payload.replace(chr(92), chr(92) * 2)}\n"


def _clean(value: str) -> str:
    return value.strip()  # NULs are gone already (_Lines)


def parse_steps(steps: str | Sequence[str]) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]`` -> ``("a", "b")``; refuses an empty list and repeats."""
    names = steps.split(",") if isinstance(steps, str) else list(steps)
    cleaned = tuple(name.strip() for name in names if name.strip())
    if not cleaned:
        raise InvalidInput("no steps given: name at least one step (e.g. --steps step_a,step_b)")
    repeated = sorted({name for name in cleaned if cleaned.count(name) > 1})
    if repeated:
        raise InvalidInput(
            f"step(s) named more than once: {', '.join(repeated)}; each step runs once per item"
        )
    return cleaned


@dataclass(frozen=True, slots=True)
class RegisteredStep:
    """A step's registry row, as far as the import needs it."""

    function: str  # modal_function_name: the key of shared.steps.HANDLERS and INPUTS
    config: Mapping[str, Any]


async def check_steps(
    conn: psycopg.AsyncConnection[Any], steps: Sequence[str]
) -> dict[str, RegisteredStep]:
    """Refuse steps missing from ``enrichment_registry``, listing the known ones; return the
    registry rows of ``steps``."""
    cur = await conn.execute(_REGISTRY_STEPS)
    rows = {
        str(name): RegisteredStep(str(function), config if isinstance(config, dict) else {})
        for name, function, config in await cur.fetchall()
    }
    known = list(rows)
    unknown = [s for s in steps if s not in known]
    if unknown:
        listed = ", ".join(known) if known else "(none registered)"
        hints = [
            f"{step!r} -> did you mean {close[0]!r}?"
            for step in unknown
            if (close := difflib.get_close_matches(step, known, n=1))
        ]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise InvalidInput(f"unknown step(s): {', '.join(unknown)}; known steps: {listed}{hint}")
    return {step: rows[step] for step in steps}


async def import_csv(
    target: psycopg.AsyncConnection[Any] | str,
    path: str | os.PathLike[str],
    steps: str | Sequence[str],
    *,
    client_id: UUID | None = None,
    name: str | None = None,
    skip_invalid: bool = False,
    delimiter: str | None = None,
    progress: ProgressCallback | None = None,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    budget_usd: float | None = None,
    use_cache: bool = True,
    columns: str | Sequence[str] | None = None,
    priority: int = 0,
) -> ImportReport:
    """Import the CSV at ``path`` (``"-"``: standard input) as a new batch running ``steps``;
    returns what was done.

    ``columns`` names the columns of a file without a header row (its first line is then data);
    without it the first line must be a header, and one that looks like data is refused.

    ``target`` is a DSN or an open async connection (the import runs in a transaction of its own,
    or a savepoint if the connection is already in one). ``budget_usd`` caps what the batch's paid
    steps may spend; ``use_cache`` False makes them call their provider even for cached inputs.
    ``priority`` orders the batch among its tenant's batches at claim time (higher first).
    Raises ``InvalidInput`` (``MalformedCsv`` for malformed rows) with nothing written.
    """
    if budget_usd is not None and not budget_usd >= 0:
        raise InvalidInput(f"a budget is an amount of USD >= 0, got {budget_usd}")
    if isinstance(target, str):
        try:
            conn = await psycopg.AsyncConnection.connect(target, autocommit=True)
        except psycopg.Error as exc:
            raise translate_db_error(exc) from exc
        async with conn:
            return await import_csv(
                conn,
                path,
                steps,
                client_id=client_id,
                name=name,
                skip_invalid=skip_invalid,
                delimiter=delimiter,
                progress=progress,
                progress_every=progress_every,
                budget_usd=budget_usd,
                use_cache=use_cache,
                columns=columns,
                priority=priority,
            )
    try:
        return await _import(
            target,
            Path(path),
            parse_steps(steps),
            client_id=client_id,
            name=name,
            skip_invalid=skip_invalid,
            delimiter=delimiter,
            progress=progress,
            progress_every=max(1, progress_every),
            budget_usd=budget_usd,
            use_cache=use_cache,
            columns=columns,
            priority=priority,
        )
    except psycopg.Error as exc:
        raise translate_db_error(exc) from exc


async def _import(
    conn: psycopg.AsyncConnection[Any],
    path: Path,
    steps: tuple[str, ...],
    *,
    client_id: UUID | None,
    name: str | None,
    skip_invalid: bool,
    delimiter: str | None,
    progress: ProgressCallback | None,
    progress_every: int,
    budget_usd: float | None = None,
    use_cache: bool = True,
    columns: str | Sequence[str] | None = None,
    priority: int = 0,
) -> ImportReport:
    if delimiter is not None and delimiter not in DELIMITERS:
        raise InvalidInput(f"delimiter must be one of , ; TAB |, got {delimiter!r}")
    given_columns = _parse_columns(columns)
    display = display_name(path)
    started = time.perf_counter()
    with _open_source(path) as stream:
        total_bytes = _size(stream)
        head = _read_head(stream)
        _check_head(head, display)
        bom = head.startswith(codecs.BOM_UTF8)
        sample = _sample_lines(head)
        delimiter_given = delimiter is not None
        if delimiter is None:
            delimiter = sniff_delimiter(sample)
        first_rows = _first_records(sample, delimiter)
        if given_columns is None:
            _refuse_data_as_header(display, first_rows)
        else:
            _refuse_header_as_data(display, first_rows, given_columns)

        lines = _Lines(itertools.chain(io.BytesIO(head), stream), display)
        reader = csv.reader(iter(lines), delimiter=delimiter, strict=True)
        header_row = _read_header(reader, display) if given_columns is None else given_columns
        try:
            headers = map_headers(header_row)
        except InvalidInput as exc:
            where = "" if given_columns is None else "--columns: "
            raise InvalidInput(f"{display}: {where}{exc}") from None
        keys = headers.keys
        width = len(keys)

        registry = await check_steps(conn, steps)
        _refuse_unfed_steps(
            display,
            unfed_steps(steps, registry, keys),
            header_row,
            delimiter,
            header_line=given_columns is None,
        )

        warnings: list[str] = list(headers.warnings)
        if hint := _delimiter_hint(header_row, delimiter, given=delimiter_given):
            warnings.append(hint)
        bad: list[BadRow] = []
        bad_total = 0
        bad_lines = 0  # physical lines in the bad records: an unclosed quote swallows many
        swallowed: list[int] = []  # first lines of records that look like swallowed rows
        imported = 0
        blank = 0
        padded = 0
        rows_read = 0
        next_progress = progress_every
        last_line = reader.line_num

        last_reported: list[ImportProgress] = []

        def report_progress() -> None:
            if progress is None:
                return
            now = ImportProgress(rows_read, imported, bad_total, lines.bytes_read, total_bytes)
            if not last_reported or last_reported[0] != now:
                last_reported[:] = [now]
                progress(now)

        async with conn.transaction():
            cur = await conn.execute(
                _INSERT_BATCH,
                {
                    "client_id": client_id,
                    "name": name,
                    "blueprint": Jsonb(list(steps)),
                    "meta": Jsonb({"source": {"file": display}}),
                    "budget_usd": budget_usd,
                    "use_cache": use_cache,
                    "priority": priority,
                },
            )
            row = await cur.fetchone()
            assert row is not None
            batch_id: UUID = row[0]
            batch_text = str(batch_id)

            async with conn.cursor().copy(_COPY_ITEMS) as copy:
                buffer: list[str] = []
                buffered = 0
                while True:
                    if rows_read >= next_progress:
                        report_progress()
                        next_progress += progress_every
                    start_line = last_line + 1
                    try:
                        record = next(reader)
                    except StopIteration:
                        break
                    except csv.Error as exc:
                        last_line = reader.line_num
                        rows_read += 1
                        bad_total += 1
                        bad_lines += last_line - start_line + 1
                        if len(bad) < max(MAX_KEPT_SKIPPED, MAX_REPORTED_ERRORS):
                            bad.append(BadRow(start_line, _csv_error_reason(exc), last_line))
                        continue
                    last_line = reader.line_num
                    if not any(v.strip() for v in record):
                        blank += 1
                        continue
                    rows_read += 1
                    if len(record) != width:
                        if len(record) > width and not any(v.strip() for v in record[width:]):
                            padded += 1
                            record = record[:width]
                        else:
                            bad_total += 1
                            bad_lines += last_line - start_line + 1
                            if len(bad) < max(MAX_KEPT_SKIPPED, MAX_REPORTED_ERRORS):
                                reason = _width_reason(len(record), width)
                                bad.append(BadRow(start_line, reason, last_line))
                            continue
                    if last_line > start_line and _holds_rows(record, delimiter, width):
                        swallowed.append(start_line)
                    if bad_total and not skip_invalid:
                        # The import is refused: keep scanning to count the bad rows, write nothing.
                        continue
                    item: dict[str, str] = {}
                    for key, value in zip(keys, record, strict=True):
                        cleaned = _clean(value)
                        if cleaned:
                            item[key] = cleaned
                    line = _copy_line(batch_text, item)
                    buffer.append(line)
                    buffered += len(line)
                    imported += 1
                    if buffered >= COPY_CHUNK_CHARS:
                        await copy.write("".join(buffer))
                        buffer.clear()
                        buffered = 0

                if bad_total and not skip_invalid:
                    raise _refusal(display, bad, bad_total, bad_lines)
                if imported == 0:
                    if bad_total:
                        raise InvalidInput(
                            f"{display}: no valid rows: all {bad_total} data row(s) are malformed "
                            f"(first: {bad[0]})"
                        )
                    raise InvalidInput(
                        f"{display}: the file has a header but no data rows; nothing to import"
                    )
                if buffer:
                    await copy.write("".join(buffer))
                streamed = time.perf_counter() - started

            if padded:
                warnings.append(
                    f"{padded} row(s) had empty fields beyond the last column (ignored)"
                )
            if nul_warning := lines.nul_warning():
                warnings.append(nul_warning)
            if swallowed:
                warnings.append(_swallowed_warning(swallowed))
            await conn.execute(
                _UPDATE_META,
                {
                    "id": batch_id,
                    "meta": Jsonb(
                        {
                            "source": {
                                "file": display,
                                "rows_imported": imported,
                                "rows_skipped": bad_total,
                                "delimiter": delimiter,
                                "columns": {c.header: c.key for c in headers.columns},
                                # jsonb objects keep no key order: the CSV's column order, for
                                # exports.
                                "keys": [c.key for c in headers.columns],
                                # Rows spanning lines: what an unclosed quote swallowed.
                                **({"lines_skipped": bad_lines} if bad_lines > bad_total else {}),
                                **({"header_row": False} if given_columns is not None else {}),
                            }
                        }
                    ),
                },
            )
        report_progress()

    return ImportReport(
        batch_id=batch_id,
        rows_imported=imported,
        rows_skipped=bad_total,
        lines_skipped=bad_lines,
        skipped=tuple(bad[:MAX_KEPT_SKIPPED]),
        blank_lines=blank,
        headers=headers,
        delimiter=delimiter,
        bom=bom,
        steps=steps,
        seconds=time.perf_counter() - started,
        stream_seconds=streamed,
        warnings=tuple(warnings),
    )


# Sources ------------------------------------------------------------------------------------------

STDIN = "-"


def display_name(path: str | os.PathLike[str]) -> str:
    """How messages name the file: its name, or "stdin" for ``-``."""
    return "stdin" if str(path) == STDIN else Path(path).name


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes; ``-`` is standard input (left open: it is not ours)."""
    if str(path) == STDIN:
        yield sys.stdin.buffer
        return
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a CSV file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _size(stream: BinaryIO) -> int:
    """The file's size for progress; 0 for a pipe."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
        return 0


# Mistakes caught before anything is written -------------------------------------------------------

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.IGNORECASE)
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\.?", re.IGNORECASE)
_NUMBER = re.compile(r"[-+(]?[$€£¥]?\d[\d\s,.']*%?\)?")
EMAIL, URL, DOMAIN, NUMBER = "an email address", "a web address", "a domain name", "a number"
# Never a column name: one such cell makes the first row data.
_DATA_ONLY = frozenset({EMAIL, URL})
# Kinds that confirm a DOMAIN or NUMBER cell when the cells below it are of them too.
_SAME_KIND = {DOMAIN: frozenset({DOMAIN, URL}), NUMBER: frozenset({NUMBER})}
SNIFF_RECORDS = 6  # the first row and the rows it is compared with


def _data_kind(cell: str) -> str | None:
    """What kind of data value ``cell`` is, when it is one no header would be."""
    text = cell.strip()
    for kind, pattern in ((EMAIL, _EMAIL), (URL, _URL), (DOMAIN, _DOMAIN), (NUMBER, _NUMBER)):
        if pattern.fullmatch(text):
            return kind
    return None


def _first_records(sample: Sequence[str], delimiter: str) -> list[list[str]]:
    """The first non-blank records of the sample (fewer when it is malformed early)."""
    records: list[list[str]] = []
    with contextlib.suppress(csv.Error):
        for record in csv.reader(sample, delimiter=delimiter):
            if any(v.strip() for v in record):
                records.append(record)
                if len(records) == SNIFF_RECORDS:
                    break
    return records


def data_in_header(records: Sequence[Sequence[str]]) -> tuple[int, str, str] | None:
    """(column index, cell, kind) of a cell showing that the first record is data, not names.

    An email or web address is never a column name. A domain or a number could be one
    (``company.name`` in a flattened export, a year ``2023``), so it counts only when the cells
    under it are mostly of the same kind and no cell of the row is a well-known column name.
    """
    if not records:
        return None
    first, rest = records[0], records[1:]
    named = any(normalise_header(cell) in ALIASES for cell in first)
    for i, cell in enumerate(first):
        kind = _data_kind(cell)
        if kind is None or (named and kind not in _DATA_ONLY):
            continue
        if kind in _DATA_ONLY:
            return i, cell.strip(), kind
        below = [row[i] for row in rest if i < len(row) and row[i].strip()]
        alike = sum(1 for value in below if _data_kind(value) in _SAME_KIND[kind])
        if alike * 2 >= len(below):
            return i, cell.strip(), kind
    return None


def suggest_columns(first: Sequence[str]) -> list[str]:
    """Column names for a header-less file, guessed from its first row: ``name,website``."""
    names: list[str] = []
    for i, cell in enumerate(first):
        kind = _data_kind(cell)
        guess = {URL: "website", DOMAIN: "website", EMAIL: "email", None: "name"}.get(kind)
        names.append(guess if guess and guess not in names else f"column_{i + 1}")
    return names


def _refuse_data_as_header(display: str, records: Sequence[Sequence[str]]) -> None:
    found = data_in_header(records)
    if found is None:
        return
    column, cell, kind = found
    columns = ",".join(suggest_columns(records[0]))
    raise InvalidInput(
        f"{display}: line 1 looks like data, not a header row ({cell!r} in column {column + 1} "
        f"is {kind}); the first line must name the columns, or its first company would be "
        f"taken for column names and lost. Add a header line (e.g. {columns}), or import the "
        f"file as it is with --no-header --columns {columns}"
    )


def _parse_columns(columns: str | Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    names = columns.split(",") if isinstance(columns, str) else list(columns)
    if not any(name.strip() for name in names):
        raise InvalidInput("--columns names no column: give them in order, e.g. name,website")
    return names


def _refuse_header_as_data(
    display: str, records: Sequence[Sequence[str]], columns: Sequence[str]
) -> None:
    """With ``columns`` (no header row): refuse a first line that is a header after all, or
    rows of another width than ``columns``, which would make every row malformed."""
    if not records:
        return
    first = records[0]
    keys = {normalise_header(c) for c in columns}
    cells = [normalise_header(cell) for cell in first if cell.strip()]
    if cells and all(c in keys or c in ALIASES for c in cells):
        raise InvalidInput(
            f"{display}: line 1 looks like a header row ({', '.join(c.strip() for c in first)}),"
            " but --no-header says the file has none and would import it as a company; drop "
            "--no-header and --columns to use it as the header"
        )
    if len(first) != len(columns):
        raise InvalidInput(
            f"{display}: --columns names {len(columns)} column(s) ({', '.join(columns)}), but "
            f"line 1 has {len(first)} field(s); name each column, in order"
        )


def unfed_steps(
    steps: Sequence[str],
    registry: Mapping[str, RegisteredStep],
    keys: Sequence[str],
    declared: Mapping[str, InputsOf] = INPUTS,
) -> list[tuple[str, StepInputs]]:
    """The steps of the blueprint that no column (nor an earlier step's result) feeds, each with
    what it reads. Steps with no declared inputs read nothing and are always fed."""
    present = {normalize_key(key) for key in keys}
    unfed: list[tuple[str, StepInputs]] = []
    for position, step in enumerate(steps):
        row = registry.get(step)
        declare = declared.get(row.function) if row is not None else None
        if row is None or declare is None:
            continue
        try:
            needs = declare(row.config)
        except ConfigurationError as exc:
            raise ConfigurationError(f"step {step}: {exc}") from None
        if any(normalize_key(f) in present for f in needs.fields):
            continue
        if any(earlier in needs.steps for earlier in steps[:position]):
            continue
        unfed.append((step, needs))
    return unfed


def _refuse_unfed_steps(
    display: str,
    unfed: Sequence[tuple[str, StepInputs]],
    header_row: Sequence[str],
    delimiter: str,
    *,
    header_line: bool,
) -> None:
    if not unfed:
        return
    lines = []
    for step, needs in unfed:
        after = f", or {' or '.join(needs.steps)} before it in the steps" if needs.steps else ""
        lines.append(f"  {step} needs {needs.what} (any of: {', '.join(needs.fields)}){after}")
    seen = ", ".join(repr(h.strip()) for h in header_row)
    where = "the header (line 1)" if header_line else "--columns"
    hint = _delimiter_hint(header_row, delimiter, given=True)
    raise InvalidInput(
        f"{display}: no column feeds {', '.join(step for step, _ in unfed)}, so every item "
        f"would fail there; nothing was imported.\n" + "\n".join(lines) + "\n"
        f"  {where} has {len(header_row)} column(s): {seen} (names are matched ignoring case "
        "and punctuation; 'Company Website' counts as website). Rename a column or choose "
        "other steps." + (f"\n  {hint}" if hint else "")
    )


def _delimiter_hint(header_row: Sequence[str], delimiter: str, *, given: bool) -> str | None:
    """When the header is one column holding another delimiter: the delimiter is wrong."""
    if len(header_row) != 1:
        return None
    others = [d for d in DELIMITERS if d != delimiter and d in header_row[0]]
    if not others:
        return None
    name = DELIMITER_NAMES[others[0]]
    how = "the delimiter given" if given else "the delimiter found"
    return (
        f"the header is a single column, {header_row[0].strip()!r}, with {name}s in it: "
        f"{how} is {DELIMITER_NAMES[delimiter]}; if the file is separated by {name}s, use "
        f"--delimiter {name}"
    )


def _holds_rows(record: Sequence[str], delimiter: str, width: int) -> bool:
    """A multi-line value whose lines look like whole rows: an unclosed quote swallowed them."""
    if width < 2:
        return False
    for value in record:
        inner = _LINE_ENDS.split(value)
        if len(inner) > 1 and any(line.count(delimiter) >= width - 1 for line in inner[:-1]):
            return True
    return False


def _swallowed_warning(starts: Sequence[int]) -> str:
    shown = ", ".join(map(str, starts[:MAX_NUL_LINES]))
    more = ", ..." if len(starts) > MAX_NUL_LINES else ""
    return (
        f"{len(starts):,} row(s) hold line breaks followed by what look like whole rows, "
        f"starting on line(s) {shown}{more}: an unclosed quote may have merged rows into one; "
        "check the quotes there"
    )


def _read_header(reader: Iterator[list[str]], display: str) -> list[str]:
    """The first non-blank record; leading blank lines are skipped."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            raise InvalidInput(
                f"{display}: the file has no header row (it is empty or blank)"
            ) from None
        except csv.Error as exc:
            raise InvalidInput(f"{display}: the header row: {_csv_error_reason(exc)}") from None
        if any(v.strip() for v in record):
            return record


def _width_reason(fields: int, width: int) -> str:
    more_or_fewer = "more" if fields > width else "fewer"
    return f"{fields} field(s), {more_or_fewer} than the header's {width}"


def _refusal(display: str, bad: Sequence[BadRow], total: int, lines: int) -> MalformedCsv:
    shown = list(bad[:MAX_REPORTED_ERRORS])
    listing = "\n".join(f"  {b}" for b in shown)
    more = f"\n  ... and {total - len(shown)} more" if total > len(shown) else ""
    spanning = f" on {lines:,} lines" if lines > total else ""
    message = (
        f"{display}: {total} malformed row(s){spanning}; nothing was imported "
        f"(skip_invalid / --skip-invalid imports the valid rows and reports these):\n"
        f"{listing}{more}"
    )
    return MalformedCsv(message, shown, total)


__all__ = [
    "ALIASES",
    "CANONICAL_ALIASES",
    "BadRow",
    "Column",
    "HeaderMap",
    "ImportProgress",
    "ImportReport",
    "MalformedCsv",
    "check_steps",
    "import_csv",
    "map_headers",
    "normalise_header",
    "parse_steps",
    "sniff_delimiter",
]
