"""Reading a data file into numbered rows: bytes, encodings, and the JSONL, JSON, CSV and Parquet syntax.

`read_rows` returns each row with the line (JSONL, CSV) or row number (JSON, Parquet) it came from, and a
`DataIssue` for each row it could not read; a problem that spoils the whole file raises `DataError`.
`data` turns the rows into training examples.

Encodings (characters are never replaced):
- UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one, with CRLF line ends);
- UTF-16 and UTF-32, when the file starts with their byte-order mark (Windows "Unicode" text);
- nothing else. In a JSONL or CSV file, a line with bytes that are not UTF-8 is a row error,
  ``file:N (encoding): not UTF-8 (byte 0xE9 at column C); save the file as UTF-8``, and its row is
  skipped. A file written in another encoding altogether (at least two such lines, and either no line
  that uses UTF-8's multi-byte characters or more than a tenth of its lines) is refused, naming the
  first such line. A .json file is one document: any such byte refuses it.

JSON: an object giving a key twice (which parsers silently resolve to the last value) makes its row
an error, ``file:N key: duplicate key "key"`` (the file's error when it is the top-level object of a
.json file); nesting deeper than Python's recursion limit (about 1000 levels) is "nested too deeply",
a row error in JSONL and the file's error in .json. CSV: a header naming a column twice refuses the
file; fields may be of any size (the row character limit is `data`'s); a record the csv module cannot
read is a row error.

The file's sha256 is taken over its raw bytes.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import StudioError

# csv's default field limit (128 KiB) turns a long answer into a traceback; the whole file is in
# memory already, so a field may take any size (a C long, also on Windows). Long rows are `data`'s
# MAX_ROW_CHARS to refuse.
CSV_FIELD_LIMIT = 2**31 - 1
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
         (codecs.BOM_UTF8, None, "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))
SAVE_AS_UTF8 = "save the file as UTF-8"


class DataError(StudioError):
    """The file cannot be used at all; the message names file, line and field."""


@dataclass
class DataIssue:
    line: int  # 1-based line (JSONL, CSV data row incl. header offset) or row number (JSON, Parquet)
    field: str
    message: str

    def format(self, path: str) -> str:
        return f"{path}:{self.line} {self.field}: {self.message}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_rows(path: Path) -> tuple[list[tuple[int, object]], list[DataIssue], str]:
    """Rows as (line, value) pairs, the rows that could not be read (one issue each) and the sha256
    of the file's bytes."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path), [], file_sha256(path)
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    data = _utf8_bytes(path, raw)
    if suffix == ".json":
        rows, issues = _read_json(path, data)
    elif suffix == ".jsonl":
        lines = _Lines(path, data)
        rows, issues = _read_jsonl(lines)
        lines.refuse_if_not_utf8()
    else:
        rows, issues = _read_csv(path, data)
    return rows, issues, sha


# ------------------------------------------------------------------ encodings


def _utf8_bytes(path: Path, raw: bytes) -> bytes:
    """The file's text as UTF-8 bytes without a byte-order mark (UTF-16/32 files are converted)."""
    for bom, codec, name in _BOMS:
        if not raw.startswith(bom):
            continue
        if codec is None:
            return raw[len(bom):]
        try:
            return raw.decode(codec).encode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].decode(codec, errors="replace").count("\n") + 1
            raise DataError(f"{path}:{line} (encoding): the file starts with a {name} byte-order mark but is not "
                            f"valid {name} here ({e.reason}); {SAVE_AS_UTF8}") from None
    sample = raw[:4096]
    if sample and sample.count(0) * 4 >= len(sample):
        raise DataError(f"{path}:1 (encoding): the file is full of NUL bytes: UTF-16 or UTF-32 without a "
                        f"byte-order mark; {SAVE_AS_UTF8}")
    return raw


def _where(line: bytes, offset: int) -> str:
    """Where in ``line`` its byte at ``offset`` is (the column counts characters)."""
    column = len(line[:offset].decode("utf-8", errors="replace")) + 1
    return f"byte 0x{line[offset]:02X} at column {column}"


def _not_utf8(line: bytes, offset: int) -> str:
    return f"not UTF-8 ({_where(line, offset)}); {SAVE_AS_UTF8}"


class _Lines:
    """The lines of UTF-8 bytes (split at \\n, \\r\\n or \\r, ends kept), numbered from 1, as
    ``(line, text)``; a line that is not UTF-8 comes as ``(line, None)`` (``lenient``: as its text with
    replacement characters, for a reader that must see it to skip it) and its issue is in ``bad``."""

    def __init__(self, path: Path, data: bytes, lenient: bool = False):
        self.path, self.data, self.lenient = path, data, lenient
        self.bad: dict[int, DataIssue] = {}
        self.first_bad = ""  # where in its line the first bad byte is
        self.count = self.multibyte = 0

    def __iter__(self):
        for n, b in enumerate(self.data.splitlines(keepends=True), 1):
            self.count = n
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError as e:
                self.bad[n] = DataIssue(n, "(encoding)", _not_utf8(b, e.start))
                self.first_bad = self.first_bad or _where(b, e.start)
                yield n, b.decode("utf-8", errors="replace") if self.lenient else None
                continue
            self.multibyte += not text.isascii()
            yield n, text

    def refuse_if_not_utf8(self) -> None:
        """Raise when the file as a whole is in another encoding (see the module's docstring)."""
        bad = len(self.bad)
        if bad >= 2 and (self.multibyte == 0 or bad * 10 > self.count):
            first = next(iter(self.bad))
            raise DataError(f"{self.path}:{first} (encoding): the file is not UTF-8: {bad} of its {self.count} lines "
                            f"hold other bytes, the first this one ({self.first_bad}); {SAVE_AS_UTF8}")


# ------------------------------------------------------------------ JSON


class _Duplicated(dict):
    """A JSON object that gave ``duplicate`` more than once (it holds the last value)."""

    __slots__ = ("duplicate",)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _repeated(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    return next(k for k, _ in pairs if k in seen or seen.add(k))


def _strict_object(pairs: list[tuple[str, object]]) -> dict:
    """For one row: an object giving a key twice fails it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey(_repeated(pairs))
    return obj


def _marking_object(found: list):
    """For a whole document: an object giving a key twice is marked (and noted in ``found``), to be
    told to its row."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        marked = _Duplicated(obj)
        marked.duplicate = _repeated(pairs)
        found.append(marked)
        return marked

    return hook


def _duplicate_key(value: object) -> str | None:
    """The first key given twice in an object anywhere in ``value`` (iteratively: rows may nest deep)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _Duplicated):
            return v.duplicate
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _duplicate_issue(line: int, key: str) -> DataIssue:
    return DataIssue(line, key, f'duplicate key "{key}"; give each key once')


TOO_DEEP = "nested too deeply (more than about 1000 levels of [ and {)"


def _read_jsonl(lines) -> tuple[list[tuple[int, object]], list[DataIssue]]:
    rows, issues = [], []
    for n, line in lines:
        if line is None:
            issues.append(lines.bad[n])
            continue
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line, object_pairs_hook=_strict_object)))
        except json.JSONDecodeError as e:
            issues.append(DataIssue(n, "(json)", f"not valid JSON: {e.msg} at column {e.colno}"))
        except _DuplicateKey as e:
            issues.append(_duplicate_issue(n, e.key))
        except RecursionError:
            issues.append(DataIssue(n, "(json)", TOO_DEEP))
    return rows, issues


def _read_json(path: Path, data: bytes) -> tuple[list[tuple[int, object]], list[DataIssue]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        line = data[start:end if end >= 0 else len(data)]
        number = data.count(b"\n", 0, start) + 1
        raise DataError(f"{path}:{number} (encoding): {_not_utf8(line, e.start - start)}") from None
    duplicated: list[_Duplicated] = []
    try:
        value = json.loads(text, object_pairs_hook=_marking_object(duplicated))
    except json.JSONDecodeError as e:
        # A .json file with one object per line is really JSONL.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(_Lines(path, data))
        raise DataError(f"{path}:{e.lineno} (json): not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path}:1 (json): {TOO_DEEP}") from None
    if isinstance(value, _Duplicated):
        raise DataError(f"{path}:1 {value.duplicate}: duplicate key \"{value.duplicate}\" in the file's top-level "
                        "object; give each key once")
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}:1 (json): expected a list of rows, or an object holding exactly one list")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}:1 (json): expected a list of rows")
    if not duplicated:
        return list(enumerate(value, 1)), []
    rows, issues = [], []
    for i, v in enumerate(value, 1):
        if (dup := _duplicate_key(v)) is not None:
            issues.append(_duplicate_issue(i, dup))
        else:
            rows.append((i, v))
    return rows, issues


# ------------------------------------------------------------------ CSV and Parquet


def _read_csv(path: Path, data: bytes) -> tuple[list[tuple[int, object]], list[DataIssue]]:
    """Rows of a CSV file with a header. A record that spans a line that is not UTF-8 is skipped with
    that line's issue (its text is read with replacement characters only to find where it ends)."""
    lines = _Lines(path, data, lenient=True)
    text_lines = (line for _, line in lines)
    rows: list[tuple[int, object]] = []
    issues: list[DataIssue] = []
    old_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        reader = csv.reader(text_lines)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num} (header): cannot read the CSV header ({e})") from None
        if not header or (bad := lines.bad.get(1)):
            raise DataError(bad.format(str(path)) if header else f"{path}:1 (header): the CSV file has no header row")
        if dup := next((h for i, h in enumerate(header) if h in header[:i]), None):
            raise DataError(f"{path}:1 (header): column \"{dup}\" appears twice; give each column once")
        end = reader.line_num
        while True:
            start = end + 1
            try:
                record = next(reader, None)
            except csv.Error as e:
                issues.append(DataIssue(reader.line_num, "(csv)", f"cannot read this CSV row ({e})"))
                end = reader.line_num
                continue
            end = reader.line_num
            if record is None:
                break
            if not record:
                continue
            bad = next((lines.bad[n] for n in range(start, end + 1) if n in lines.bad), None)
            if bad is not None:
                issues.append(bad)
                continue
            rows.append((end, {h: (record[i] if i < len(record) else None) for i, h in enumerate(header)}))
    finally:
        csv.field_size_limit(old_limit)
    lines.refuse_if_not_utf8()
    return rows, issues


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}:1 (parquet): cannot read this Parquet file ({e})") from e
    return [(i, v) for i, v in enumerate(table.to_pylist(), 1)]
