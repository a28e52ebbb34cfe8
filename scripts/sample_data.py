"""Deterministic TPC-H-shaped sample data for the example DAGs: one folder per day.

    python scripts/sample_data.py ROOT 2024-01-01 2024-01-03 [--orders-per-day N]

Layout: nation/ and customer/ (dimensions, Parquet), orders/{date}/orders.csv and
lineitem/{date}/lineitem.parquet (money as decimal128(15, 2), as TPC-H has it). lineitem repeats
its first 5 rows, as resent source rows do.
The same date always gives the same rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

NATIONS = [
    "ALGERIA",
    "ARGENTINA",
    "BRAZIL",
    "CANADA",
    "EGYPT",
    "ETHIOPIA",
    "FRANCE",
    "GERMANY",
    "INDIA",
    "INDONESIA",
    "IRAN",
    "IRAQ",
    "JAPAN",
    "JORDAN",
    "KENYA",
    "MOROCCO",
    "MOZAMBIQUE",
    "PERU",
    "CHINA",
    "ROMANIA",
    "SAUDI ARABIA",
    "VIETNAM",
    "RUSSIA",
    "UNITED KINGDOM",
    "UNITED STATES",
]
SEGMENTS = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"]
NUM_CUSTOMERS = 1500


def days(start: str, end: str) -> list[str]:
    first, last = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    return [(first + dt.timedelta(n)).isoformat() for n in range((last - first).days + 1)]


def write_dimensions(root: str) -> None:
    rng = np.random.default_rng(7)
    os.makedirs(f"{root}/nation", exist_ok=True)
    os.makedirs(f"{root}/customer", exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "n_nationkey": np.arange(25, dtype=np.int64),
                "n_name": NATIONS,
                "n_regionkey": np.arange(25, dtype=np.int64) % 5,
            }
        ),
        f"{root}/nation/nation.parquet",
    )
    keys = np.arange(1, NUM_CUSTOMERS + 1, dtype=np.int64)
    pq.write_table(
        pa.table(
            {
                "c_custkey": keys,
                "c_name": [f"Customer#{k:09d}" for k in keys],
                "c_nationkey": rng.integers(0, 25, NUM_CUSTOMERS),
                "c_mktsegment": np.array(SEGMENTS)[rng.integers(0, 5, NUM_CUSTOMERS)],
                "c_acctbal": np.round(rng.uniform(-999.99, 9999.99, NUM_CUSTOMERS), 2),
            }
        ),
        f"{root}/customer/customer.parquet",
    )


def write_day(root: str, day: str, orders_per_day: int) -> None:
    rng = np.random.default_rng(int(day.replace("-", "")))
    date = dt.date.fromisoformat(day)
    orderkeys = int(day.replace("-", "")) * 1_000_000 + np.arange(orders_per_day, dtype=np.int64)
    lines_per_order = rng.integers(1, 8, orders_per_day)
    n = int(lines_per_order.sum())
    line_orderkeys = np.repeat(orderkeys, lines_per_order)
    linenumbers = np.concatenate([np.arange(1, k + 1) for k in lines_per_order]).astype(np.int64)
    quantity = rng.integers(1, 51, n).astype(np.float64)
    price_cents = (quantity * rng.integers(90_000, 110_000, n) // 100).astype(np.int64)
    lineitem = pa.table(
        {
            "l_orderkey": line_orderkeys,
            "l_linenumber": linenumbers,
            "l_partkey": rng.integers(1, 200_000, n),
            "l_quantity": quantity,
            "l_extendedprice": _money(price_cents),
            "l_discount": np.round(rng.integers(0, 11, n) / 100, 2),
            "l_tax": np.round(rng.integers(0, 9, n) / 100, 2),
            "l_returnflag": np.array(["A", "N", "R"])[rng.integers(0, 3, n)],
            "l_shipdate": pa.array([date + dt.timedelta(int(d)) for d in rng.integers(1, 30, n)], pa.date32()),
        }
    )
    # Upstream systems resend rows: a few exact duplicates for the pipeline's dedupe step.
    lineitem = pa.concat_tables([lineitem, lineitem.slice(0, 5)])
    totals = np.bincount(np.repeat(np.arange(orders_per_day), lines_per_order), weights=price_cents / 100)
    orders = pa.table(
        {
            "o_orderkey": orderkeys,
            "o_custkey": rng.integers(1, NUM_CUSTOMERS + 1, orders_per_day),
            "o_orderstatus": np.array(["F", "O", "P"])[rng.integers(0, 3, orders_per_day)],
            "o_totalprice": np.round(totals, 2),
            "o_orderdate": [day] * orders_per_day,
            "o_orderpriority": np.array(["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECIFIED", "5-LOW"])[
                rng.integers(0, 5, orders_per_day)
            ],
        }
    )
    os.makedirs(f"{root}/orders/{day}", exist_ok=True)
    os.makedirs(f"{root}/lineitem/{day}", exist_ok=True)
    pacsv.write_csv(orders, f"{root}/orders/{day}/orders.csv")
    pq.write_table(lineitem, f"{root}/lineitem/{day}/lineitem.parquet")


def _money(cents: np.ndarray) -> pa.Array:
    import decimal

    return pa.array([decimal.Decimal(int(c)).scaleb(-2) for c in cents], pa.decimal128(15, 2))


def generate(root: str, start: str, end: str, orders_per_day: int = 2000) -> list[str]:
    write_dimensions(root)
    dates = days(start, end)
    for day in dates:
        write_day(root, day, orders_per_day)
    return dates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("start")
    parser.add_argument("end")
    parser.add_argument("--orders-per-day", type=int, default=2000)
    args = parser.parse_args()
    written = generate(args.root, args.start, args.end, args.orders_per_day)
    print(f"Sample data for {written[0]}..{written[-1]} in {args.root}")
