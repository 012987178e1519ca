"""The text-to-SQL scorer and the sample task (``assets/sql`` in the package's resources).

`sql_scores` / `score_sql` are the ``sql`` metric of task evaluation (`metrics`, `taskeval`): any run
whose answers are SQL, on the SQLite database the user names (the sample warehouse for ``task: sql``).
Two scores for a list of model replies against gold SQL:

* **execution accuracy** -- the prediction runs on the warehouse database and returns
  the same result as the gold query (rows compared as a multiset, or in order when the
  gold query has a top-level ``ORDER BY``; floats rounded; column names ignored, column
  positions not);
* **exact match** -- the prediction equals the gold query up to whitespace, the case of
  keywords and identifiers, comments and a trailing ``;``.

Predictions run on a read-only connection (``mode=ro`` URI, ``PRAGMA query_only`` and an
authorizer that allows reads only) with a time limit per query, so a reply such as
``DROP TABLE orders;`` or a runaway cross join can neither harm the database nor hang
the evaluation; it simply does not match.

Standard library only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .home import resource_dir

DEFAULT_TIMEOUT_S = 2.0    # wall-clock limit for one query
MAX_ROWS = 100_000         # a prediction returning more rows than this does not match
FLOAT_DIGITS = 4           # floats are compared after rounding to this many decimals


# ----------------------------------------------------------------------------- files


def sample_sql_dir() -> Path:
    """The folder of the sample task: ``assets/sql`` in the package's resources."""
    return resource_dir() / "assets" / "sql"


def warehouse_db_path() -> Path:
    """Path of the sample ``warehouse.sqlite``; rebuilt with the generator if missing."""
    path = sample_sql_dir() / "warehouse.sqlite"
    if not path.exists():
        script = sample_sql_dir() / "generate.py"
        spec = importlib.util.spec_from_file_location("_qlora_studio_sql_generate", script)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"cannot load the SQL task generator {script}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_database(path)
    return path


def load_sql_examples(path: str | os.PathLike) -> list[dict]:
    """Read a task jsonl file (one ``{"messages": [system, user, assistant]}`` a line).

    Returns one dict per example: ``messages_prompt`` (the messages before the final
    assistant reply, ready for a chat template), ``question`` (the last user message)
    and ``gold`` (the assistant reply, the gold SQL).
    """
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{lineno}: the last message must be the assistant's gold SQL")
            prompt = messages[:-1]
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            if not users:
                raise ValueError(f"{path}:{lineno}: no user message")
            examples.append({"messages_prompt": prompt, "question": users[-1], "gold": messages[-1]["content"]})
    return examples


# ----------------------------------------------------------------------------- text

# Special tokens of chat templates: <|im_end|>, <|endoftext|>, <|eot_id|>, </s>, ...
_CHAT_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")
_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*[ \t]*\r?\n)?(.*?)(?:```|\Z)", re.S)
_LABEL = re.compile(r"^\s*(?:(?:the\s+)?(?:sqlite|sql)(?:\s+query)?|query|answer|assistant)\s*:\s*", re.I)
_STARTS_SQL = re.compile(
    r"^\s*(?:\(|(?:SELECT|WITH|VALUES|INSERT|UPDATE|DELETE|REPLACE|DROP|CREATE|ALTER|PRAGMA|ATTACH|DETACH|EXPLAIN)\b)", re.I)
_SELECT = r"\bSELECT\b|\bWITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\([^()]*\)\s*)?AS\s*\("
_FIND_SQL_EXACT = re.compile(_SELECT)          # upper-case SELECT first: prose says "select" too
_FIND_SQL_ANYCASE = re.compile(_SELECT, re.I)

# SQL tokens: string literal, quoted identifiers, comments, numbers, words, operators, any char.
_TOKEN = re.compile(
    r"""(?P<str>'(?:[^']|'')*')"""
    r"""|(?P<qid>"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\])"""
    r"""|(?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))"""
    r"""|(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"""
    r"""|(?P<word>[A-Za-z_][A-Za-z0-9_$]*)"""
    r"""|(?P<op><=|>=|<>|!=|==|\|\||<<|>>)"""
    r"""|(?P<other>\S)""",
    re.S,
)


def _tokens(sql: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of ``sql`` without comments; never raises."""
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(sql) if m.lastgroup != "comment"]


def _cut_statement(text: str) -> str:
    """Text up to the first ``;`` or blank line that is outside quotes and comments."""
    for m in _TOKEN.finditer(text):
        if m.lastgroup == "other" and m.group() == ";":
            return text[: m.start()]
    # no ';': stop at a blank line (prose that follows the query)
    gap = re.search(r"\n[ \t]*\r?\n", text)
    if gap:
        inside = [m for m in _TOKEN.finditer(text) if m.lastgroup in ("str", "qid", "comment")
                  and m.start() < gap.start() < m.end()]
        if not inside:
            return text[: gap.start()]
    return text


def extract_sql(text: str) -> str:
    """Pull one SQL statement out of a model reply.

    Drops everything from the first chat special token on (``<|im_end|>``, ...), takes
    the inside of the first markdown code fence if there is one, removes a leading
    label (``SQL:``, ``Query:``, ``Answer:``), skips prose before the first ``SELECT``
    (unless the reply already starts like a statement), and ends the statement at the
    first ``;`` outside string literals (or at a blank line). Returns the statement
    stripped and ending in ``;``, or ``""`` when nothing is left.
    """
    if not text:
        return ""
    parts = [p for p in _CHAT_TOKEN.split(text) if p.strip()]
    # a leading "<|im_start|>assistant" header leaves "assistant\n..." as first part
    text = parts[0] if parts else ""
    fence = _FENCE.search(text)
    if fence:
        text = fence.group(1)
    text = _LABEL.sub("", text, count=1)
    if not _STARTS_SQL.match(text):
        m = _FIND_SQL_EXACT.search(text) or _FIND_SQL_ANYCASE.search(text)
        if m:
            text = text[m.start():]
    sql = _cut_statement(text).strip().rstrip(";").strip()
    return sql + ";" if sql else ""


def normalize_sql(sql: str) -> str:
    """Canonical text of ``sql`` for exact matching.

    Tokens are joined by single spaces (so spacing, line breaks and ``a,b`` vs ``a, b``
    do not matter), comments and trailing ``;`` are dropped, keywords and unquoted
    identifiers are lower-cased (SQLite treats both case-insensitively); string
    literals and quoted identifiers keep their case.
    """
    toks = _tokens(sql)
    while toks and toks[-1] == ("other", ";"):
        toks.pop()
    return " ".join(t.lower() if kind == "word" else t for kind, t in toks)


def exact_match(pred: str, gold: str) -> bool:
    """Whether two SQL strings are equal after :func:`normalize_sql`."""
    return normalize_sql(pred) == normalize_sql(gold)


def _has_top_level_order_by(sql: str) -> bool:
    """Whether ``sql`` has an ``ORDER BY`` outside parentheses (the result order counts)."""
    depth, prev = 0, None
    for kind, t in _tokens(sql):
        if kind == "other" and t == "(":
            depth += 1
        elif kind == "other" and t == ")":
            depth -= 1
        elif kind == "word" and depth == 0 and prev == "order" and t.lower() == "by":
            return True
        prev = t.lower() if kind == "word" else None
    return False


# ----------------------------------------------------------------------------- execution

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
if hasattr(sqlite3, "SQLITE_RECURSIVE"):
    _ALLOWED_ACTIONS.add(sqlite3.SQLITE_RECURSIVE)


def _authorizer(action, arg1, arg2, db_name, trigger):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


@contextmanager
def _read_only(db) -> Iterator[sqlite3.Connection]:
    """A connection that can only read: a ``mode=ro`` connection to a path, or the
    caller's connection with ``query_only`` and a read-only authorizer for the duration
    (both are restored afterwards)."""
    if isinstance(db, sqlite3.Connection):
        conn, own = db, False
    else:
        path = Path(db).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no database at {path}")
        conn, own = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True), True
    was_query_only = conn.execute("PRAGMA query_only").fetchone()[0]
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(_authorizer)
    try:
        yield conn
    finally:
        conn.set_authorizer(None)
        conn.set_progress_handler(None, 0)
        if not was_query_only:
            conn.execute("PRAGMA query_only = OFF")
        if own:
            conn.close()


def _run(conn: sqlite3.Connection, sql: str, timeout_s: float) -> list[tuple]:
    """Rows of one query, rounded for comparison; raises on any failure or timeout."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    try:
        cur = conn.execute(sql)
        if cur.description is None:
            raise sqlite3.ProgrammingError("not a query that returns rows")
        rows = cur.fetchmany(MAX_ROWS + 1)
        cur.close()
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > MAX_ROWS:
        raise sqlite3.OperationalError(f"more than {MAX_ROWS} rows")
    return [tuple(_round(v) for v in row) for row in rows]


def _round(v):
    return round(v, FLOAT_DIGITS) if isinstance(v, float) else v


def _try_run(conn, sql: str, timeout_s: float) -> list[tuple] | None:
    try:
        return _run(conn, sql, timeout_s)
    except Exception:  # noqa: BLE001 -- any failure of a prediction is just "no match"
        return None


def _same_result(pred_rows: list[tuple], gold_rows: list[tuple], ordered: bool) -> bool:
    if ordered:
        return pred_rows == gold_rows
    return Counter(pred_rows) == Counter(gold_rows)


def execution_match(db, pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pred`` returns the same result as ``gold`` on the database.

    ``db`` is a path to an SQLite file (opened read-only) or an open connection (made
    read-only while this runs). ``pred`` is SQL text (use :func:`extract_sql` on raw
    model replies). Rows are compared as a multiset, or in order when ``gold`` has a
    top-level ``ORDER BY``; floats are rounded to 4 decimals; column names are ignored
    but column positions count. A prediction that fails in any way (syntax error,
    several statements, a write, a timeout) gives ``False``. A gold query that fails
    raises ``sqlite3.Error``: the data set is broken.
    """
    with _read_only(db) as conn:
        gold_rows = _run(conn, gold, timeout_s)
        pred_rows = _try_run(conn, pred, timeout_s)
    return pred_rows is not None and _same_result(pred_rows, gold_rows, _has_top_level_order_by(gold))


def sql_scores(predictions: Sequence[str], golds: Sequence[str], db_path, *,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Each model reply against its gold SQL: ``executed`` (the same result on the database), ``exact``
    (`exact_match` after `extract_sql`) and ``error`` (the prediction failed to execute; empty ones included)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold queries")
    out = []
    with _read_only(db_path) as conn:
        for raw, gold in zip(predictions, golds):
            pred = extract_sql(raw)
            gold_rows = _run(conn, gold, timeout_s)
            pred_rows = _try_run(conn, pred, timeout_s)
            out.append({"executed": pred_rows is not None and _same_result(pred_rows, gold_rows, _has_top_level_order_by(gold)),
                        "exact": exact_match(pred, gold), "error": pred_rows is None})
    return out


def score_sql(predictions: Sequence[str], golds: Sequence[str], db_path, *,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Score model replies against gold SQL on one database.

    Each prediction first goes through :func:`extract_sql`. Returns ``n``,
    ``execution_accuracy`` and ``exact_match`` (fractions 0-1; 0.0 when ``n`` is 0)
    and ``errors``: how many predictions failed to execute (empty ones included).
    """
    each = sql_scores(predictions, golds, db_path, timeout_s=timeout_s)
    n = len(each)
    return {
        "n": n,
        "execution_accuracy": sum(e["executed"] for e in each) / n if n else 0.0,
        "exact_match": sum(e["exact"] for e in each) / n if n else 0.0,
        "errors": sum(e["error"] for e in each),
    }
