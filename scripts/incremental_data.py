"""Changing source data for the incremental DAG: deterministic, one day of changes at a time.

- PostgreSQL ``public.orders_src``: the current state of every order (new orders, updates,
  soft deletes with ``is_deleted``), with ``updated_at`` set on every change.
- Date-partitioned Parquet files ``{landing}/updated_date=YYYY-MM-DD/part-0.parquet``: payment
  change events; a payment changed twice in a day has two events that day.

``python scripts/incremental_data.py --days 7 --landing DIR --conninfo "host=... dbname=..."``
writes the first N days; the tests apply the days one by one and compare the targets with
``expected_state``, computed here from the generated changes alone.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

START = date(2024, 1, 1)
STATUSES = ["new", "paid", "shipped", "delivered"]
ORDER_COLUMNS = ["order_id", "customer_id", "status", "amount", "order_date", "updated_at", "is_deleted"]
PAYMENT_SCHEMA = pa.schema(
    [
        ("payment_id", pa.int64()),
        ("order_id", pa.int64()),
        ("method", pa.string()),
        ("amount", pa.decimal128(12, 2)),
        ("paid_date", pa.date32()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("is_deleted", pa.bool_()),
    ]
)
ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS public.orders_src (
    order_id bigint PRIMARY KEY, customer_id integer NOT NULL, status text NOT NULL,
    amount numeric(12, 2) NOT NULL, order_date date NOT NULL, updated_at timestamptz NOT NULL,
    is_deleted boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS orders_src_updated_at ON public.orders_src (updated_at);
"""


@dataclass
class Day:
    day: date
    orders: list[dict] = field(default_factory=list)  # order rows as they are after the change
    payments: list[dict] = field(default_factory=list)  # payment change events


def generate(days: int, orders_per_day: int = 200, seed: int = 7) -> list[Day]:
    """``days`` days of changes from START: new orders, updates of older ones (some twice over
    the days), soft deletes; payment events, a few changed twice within one day."""
    current: dict[int, dict] = {}
    payments: dict[int, dict] = {}
    result = []
    for index in range(days):
        rng = random.Random(seed * 100_003 + index)
        day = START + timedelta(days=index)
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)

        def at(second: int, midnight: datetime = midnight) -> datetime:
            return midnight + timedelta(seconds=second)

        changes = Day(day)
        live = sorted(k for k, row in current.items() if not row["is_deleted"])
        first_id = index * orders_per_day + 1
        for order_id in range(first_id, first_id + orders_per_day):
            row = {
                "order_id": order_id,
                "customer_id": rng.randint(1, 500),
                "status": "new",
                "amount": Decimal(rng.randint(100, 99_999)) / 100,
                "order_date": day,
                "updated_at": at(rng.randint(0, 43_199)),
                "is_deleted": False,
            }
            current[order_id] = row
            changes.orders.append(dict(row))
        touched = rng.sample(live, min(len(live), orders_per_day // 4))
        for n, order_id in enumerate(touched):
            row = current[order_id]
            row["updated_at"] = at(43_200 + rng.randint(0, 43_199))
            if n % 10 == 0:
                row["is_deleted"] = True  # soft delete
            else:
                row["status"] = STATUSES[min(STATUSES.index(row["status"]) + 1, len(STATUSES) - 1)]
                row["amount"] = row["amount"] + Decimal(rng.randint(1, 500)) / 100
            changes.orders.append(dict(row))
        for row in changes.orders:
            if row["order_date"] == day:  # a payment for each new order
                payments[row["order_id"] * 10] = {
                    "payment_id": row["order_id"] * 10,
                    "order_id": row["order_id"],
                    "method": rng.choice(["card", "transfer", "wallet"]),
                    "amount": row["amount"],
                    "paid_date": day,
                    "updated_at": row["updated_at"] + timedelta(seconds=1),
                    "is_deleted": False,
                }
                changes.payments.append(dict(payments[row["order_id"] * 10]))
        older = sorted(k for k, p in payments.items() if p["paid_date"] < day and not p["is_deleted"])
        for n, payment_id in enumerate(rng.sample(older, min(len(older), orders_per_day // 5))):
            payment = payments[payment_id]
            for repeat in range(2 if n % 3 == 0 else 1):  # some change twice the same day
                payment["updated_at"] = at(50_000 + 10_000 * repeat + rng.randint(0, 9_999))
                payment["method"] = rng.choice(["card", "transfer", "wallet"])
                payment["is_deleted"] = n % 11 == 0 and repeat == 0
                changes.payments.append(dict(payment))
        result.append(changes)
    return result


def apply_orders(conn, day: Day) -> None:
    """Write one day's order changes into ``public.orders_src`` (a psycopg connection)."""
    conn.execute(ORDERS_DDL)
    columns = ", ".join(ORDER_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in ORDER_COLUMNS[1:])
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO public.orders_src ({columns}) VALUES ({', '.join(['%s'] * len(ORDER_COLUMNS))}) "
            f"ON CONFLICT (order_id) DO UPDATE SET {updates}",
            [[row[c] for c in ORDER_COLUMNS] for row in day.orders],
        )


def write_payments(landing: Path, day: Day) -> Path:
    """One day's payment events as ``{landing}/updated_date=YYYY-MM-DD/part-0.parquet``."""
    folder = Path(landing) / f"updated_date={day.day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist(day.payments, schema=PAYMENT_SCHEMA), path)
    return path


def expected_state(days: list[Day]) -> tuple[dict[int, dict], dict[int, dict]]:
    """The latest version of every order and payment after these days (deleted ones flagged)."""
    orders: dict[int, dict] = {}
    payments: dict[int, dict] = {}
    for day in days:
        for row in day.orders:
            orders[row["order_id"]] = row
        for event in sorted(day.payments, key=lambda e: e["updated_at"]):
            payments[event["payment_id"]] = event
    return orders, payments


def main() -> None:
    import psycopg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--orders-per-day", type=int, default=200)
    parser.add_argument("--landing", type=Path, required=True, help="folder for the payment files")
    parser.add_argument("--conninfo", required=True, help="libpq connection string of the source database")
    args = parser.parse_args()
    with psycopg.connect(args.conninfo, autocommit=True) as conn:
        for day in generate(args.days, args.orders_per_day):
            apply_orders(conn, day)
            write_payments(args.landing, day)
    print(f"{args.days} days of changes written")


if __name__ == "__main__":
    main()
