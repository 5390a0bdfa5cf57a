"""Metadata tables as publishers ship them: CSV or Excel, a title line above the header, columns named twice,
column names whose case changed between releases, and data dictionaries or notes lying beside the table.

:func:`find_tables` picks the file(s) that hold the columns a builder needs and says which it ignored and why;
:func:`read_table` reads one. Rows come back keyed by the *needed* names, so a builder never sees how a release
spelled them. Excel is read with openpyxl (read-only, cached values, never formulas).
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import ManifestError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xlsm")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
HEADER_SEARCH = 25  # rows searched for the header (title lines, notes and blank lines above it)


@dataclass
class Table:
    """One metadata table: rows keyed by the needed column names, each with its file line (or sheet row)."""

    file: Path
    sheet: str  # "" for CSV
    header_line: int
    rows: list[dict[str, str]]
    lines: list[int]
    notes: list[str] = field(default_factory=list)  # duplicated columns, renamed columns

    @property
    def name(self) -> str:
        return f"{self.file.name} (sheet {self.sheet})" if self.sheet else self.file.name

    def where(self, i: int) -> str:
        """``file:line`` (``file[sheet]:row``) of row ``i``, for messages."""
        return f"{self.file.name}{f'[{self.sheet}]' if self.sheet else ''}:{self.lines[i]}"


class MissingColumns(ManifestError):
    """A file without the needed table; ``found`` counts the needed columns it does have, ``reason`` says in
    a few words why it is not the table."""

    def __init__(self, message: str, found: int, reason: str = "lacks the needed columns (e.g. a data dictionary)"):
        super().__init__(message)
        self.found, self.reason = found, reason


def cell_text(value: object) -> str:
    """A cell as text: None -> '', 1.0 -> '1', dates ISO, the rest stripped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value).strip()


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def resolve_columns(needed: Sequence[str], header: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Position of each needed column in ``header``: an exact match first, else the one header whose name
    matches ignoring case and spacing (``Patientid`` for ``patientid``). Returns positions and the names absent.
    A name written twice resolves to its first position."""
    exact: dict[str, int] = {}
    loose: dict[str, list[int]] = {}
    for i, name in enumerate(header):
        exact.setdefault(name, i)
        loose.setdefault(_key(name), []).append(i)
    found, absent = {}, []
    for name in needed:
        if name in exact:
            found[name] = exact[name]
        elif len({header[i] for i in loose.get(_key(name), [])}) == 1:
            found[name] = loose[_key(name)][0]
        else:
            absent.append(name)
    return found, absent


def _closest(absent: Iterable[str], header: Sequence[str]) -> str:
    spelled = {_key(h): h for h in reversed(header) if h}
    pairs = []
    for name in absent:
        near = difflib.get_close_matches(_key(name), list(spelled), n=1, cutoff=0.5)
        pairs.append(f"{name!r} -> {spelled[near[0]]!r}" if near else f"{name!r} -> none")
    return "; ".join(pairs)


def _csv_rows(file: Path) -> list[list[str]]:
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = file.read_bytes().decode("cp1252", errors="replace")  # spreadsheets saved on Windows
    except OSError as err:
        raise ManifestError(f"{file}: cannot read ({err.strerror})") from None
    head = text.splitlines()[:HEADER_SEARCH]
    delimiter = "\t" if file.suffix == ".tsv" else max(",;\t", key=lambda d: sum(line.count(d) for line in head))
    return [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text), delimiter=delimiter)]


def _excel_sheets(file: Path):
    try:
        import openpyxl
    except ImportError:
        raise ManifestError(f"{file}: reading Excel needs openpyxl (pip install openpyxl)") from None
    try:
        return openpyxl.load_workbook(file, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile, KeyError and its own errors for a damaged file
        raise ManifestError(f"{file}: not a readable Excel workbook ({type(err).__name__}: {err})") from None


def _sheet_rows(sheet) -> list[list[str]]:
    return [[cell_text(v) for v in row] for row in sheet.iter_rows(values_only=True)]


def _locate(rows: list[list[str]], needed: Sequence[str], file: str) -> tuple[int, dict[str, int]]:
    """The header row (index) holding every needed column, searched from the top; MissingColumns names the
    closest row's near misses."""
    best, best_found = 0, -1
    for i, row in enumerate(rows[:HEADER_SEARCH]):
        found, absent = resolve_columns(needed, row)
        if not absent:
            return i, found
        if len(found) > best_found:
            best, best_found = i, len(found)
    header = rows[best] if rows else []
    _, absent = resolve_columns(needed, header)
    shown = ", ".join(h for h in header if h)[:300]
    raise MissingColumns(
        f"{file}: no column(s) {absent} (needs {list(needed)}; closest: {_closest(absent, header)}; "
        f"columns: {shown or 'none'})",
        max(best_found, 0),
    )


def _duplicates(rows: list[list[str]], header: list[str], found: dict[str, int], name: str) -> list[str]:
    """Notes on needed columns the header names twice: the first copy is read; say whether the others differ."""
    notes = []
    for first in found.values():
        copies = [i for i, h in enumerate(header) if h == header[first] and i != first]
        if not copies:
            continue
        differ = sum(1 for r in rows if any(_cell(r, first) != _cell(r, i) for i in copies))
        notes.append(f"{name}: column {header[first]!r} appears {len(copies) + 1} times; the first is read"
                     + (f" ({differ} rows differ in the others)" if differ else " (the copies agree)"))
    return notes


def _cell(row: list[str], i: int) -> str:
    return row[i] if i < len(row) else ""


def _table(file: Path, sheet: str, rows: list[list[str]], needed: Sequence[str], line_offset: int) -> Table:
    label = f"{file}[{sheet}]" if sheet else str(file)
    at, found = _locate(rows, needed, label)
    header, body = rows[at], rows[at + 1:]
    notes = _duplicates(body, header, found, label)
    notes += [f"{label}: column {header[i]!r} read as {name!r}" for name, i in found.items() if header[i] != name]
    out, lines = [], []
    for j, row in enumerate(body):
        if not any(row):
            continue
        out.append({name: _cell(row, i) for name, i in found.items()})
        lines.append(at + j + 1 + line_offset)
    if not out:
        raise ManifestError(f"{label}: empty table (no rows below the header on line {at + line_offset})")
    return Table(file, sheet, at + line_offset, out, lines, notes)


def read_table(file: Path, needed: Sequence[str], sheet: str = "") -> Table:
    """The rows of ``file`` (CSV or Excel) under the first row holding every ``needed`` column.

    Excel: ``sheet`` by name (ignored for CSV), else the first sheet that holds the columns. Line numbers are
    1-based, as a spreadsheet shows them. MissingColumns (one line, with the closest names found) when no row
    qualifies."""
    suffix = file.suffix.lower()
    if suffix == ".xls":
        raise ManifestError(f"{file}: the old .xls format is not read; open it and save it as .xlsx")
    if suffix not in EXCEL_SUFFIXES:  # a sheet name applies to workbooks only (a CSV export has one table)
        return _table(file, "", _csv_rows(file), needed, 1)
    book = _excel_sheets(file)
    try:
        names = book.sheetnames
        if sheet and sheet not in names:
            raise MissingColumns(f"{file}: no sheet {sheet!r} (sheets: {', '.join(names)})", -1, f"no sheet {sheet!r}")
        missing: MissingColumns | None = None
        for name in [sheet] if sheet else names:
            try:
                return _table(file, name, _sheet_rows(book[name]), needed, 1)
            except MissingColumns as err:
                missing = missing if missing and missing.found >= err.found else err
        assert missing is not None
        raise missing
    finally:
        book.close()


def find_tables(files: Sequence[Path], needed: Sequence[str], sheet: str = "", several: bool = False,
                what: str = "metadata") -> tuple[list[Table], list[str]]:
    """The table(s) among ``files`` that hold the needed columns, and one note per file left aside and why
    (a data dictionary beside the table, a README). Refused in one line: no file qualifies (the nearest one's
    missing columns), two qualify where one is expected, or one table present twice (CSV and Excel)."""
    tables: list[Table] = []
    ignored: list[str] = []
    nearest: MissingColumns | None = None
    for file in sorted(files):
        if file.suffix.lower() not in (*TABLE_SUFFIXES, ".xls"):
            ignored.append(f"{file.name}: not a table")
            continue
        try:
            tables.append(read_table(file, needed, sheet))
        except MissingColumns as err:
            ignored.append(f"{file.name}: {err.reason}")
            nearest = nearest if nearest and nearest.found >= err.found else err
    if not tables:
        if nearest is not None:
            raise nearest
        raise ManifestError(f"no {what} table among {', '.join(f.name for f in files) or 'no files'}")
    stems: dict[str, Path] = {}
    for t in tables:
        if (other := stems.setdefault(t.file.stem, t.file)) != t.file:
            raise ManifestError(f"{t.file}: the same table as {other.name} in another format; keep one of them")
    if len(tables) > 1 and not several:
        names = ", ".join(str(t.file) for t in tables)
        raise ManifestError(f"two candidate {what} tables hold the needed columns: {names}; keep one, or name "
                            "it with --table")
    return tables, ignored
