"""Generate the text-to-SQL sample task: a small warehouse database and train/test splits.

Deterministic (fixed seed, standard library only). Writes into the folder this script
is in, or into ``--out DIR``:

* ``warehouse.sqlite`` -- regions, customers, products, orders, order_items;
* ``train.jsonl`` / ``test.jsonl`` -- one chat example a line:
  ``{"messages": [system, user (question), assistant (gold SQL)]}``.

Every gold SQL is written in one canonical style so that a small model can learn it:
upper-case keywords, lower-case identifiers, single spaces, single-quoted literals,
no trailing comments, a final ``;``. Single-table queries use no table aliases; joins
start from the "fact" table (order_items, then orders, then customers) and use the
aliases oi, o, c, p, r with ``child.fk = parent.pk``. Aggregates get a column alias
(``AS ...``) only in GROUP BY queries, and HAVING / ORDER BY refer to that alias; a year
or month is matched with ``LIKE '2024%'`` / ``LIKE '2024-03%'``, a date range with
``BETWEEN``; ascending order is written without ``ASC``.

Usage: ``python generate.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import sqlite3
from pathlib import Path

SEED = 20240601

SYSTEM = (
    "Write one SQLite query that answers the question. "
    "Tables: regions, customers, products, orders, order_items."
)

SCHEMA = """
CREATE TABLE regions (
    region_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE customers (
    customer_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    region_id INTEGER NOT NULL REFERENCES regions(region_id),
    signup_date TEXT NOT NULL
);
CREATE TABLE products (
    product_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    category TEXT NOT NULL,
    unit_price REAL NOT NULL
);
CREATE TABLE orders (
    order_id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(customer_id),
    order_date TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'shipped', 'delivered', 'cancelled'))
);
CREATE TABLE order_items (
    order_item_id INTEGER PRIMARY KEY,
    order_id INTEGER NOT NULL REFERENCES orders(order_id),
    product_id INTEGER NOT NULL REFERENCES products(product_id),
    quantity INTEGER NOT NULL,
    unit_price REAL NOT NULL
);
"""

REGIONS = ["North", "South", "East", "West", "Central"]
REGION_WEIGHTS = [30, 24, 20, 15, 11]  # uneven, so regions have distinct sizes

FIRST_NAMES = [
    "Alice", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "Jack",
    "Karen", "Leo", "Maria", "Nathan", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tina",
    "Umar", "Vera", "Walter", "Xenia", "Yusuf", "Zoe",
]
LAST_NAMES = [
    "Adams", "Baker", "Clark", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen",
    "Khan", "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Turner", "Weber",
]

# category -> (product names, price range)
CATALOG = {
    "Electronics": (["Wireless Mouse", "USB-C Hub", "Bluetooth Speaker", "Webcam", "Mechanical Keyboard",
                     "Noise-Cancelling Headphones", "Portable Charger"], (15, 250)),
    "Books": (["Cookbook", "Mystery Novel", "Atlas", "Science Fiction Anthology", "Poetry Collection",
               "History of Rome", "Gardening Guide"], (8, 45)),
    "Clothing": (["Rain Jacket", "Wool Sweater", "Running Shoes", "Denim Jeans", "Cotton T-Shirt",
                  "Winter Gloves", "Baseball Cap"], (10, 120)),
    "Home": (["Coffee Maker", "Desk Lamp", "Throw Blanket", "Chef Knife", "Cutting Board",
              "Ceramic Vase", "Wall Clock"], (12, 150)),
    "Toys": (["Puzzle Set", "Building Blocks", "Plush Bear", "Toy Train", "Kite", "Board Game"], (6, 60)),
    "Sports": (["Yoga Mat", "Tennis Racket", "Water Bottle", "Dumbbell Set", "Bike Helmet",
                "Soccer Ball"], (9, 140)),
}

STATUSES = ["delivered", "shipped", "pending", "cancelled"]
STATUS_WEIGHTS = [55, 20, 12, 13]

N_CUSTOMERS = 300
N_ORDERS = 700
START = dt.date(2023, 1, 1)
END = dt.date(2024, 12, 31)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


# ----------------------------------------------------------------------------- database


def _day(rng: random.Random, lo: dt.date, hi: dt.date) -> dt.date:
    return lo + dt.timedelta(days=rng.randint(0, (hi - lo).days))


def build_database(path: str | os.PathLike) -> Path:
    """Create ``warehouse.sqlite`` at ``path`` (replacing it); same content on every run."""
    path = Path(path)
    rng = random.Random(SEED)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    con = sqlite3.connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO regions VALUES (?, ?)", list(enumerate(REGIONS, start=1)))

        pairs = [(f, l) for f in FIRST_NAMES for l in LAST_NAMES]
        chosen = rng.sample(pairs, N_CUSTOMERS)
        customers = []
        for cid, (first, last) in enumerate(chosen, start=1):
            region_id = rng.choices(range(1, len(REGIONS) + 1), weights=REGION_WEIGHTS)[0]
            signup = _day(rng, START, dt.date(2024, 10, 31))
            customers.append((cid, f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com",
                              region_id, signup.isoformat()))
        con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", customers)

        products = []
        seen_prices: set[float] = set()
        for category, (names, (lo, hi)) in CATALOG.items():
            for name in names:
                while True:  # unique prices: ORDER BY unit_price never ties
                    price = round(rng.uniform(lo, hi), 2)
                    if price not in seen_prices:
                        seen_prices.add(price)
                        break
                products.append((len(products) + 1, name, category, price))
        con.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)

        # Some customers order much more often than others.
        activity = [rng.random() ** 2 + 0.05 for _ in customers]
        raw_orders = []
        for _ in range(N_ORDERS):
            cust = rng.choices(customers, weights=activity)[0]
            signup = dt.date.fromisoformat(cust[4])
            day = _day(rng, signup, END)
            status = rng.choices(STATUSES, weights=STATUS_WEIGHTS)[0]
            raw_orders.append((day.isoformat(), cust[0], status))
        raw_orders.sort()  # order ids follow dates
        orders = [(oid, cid, day, status) for oid, (day, cid, status) in enumerate(raw_orders, start=1)]
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)

        items = []
        for oid, *_ in orders:
            n_lines = rng.choices([1, 2, 3, 4], weights=[35, 35, 20, 10])[0]
            for prod in rng.sample(products, n_lines):
                qty = rng.choices([1, 2, 3, 4, 5], weights=[45, 25, 15, 10, 5])[0]
                items.append((len(items) + 1, oid, prod[0], qty, prod[3]))
        con.executemany("INSERT INTO order_items VALUES (?, ?, ?, ?, ?)", items)
        con.commit()
        con.execute("VACUUM")
    finally:
        con.close()
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- templates
# Each template: phrasings (str.format over a slot dict), the gold SQL (same), and a
# function listing every candidate slot dict from the database. Slots carry both the
# wording used in questions (e.g. "March 2024") and the value used in SQL ("2024-03").


def _months():
    return [{"month": MONTHS[m - 1], "year": y, "ym": f"{y}-{m:02d}"} for y in (2023, 2024) for m in range(1, 13)]


def _col(con, sql):
    return [r[0] for r in con.execute(sql)]


def _regions(con):
    return _col(con, "SELECT name FROM regions ORDER BY region_id")


def _categories(con):
    return _col(con, "SELECT DISTINCT category FROM products ORDER BY category")


TEMPLATES = [
    dict(
        name="count_customers_region_year",
        phrasings=[
            "How many customers in the {region} region signed up in {year}?",
            "Count the customers from {region} who joined in {year}.",
            "What is the number of {region} customers with a signup date in {year}?",
        ],
        sql="SELECT COUNT(*) FROM customers c JOIN regions r ON c.region_id = r.region_id "
            "WHERE r.name = '{region}' AND c.signup_date LIKE '{year}%';",
        slots=lambda con: [{"region": r, "year": y} for r in _regions(con) for y in (2023, 2024)],
    ),
    dict(
        name="customers_region_after_date",
        phrasings=[
            "List the names of customers in the {region} region who signed up after {date}.",
            "Which {region} customers joined after {date}?",
            "Show customers from the {region} region with a signup date later than {date}.",
        ],
        sql="SELECT c.name FROM customers c JOIN regions r ON c.region_id = r.region_id "
            "WHERE r.name = '{region}' AND c.signup_date > '{date}';",
        slots=lambda con: [{"region": r, "date": f"2024-{m:02d}-01"} for r in _regions(con) for m in (6, 7, 8, 9, 10)],
    ),
    dict(
        name="customer_email",
        phrasings=[
            "What is the email address of {name}?",
            "Give me the email of customer {name}.",
            "Find {name}'s email address.",
        ],
        sql="SELECT email FROM customers WHERE name = '{name}';",
        slots=lambda con: [{"name": n} for n in _col(con, "SELECT name FROM customers ORDER BY customer_id")],
    ),
    dict(
        name="customers_signup_month",
        phrasings=[
            "Which customers signed up in {month} {year}?",
            "List the customers who joined during {month} {year}.",
            "Show the names of customers with a signup in {month} {year}.",
        ],
        sql="SELECT name FROM customers WHERE signup_date LIKE '{ym}%';",
        slots=lambda con: _months(),
    ),
    dict(
        name="products_in_category",
        phrasings=[
            "List all products in the {category} category.",
            "Which products belong to {category}?",
            "Show the names of the {category} products.",
        ],
        sql="SELECT name FROM products WHERE category = '{category}';",
        slots=lambda con: [{"category": c} for c in _categories(con)],
    ),
    dict(
        name="category_products_under_price",
        phrasings=[
            "Which {category} products cost less than {price} dollars?",
            "List {category} products with a unit price under {price}.",
            "Find products in {category} priced below {price}, with their prices.",
        ],
        sql="SELECT name, unit_price FROM products WHERE category = '{category}' AND unit_price < {price};",
        slots=lambda con: [{"category": c, "price": p} for c in _categories(con) for p in (15, 20, 30, 40, 50, 75, 100)],
    ),
    dict(
        name="products_over_price_sorted",
        phrasings=[
            "List the products that cost more than {price} dollars, most expensive first.",
            "Which products are priced above {price}? Sort them by price from highest to lowest.",
            "Show products with a unit price over {price} in descending order of price.",
        ],
        sql="SELECT name, unit_price FROM products WHERE unit_price > {price} ORDER BY unit_price DESC;",
        slots=lambda con: [{"price": p} for p in (60, 70, 80, 90, 100, 110, 120, 130, 150, 175, 200)],
    ),
    dict(
        name="top_n_category_by_price",
        phrasings=[
            "What are the {n} {adj} products in the {category} category?",
            "Show the {n} {adj} {category} products.",
            "List the top {n} {adj} items in {category} with their prices.",
        ],
        sql="SELECT name, unit_price FROM products WHERE category = '{category}' ORDER BY unit_price{desc} LIMIT {n};",
        slots=lambda con: [
            {"category": c, "n": n, "adj": adj, "desc": desc}
            for c in _categories(con)
            for adj, desc in (("most expensive", " DESC"), ("cheapest", ""))
            for n in (2, 3, 4, 5)
        ],
    ),
    dict(
        name="avg_price_category",
        phrasings=[
            "What is the average unit price of {category} products?",
            "Compute the mean price of the products in {category}.",
            "How much does a {category} product cost on average?",
        ],
        sql="SELECT AVG(unit_price) FROM products WHERE category = '{category}';",
        slots=lambda con: [{"category": c} for c in _categories(con)],
    ),
    dict(
        name="product_count_per_category_under_price",
        phrasings=[
            "How many products in each category are priced under {price}?",
            "For every category, count the products cheaper than {price} dollars.",
            "Count products with a unit price below {price}, grouped by category.",
        ],
        sql="SELECT category, COUNT(*) AS product_count FROM products WHERE unit_price < {price} GROUP BY category;",
        slots=lambda con: [{"price": p} for p in (20, 25, 30, 40, 50, 60, 75, 100, 125, 150)],
    ),
    dict(
        name="count_orders_status_year",
        phrasings=[
            "How many {status} orders were there in {year}?",
            "Count the orders with status {status} placed in {year}.",
            "What is the number of orders from {year} whose status is {status}?",
        ],
        sql="SELECT COUNT(*) FROM orders WHERE status = '{status}' AND order_date LIKE '{year}%';",
        slots=lambda con: [{"status": s, "year": y} for s in STATUSES for y in (2023, 2024)],
    ),
    dict(
        name="count_orders_month",
        phrasings=[
            "How many orders were placed in {month} {year}?",
            "Count the orders from {month} {year}.",
            "What is the number of orders made during {month} {year}?",
        ],
        sql="SELECT COUNT(*) FROM orders WHERE order_date LIKE '{ym}%';",
        slots=lambda con: _months(),
    ),
    dict(
        name="orders_status_between_dates",
        phrasings=[
            "List the {status} orders placed between {d1} and {d2}.",
            "Which orders with status {status} were made from {d1} to {d2}?",
            "Show the ids of {status} orders between {d1} and {d2}.",
        ],
        sql="SELECT order_id FROM orders WHERE status = '{status}' AND order_date BETWEEN '{d1}' AND '{d2}';",
        slots=lambda con: [
            {"status": s, "d1": f"{y}-{m:02d}-01", "d2": f"{y}-{m:02d}-{d2:02d}"}
            for s in STATUSES for y in (2023, 2024) for m in (2, 5, 8, 11) for d2 in (15, 28)
        ],
    ),
    dict(
        name="status_breakdown_month",
        phrasings=[
            "How many orders of each status were placed in {month} {year}?",
            "Break down the orders from {month} {year} by status.",
            "Count the {month} {year} orders per status.",
        ],
        sql="SELECT status, COUNT(*) AS order_count FROM orders WHERE order_date LIKE '{ym}%' GROUP BY status;",
        slots=lambda con: _months(),
    ),
    dict(
        name="orders_of_customer",
        phrasings=[
            "List the orders placed by {name}.",
            "Which orders did {name} make? Give ids and dates.",
            "Show the order ids and order dates for customer {name}.",
        ],
        sql="SELECT o.order_id, o.order_date FROM orders o JOIN customers c ON o.customer_id = c.customer_id "
            "WHERE c.name = '{name}';",
        slots=lambda con: [{"name": n} for n in _col(con, "SELECT name FROM customers ORDER BY customer_id")],
    ),
    dict(
        name="count_orders_region_status",
        phrasings=[
            "How many {status} orders came from customers in the {region} region?",
            "Count the {status} orders of {region} customers.",
            "What is the number of orders with status {status} from the {region} region?",
        ],
        sql="SELECT COUNT(*) FROM orders o JOIN customers c ON o.customer_id = c.customer_id "
            "JOIN regions r ON c.region_id = r.region_id WHERE r.name = '{region}' AND o.status = '{status}';",
        slots=lambda con: [{"region": r, "status": s} for r in _regions(con) for s in STATUSES],
    ),
    dict(
        name="customers_more_than_n_orders",
        phrasings=[
            "Which customers have placed more than {n} orders?",
            "List customers with over {n} orders and their order counts.",
            "Find the customers who made more than {n} orders.",
        ],
        sql="SELECT c.name, COUNT(*) AS order_count FROM orders o JOIN customers c ON o.customer_id = c.customer_id "
            "GROUP BY c.name HAVING order_count > {n};",
        slots=lambda con: [{"n": n} for n in range(2, 10)],
    ),
    dict(
        name="customers_more_than_n_status_orders",
        phrasings=[
            "Which customers have more than {n} {status} orders?",
            "List customers with over {n} orders in status {status}.",
            "Find customers who have more than {n} orders that are {status}.",
        ],
        sql="SELECT c.name, COUNT(*) AS order_count FROM orders o JOIN customers c ON o.customer_id = c.customer_id "
            "WHERE o.status = '{status}' GROUP BY c.name HAVING order_count > {n};",
        slots=lambda con: [{"status": s, "n": n} for s in STATUSES for n in (1, 2, 3, 4, 5)],
    ),
    dict(
        name="items_of_order",
        phrasings=[
            "What products are in order {order_id}?",
            "List the products and quantities for order number {order_id}.",
            "Show the items of order {order_id} with their quantities.",
        ],
        sql="SELECT p.name, oi.quantity FROM order_items oi JOIN products p ON oi.product_id = p.product_id "
            "WHERE oi.order_id = {order_id};",
        slots=lambda con: [{"order_id": i} for i in range(1, N_ORDERS + 1, 7)],
    ),
    dict(
        name="order_total",
        phrasings=[
            "What is the total value of order {order_id}?",
            "How much was order {order_id} worth?",
            "Compute the total amount of order number {order_id}.",
        ],
        sql="SELECT SUM(quantity * unit_price) FROM order_items WHERE order_id = {order_id};",
        slots=lambda con: [{"order_id": i} for i in range(3, N_ORDERS + 1, 7)],
    ),
    dict(
        name="units_sold_product",
        phrasings=[
            "How many units of {product} have been sold?",
            "What is the total quantity sold of {product}?",
            "Count the units of {product} ordered in total.",
        ],
        sql="SELECT SUM(oi.quantity) FROM order_items oi JOIN products p ON oi.product_id = p.product_id "
            "WHERE p.name = '{product}';",
        slots=lambda con: [{"product": n} for n in _col(con, "SELECT name FROM products ORDER BY product_id")],
    ),
    dict(
        name="top_products_units_category",
        phrasings=[
            "What are the top {n} best-selling {category} products by units sold?",
            "Which {n} products in {category} sold the most units?",
            "List the {n} {category} products with the highest total quantity sold.",
        ],
        sql="SELECT p.name, SUM(oi.quantity) AS units_sold FROM order_items oi JOIN products p ON oi.product_id = p.product_id "
            "WHERE p.category = '{category}' GROUP BY p.name ORDER BY units_sold DESC LIMIT {n};",
        slots=lambda con: [{"category": c, "n": n} for c in _categories(con) for n in (2, 3, 4, 5)],
    ),
    dict(
        name="revenue_category",
        phrasings=[
            "What is the total revenue from {category} products?",
            "How much revenue did the {category} category generate?",
            "Compute the total sales amount for {category}.",
        ],
        sql="SELECT SUM(oi.quantity * oi.unit_price) FROM order_items oi JOIN products p ON oi.product_id = p.product_id "
            "WHERE p.category = '{category}';",
        slots=lambda con: [{"category": c} for c in _categories(con)],
    ),
    dict(
        name="revenue_per_category_month",
        phrasings=[
            "Show the total revenue per category for orders placed in {month} {year}.",
            "What revenue did each category make in {month} {year}?",
            "Break down {month} {year} sales revenue by product category.",
        ],
        sql="SELECT p.category, SUM(oi.quantity * oi.unit_price) AS revenue FROM order_items oi "
            "JOIN products p ON oi.product_id = p.product_id JOIN orders o ON oi.order_id = o.order_id "
            "WHERE o.order_date LIKE '{ym}%' GROUP BY p.category;",
        slots=lambda con: _months(),
    ),
    dict(
        name="top_customers_spend",
        phrasings=[
            "Who are the top {n} customers by total spending?",
            "List the {n} customers who spent the most money.",
            "Which {n} customers have the highest total order value?",
        ],
        sql="SELECT c.name, SUM(oi.quantity * oi.unit_price) AS total_spent FROM order_items oi "
            "JOIN orders o ON oi.order_id = o.order_id JOIN customers c ON o.customer_id = c.customer_id "
            "GROUP BY c.name ORDER BY total_spent DESC LIMIT {n};",
        slots=lambda con: [{"n": n} for n in range(2, 16)],
    ),
    dict(
        name="regions_more_than_n_customers",
        phrasings=[
            "Which regions have more than {n} customers?",
            "List the regions with over {n} customers and their customer counts.",
            "Find regions where the number of customers exceeds {n}.",
        ],
        sql="SELECT r.name, COUNT(*) AS customer_count FROM customers c JOIN regions r ON c.region_id = r.region_id "
            "GROUP BY r.name HAVING customer_count > {n};",
        slots=lambda con: [{"n": n} for n in range(30, 100, 5)],
    ),
    dict(
        name="categories_revenue_above",
        phrasings=[
            "Which categories have total revenue above {amount}?",
            "List the product categories whose sales exceed {amount} dollars.",
            "Find categories with more than {amount} in revenue.",
        ],
        sql="SELECT p.category, SUM(oi.quantity * oi.unit_price) AS revenue FROM order_items oi "
            "JOIN products p ON oi.product_id = p.product_id GROUP BY p.category "
            "HAVING revenue > {amount};",
        slots=lambda con: [{"amount": a} for a in range(5000, 80001, 5000)],
    ),
]


# ----------------------------------------------------------------------------- examples

TEST_PER_TEMPLATE_MANY = 2   # templates with at least MANY_COMBOS usable slot combinations
TEST_PER_TEMPLATE_FEW = 1
MANY_COMBOS = 20
TRAIN_PER_TEMPLATE = 11

_LIMIT = re.compile(r" LIMIT (\d+);$")


def _usable(con: sqlite3.Connection, sql: str) -> bool:
    """A gold query is kept only if it has a non-trivial, unambiguous answer.

    Non-empty, not a lone NULL/0 aggregate; with ORDER BY, the sort key (the last
    column) has no ties among the rows returned, nor at a LIMIT cut-off, so an
    ordered comparison of results is well defined.
    """
    rows = con.execute(sql).fetchall()
    if not rows or (len(rows) == 1 and len(rows[0]) == 1 and rows[0][0] in (None, 0)):
        return False
    if " ORDER BY " in sql:
        m = _LIMIT.search(sql)
        if m:
            n = int(m.group(1))
            full = con.execute(sql[: m.start()] + ";").fetchall()
            if len(full) < n:
                return False
            keys = [r[-1] for r in full[: n + 1]]
        else:
            keys = [r[-1] for r in rows]
        if len(set(keys)) != len(keys):
            return False
    return True


def build_examples(db_path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Render the templates against the database and split them into (train, test).

    How the split is made: for each template, the usable slot combinations are shuffled
    (fixed seed); the first one or two go to test, the rest to train. A test example's
    slot combination -- hence its gold SQL and its question text -- never occurs in
    train; the templates and phrasings are shared, so the test measures whether the
    model carries known question shapes over to new slot values. Train then renders
    each of its combinations with rotating phrasings until the template's quota is met.
    """
    rng = random.Random(SEED + 1)
    con = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    train, test = [], []
    try:
        for t in TEMPLATES:
            combos = [s for s in t["slots"](con) if _usable(con, t["sql"].format(**s))]
            rng.shuffle(combos)
            n_test = TEST_PER_TEMPLATE_MANY if len(combos) >= MANY_COMBOS else TEST_PER_TEMPLATE_FEW
            test_combos, train_combos = combos[:n_test], combos[n_test:]
            phr = t["phrasings"]
            for s in test_combos:
                test.append(_example(rng.choice(phr).format(**s), t["sql"].format(**s)))
            n_train = min(TRAIN_PER_TEMPLATE, len(train_combos) * len(phr))
            for i in range(n_train):
                k, j = i % len(train_combos), i // len(train_combos)
                s = train_combos[k]
                train.append(_example(phr[(k + j) % len(phr)].format(**s), t["sql"].format(**s)))
    finally:
        con.close()
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _example(question: str, sql: str) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": sql},
    ]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: str | os.PathLike) -> None:
    """Write warehouse.sqlite, train.jsonl and test.jsonl into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    db = build_database(out / "warehouse.sqlite")
    train, test = build_examples(db)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "test.jsonl", test)
    print(f"wrote {db} ({len(TEMPLATES)} templates, {len(train)} train, {len(test)} test examples)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="target folder (default: this script's folder)")
    args = ap.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
