"""The text-to-SQL sample task (qlora_studio/resources/assets/sql) and its evaluation (qlora_studio.evaluate)."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_studio import evaluate
from qlora_studio.evaluate import (
    exact_match,
    execution_match,
    extract_sql,
    load_sql_examples,
    normalize_sql,
    sample_sql_dir,
    score_sql,
    warehouse_db_path,
)

SQL_DIR = Path(__file__).resolve().parent.parent / "qlora_studio" / "resources" / "assets" / "sql"
DB = SQL_DIR / "warehouse.sqlite"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dump(path: Path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)


@pytest.fixture(scope="module")
def train():
    return _rows(SQL_DIR / "train.jsonl")


@pytest.fixture(scope="module")
def test():
    return _rows(SQL_DIR / "test.jsonl")


# ----------------------------------------------------------------------------- data


def test_paths_point_at_the_committed_assets():
    assert sample_sql_dir() == SQL_DIR
    assert warehouse_db_path() == DB
    assert DB.is_file() and DB.stat().st_size < 1_000_000


def test_generator_reproduces_committed_files(tmp_path):
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(SQL_DIR / "generate.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    for name in ("train.jsonl", "test.jsonl"):
        assert (out / name).read_bytes() == (SQL_DIR / name).read_bytes(), name
    assert _dump(out / "warehouse.sqlite") == _dump(DB)


def test_database_schema_and_content():
    con = _ro(DB)
    try:
        cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")]
                for t in ("regions", "customers", "products", "orders", "order_items")}
        assert cols == {
            "regions": ["region_id", "name"],
            "customers": ["customer_id", "name", "email", "region_id", "signup_date"],
            "products": ["product_id", "name", "category", "unit_price"],
            "orders": ["order_id", "customer_id", "order_date", "status"],
            "order_items": ["order_item_id", "order_id", "product_id", "quantity", "unit_price"],
        }
        for t, pk in (("regions", "region_id"), ("customers", "customer_id"), ("products", "product_id"),
                      ("orders", "order_id"), ("order_items", "order_item_id")):
            assert [r[1] for r in con.execute(f"PRAGMA table_info({t})") if r[5]] == [pk]
        fks = {t: sorted((r[3], r[2], r[4]) for r in con.execute(f"PRAGMA foreign_key_list({t})"))
               for t in ("customers", "orders", "order_items")}
        assert fks == {
            "customers": [("region_id", "regions", "region_id")],
            "orders": [("customer_id", "customers", "customer_id")],
            "order_items": [("order_id", "orders", "order_id"), ("product_id", "products", "product_id")],
        }
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []

        def one(sql):
            return con.execute(sql).fetchone()[0]

        assert 4 <= one("SELECT COUNT(*) FROM regions") <= 6
        assert 200 <= one("SELECT COUNT(*) FROM customers") <= 600
        assert 30 <= one("SELECT COUNT(*) FROM products") <= 50
        assert 5 <= one("SELECT COUNT(DISTINCT category) FROM products") <= 8
        assert 200 <= one("SELECT COUNT(*) FROM orders") <= 1000
        statuses = {r[0] for r in con.execute("SELECT DISTINCT status FROM orders")}
        assert statuses == {"shipped", "pending", "cancelled", "delivered"}
        for col, table in (("order_date", "orders"), ("signup_date", "customers")):
            lo, hi = con.execute(f"SELECT MIN({col}), MAX({col}) FROM {table}").fetchone()
            assert "2023-01-01" <= lo <= hi <= "2024-12-31"
            assert one(f"SELECT COUNT(*) FROM {table} WHERE {col} NOT GLOB '202[34]-[01][0-9]-[0-3][0-9]'") == 0
    finally:
        con.close()


def test_every_gold_sql_executes_and_few_are_empty(train, test):
    con = _ro(DB)
    try:
        empty = 0
        golds = [ex["messages"][-1]["content"] for ex in train + test]
        for sql in golds:
            rows = con.execute(sql).fetchall()  # raises if a gold query is broken
            if not rows or rows == [(None,)]:
                empty += 1
        assert empty <= 0.10 * len(golds)
    finally:
        con.close()


def test_split_sizes_and_no_leak(train, test):
    assert len(train) >= 250 and len(test) >= 35
    train_q = {ex["messages"][1]["content"] for ex in train}
    train_sql = {ex["messages"][2]["content"] for ex in train}
    assert len(train_q) == len(train)  # no duplicate questions
    for ex in test:
        assert ex["messages"][1]["content"] not in train_q
        # stronger, by construction: test slot values (hence gold SQL) are unseen in train
        assert ex["messages"][2]["content"] not in train_sql


def test_examples_are_short_chats_in_one_sql_style(train, test):
    systems = {ex["messages"][0]["content"] for ex in train + test}
    assert len(systems) == 1
    system = systems.pop()
    assert len(system.split()) < 25
    for t in ("regions", "customers", "products", "orders", "order_items"):
        assert t in system
    for ex in train + test:
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        sql = ex["messages"][2]["content"]
        outside_literals = re.sub(r"'[^']*'", "''", sql)
        assert sql.startswith("SELECT ") and sql.endswith(";") and sql.count(";") == 1
        assert "  " not in sql and "\n" not in sql and "--" not in sql and '"' not in sql
        assert not re.search(r"\b(select|from|where|join|on|group|order|by|having|limit|and|as|desc|like|between)\b",
                             outside_literals), sql
        assert len(ex["messages"][1]["content"].split()) + len(sql.split()) <= 60


def test_load_sql_examples(tmp_path, test):
    examples = load_sql_examples(SQL_DIR / "test.jsonl")
    assert len(examples) == len(test)
    first = examples[0]
    assert set(first) == {"messages_prompt", "question", "gold"}
    assert first["messages_prompt"] == test[0]["messages"][:2]
    assert first["question"] == test[0]["messages"][1]["content"]
    assert first["gold"] == test[0]["messages"][2]["content"]

    p = tmp_path / "mini.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                                 {"role": "assistant", "content": "SELECT 1;"}]}) + "\n\n", encoding="utf-8")
    assert load_sql_examples(p) == [{"messages_prompt": [{"role": "system", "content": "S"},
                                                         {"role": "user", "content": "Q?"}],
                                     "question": "Q?", "gold": "SELECT 1;"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"}]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_sql_examples(bad)


def test_warehouse_db_path_rebuilds_a_missing_database(tmp_path, monkeypatch):
    shutil.copy(SQL_DIR / "generate.py", tmp_path / "generate.py")
    monkeypatch.setattr(evaluate, "sample_sql_dir", lambda: tmp_path)
    path = warehouse_db_path()
    assert path == tmp_path / "warehouse.sqlite" and path.is_file()
    assert _dump(path) == _dump(DB)


# ----------------------------------------------------------------------------- extract / exact


@pytest.mark.parametrize("reply, expected", [
    ("SELECT name FROM products;", "SELECT name FROM products;"),
    ("SELECT name FROM products", "SELECT name FROM products;"),
    ("  SELECT name FROM products ;;  ", "SELECT name FROM products;"),
    ("```sql\nSELECT name\nFROM products;\n```", "SELECT name\nFROM products;"),
    ("Here you go:\n```\nSELECT 1;\n```\nHope it helps.", "SELECT 1;"),
    ("SQL: SELECT COUNT(*) FROM orders;", "SELECT COUNT(*) FROM orders;"),
    ("Query:\nSELECT COUNT(*) FROM orders", "SELECT COUNT(*) FROM orders;"),
    ("SELECT COUNT(*) FROM orders;<|im_end|>", "SELECT COUNT(*) FROM orders;"),
    ("SELECT 1<|im_end|>\n<|im_start|>user\nSELECT 2;", "SELECT 1;"),
    ("<|im_start|>assistant\nSELECT 1;<|im_end|>", "SELECT 1;"),
    ("SELECT 1; -- the answer\nSELECT 2;", "SELECT 1;"),
    ("SELECT name FROM customers WHERE name = 'a;b'; trailing", "SELECT name FROM customers WHERE name = 'a;b';"),
    ("The query is SELECT name FROM products", "SELECT name FROM products;"),
    ("SELECT name FROM products\n\nThis lists every product.", "SELECT name FROM products;"),
    ("DROP TABLE orders;", "DROP TABLE orders;"),
    ("", ""),
    ("<|im_end|>", ""),
])
def test_extract_sql(reply, expected):
    assert extract_sql(reply) == expected


def test_normalize_and_exact_match():
    gold = "SELECT name FROM regions WHERE name = 'North';"
    assert exact_match("select name\n  from REGIONS where name='North'", gold)
    assert exact_match("SELECT name FROM regions WHERE name = 'North'  ;", gold)
    assert not exact_match("SELECT name FROM regions WHERE name = 'north';", gold)   # literal case counts
    assert not exact_match("SELECT region_id FROM regions WHERE name = 'North';", gold)
    assert not exact_match("SELECT r.name FROM regions r WHERE r.name = 'North';", gold)  # same result, other text
    assert exact_match("SELECT COUNT( * ) FROM orders", "SELECT COUNT(*) FROM orders;")
    assert exact_match("SELECT a,b FROM t -- note", "SELECT a, b FROM t;")
    assert normalize_sql("SELECT  Name FROM t WHERE x = 'Ab  C' ;") == "select name from t where x = 'Ab  C'"


# ----------------------------------------------------------------------------- execution


NORTH_GOLD = "SELECT c.name FROM customers c JOIN regions r ON c.region_id = r.region_id WHERE r.name = 'North';"


def test_execution_match_equivalent_wrong_and_garbage():
    equivalent = "select name from customers where region_id in (select region_id from regions where name = 'North')"
    assert execution_match(DB, equivalent, NORTH_GOLD)
    assert execution_match(DB, NORTH_GOLD.replace("c.name", "c.name AS customer_name"), NORTH_GOLD)  # names ignored
    assert not execution_match(DB, NORTH_GOLD.replace("'North'", "'South'"), NORTH_GOLD)
    assert not execution_match(DB, NORTH_GOLD.replace("'North'", "'north'"), NORTH_GOLD)  # empty result
    for garbage in ("", "hello there", "SELECT FROM WHERE;", "SELECT nope FROM customers;",
                    "SELECT name FROM customers; SELECT 1;", "SELECT name FROM customers WHERE name = 'x"):
        assert execution_match(DB, garbage, NORTH_GOLD) is False


def test_column_positions_count_but_not_names():
    gold = "SELECT name, unit_price FROM products WHERE category = 'Books';"
    assert execution_match(DB, "SELECT p.name AS n, p.unit_price AS price FROM products p WHERE p.category = 'Books'", gold)
    assert not execution_match(DB, "SELECT unit_price, name FROM products WHERE category = 'Books'", gold)
    assert not execution_match(DB, "SELECT name FROM products WHERE category = 'Books'", gold)


def test_floats_are_compared_rounded():
    gold = "SELECT AVG(unit_price) FROM products WHERE category = 'Books';"
    assert execution_match(DB, "SELECT ROUND(AVG(unit_price), 6) FROM products WHERE category = 'Books'", gold)
    assert execution_match(DB, "SELECT SUM(unit_price) / COUNT(*) FROM products WHERE category = 'Books'", gold)
    assert not execution_match(DB, "SELECT ROUND(AVG(unit_price), 1) FROM products WHERE category = 'Books'", gold)


def test_ordered_only_when_gold_orders():
    ordered = "SELECT name, unit_price FROM products WHERE category = 'Toys' ORDER BY unit_price DESC;"
    ascending = "SELECT name, unit_price FROM products WHERE category = 'Toys' ORDER BY unit_price;"
    unordered = "SELECT name, unit_price FROM products WHERE category = 'Toys';"
    assert execution_match(DB, ordered, ordered)
    assert not execution_match(DB, ascending, ordered)        # same rows, wrong order
    assert not execution_match(DB, unordered, ordered)
    assert execution_match(DB, ascending, unordered)          # gold has no ORDER BY: any order
    assert execution_match(DB, ordered, unordered)
    # an ORDER BY inside a subquery does not make the comparison ordered
    sub = "SELECT name, unit_price FROM (SELECT * FROM products ORDER BY unit_price) WHERE category = 'Toys';"
    assert execution_match(DB, ascending.replace("ORDER BY unit_price", "ORDER BY name DESC"), sub)
    # top-n: right rows only with the right direction
    top2 = "SELECT name FROM products ORDER BY unit_price DESC LIMIT 2;"
    assert execution_match(DB, "SELECT name FROM products ORDER BY -unit_price LIMIT 2", top2)
    assert not execution_match(DB, "SELECT name FROM products ORDER BY unit_price LIMIT 2", top2)


def test_writes_are_rejected_and_the_database_is_unchanged(tmp_path):
    before_dump, before_bytes = _dump(DB), DB.read_bytes()
    gold = "SELECT COUNT(*) FROM orders;"
    for evil in ("DROP TABLE orders;", "DELETE FROM orders;", "UPDATE orders SET status = 'x';",
                 "INSERT INTO regions VALUES (99, 'Mars');", "CREATE TABLE t (x);",
                 f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x;", "PRAGMA query_only = OFF;"):
        assert execution_match(DB, evil, gold) is False
    assert score_sql(["DROP TABLE orders;", "DELETE FROM order_items"], [gold, gold], DB)["errors"] == 2
    assert _dump(DB) == before_dump and DB.read_bytes() == before_bytes
    assert not (tmp_path / "x.db").exists()

    # an open, writable connection is made read-only for the call and restored afterwards
    copy = tmp_path / "copy.sqlite"
    shutil.copy(DB, copy)
    con = sqlite3.connect(copy)
    try:
        assert execution_match(con, "DROP TABLE orders", gold) is False
        assert execution_match(con, "SELECT COUNT(*) FROM orders", gold) is True
        assert con.execute("SELECT COUNT(*) FROM orders").fetchone()[0] > 0
        con.execute("CREATE TABLE scratch (x)")  # still writable for its owner
        con.execute("DROP TABLE scratch")
    finally:
        con.close()


def test_runaway_query_is_cut_off():
    t0 = time.monotonic()
    slow = "SELECT COUNT(*) FROM order_items a, order_items b, order_items c"
    assert execution_match(DB, slow, "SELECT COUNT(*) FROM orders;", timeout_s=0.3) is False
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n"
    assert execution_match(DB, endless, "SELECT 1;", timeout_s=0.3) is False
    assert time.monotonic() - t0 < 5


def test_bad_gold_raises():
    with pytest.raises(sqlite3.Error):
        execution_match(DB, "SELECT 1", "SELECT nope FROM nowhere;")


def test_score_sql_on_a_handcrafted_list():
    golds = [
        "SELECT COUNT(*) FROM orders WHERE status = 'pending';",
        NORTH_GOLD,
        "SELECT name FROM products WHERE category = 'Books';",
        "SELECT email FROM customers WHERE customer_id = 1;",
        "SELECT COUNT(*) FROM regions;",
    ]
    preds = [
        "```sql\nSELECT COUNT(*) FROM orders WHERE status = 'pending';\n```",         # exact + executes
        "SELECT name FROM customers WHERE region_id = (SELECT region_id FROM regions WHERE name = 'North')<|im_end|>",
        "SELECT name FROM products WHERE category = 'Toys';",                           # wrong filter
        "I don't know.",                                                                # error
        "select count(*) from regions",                                                 # exact, other case
    ]
    assert score_sql(preds, golds, DB) == {"n": 5, "execution_accuracy": 0.6, "exact_match": 0.4, "errors": 1}
    assert score_sql([], [], DB) == {"n": 0, "execution_accuracy": 0.0, "exact_match": 0.0, "errors": 0}
    with pytest.raises(ValueError):
        score_sql(["SELECT 1;"], [], DB)


def test_gold_answers_match_themselves_through_the_scorer(test):
    golds = [ex["messages"][2]["content"] for ex in test]
    replies = [g + "<|im_end|>" for g in golds]
    assert score_sql(replies, golds, warehouse_db_path()) == {
        "n": len(golds), "execution_accuracy": 1.0, "exact_match": 1.0, "errors": 0}
