"""A dataset with planted defects, its checks, and every check's expected result, known by
construction (not computed by the code under test)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

N = 1000
AS_OF = "2024-01-01T17:09:00+00:00"  # the newest updated_at (row 999) is 30 minutes older


def planted_table() -> pa.Table:
    rows = range(N)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    columns = {
        "row": list(rows),
        "id": [{10: 0, 11: 1, 12: 2}.get(r, r) for r in rows],  # 3 duplicate ids
        "kind": ["z" if r in (20, 21) else "abc"[r % 3] for r in rows],  # 2 unaccepted kinds
        "price": [None if r in (5, 105, 205) else 1000.0 if r == 40 else float(r % 100) for r in rows],
        "qty": [-1 if r == 60 else None if r == 61 else r % 7 for r in rows],
        "email": ["not-an-email" if r == 11 else None if r == 12 else f"user{r}@example.com" for r in rows],
        "code": ["12345" if r == 30 else "ab1" if r == 80 else f"{r:03d}" for r in rows],
        "customer": [r % 50 for r in rows],  # customer 49 is missing from the customer dataset
        "updated_at": pa.array([start + timedelta(minutes=r) for r in rows], pa.timestamp("us", tz="UTC")),
    }
    types = {"row": pa.int64(), "id": pa.int64(), "qty": pa.int64(), "customer": pa.int64()}
    return pa.table({k: v if isinstance(v, pa.Array) else pa.array(v, types.get(k)) for k, v in columns.items()})


def customers_table() -> pa.Table:
    return pa.table({"c_custkey": pa.array(range(49), pa.int64()), "c_name": [f"C{i}" for i in range(49)]})


def not_row_70(batch):
    """A custom row check: pass/fail per row."""
    return batch["row"] != 70


SCHEMA = {
    "row": "int64",
    "id": "int64",
    "kind": "string",
    "price": "double",
    "qty": "int64",
    "email": "string",
    "code": "string",
    "customer": "int64",
    "updated_at": "timestamp[us, tz=UTC]",
}


def planted_checks(customers_ref, fn=not_row_70) -> list[dict]:
    return [
        {"check": "row_count", "min": N, "max": N},
        {"check": "row_count_change", "name": "rows_vs_previous", "equal_to": 1, "tolerance": 0.3},
        {"check": "row_count_change", "name": "rows_vs_700", "previous_rows": 700, "equal_to": 1, "tolerance": 0.3},
        {"check": "unique", "column": "id"},
        {"check": "unique", "columns": ["id", "kind"]},
        {"check": "distinct_count", "column": "kind", "equal_to": 4},
        {"check": "null_count", "column": "price", "policy": "warn"},
        {"check": "null_fraction", "column": "price", "leq_to": 0.01},
        {"check": "min", "column": "price", "geq_to": 0},
        {"check": "max", "column": "price", "name": "max_price_b", "where": "kind == 'b'", "leq_to": 99},
        {"check": "mean", "column": "price", "equal_to": 50.6, "tolerance": 0.01},
        {"check": "sum", "column": "qty", "equal_to": 2987},
        {"check": "freshness", "column": "updated_at", "leq_to": "1h"},
        {"check": "schema", "name": "schema_ok", "columns": SCHEMA},
        {"check": "schema", "name": "schema_v0", "columns": {"row": "int64", "id": "int32", "gone": "string"}},
        {"check": "not_null", "column": "email"},
        {"check": "accepted_values", "column": "kind", "values": ["a", "b", "c"]},
        {"check": "regex", "column": "email", "pattern": "^[^@]+@[^@]+$", "geq_to": 0.99},
        {"check": "range", "column": "price", "min": 0, "max": 100},
        {"check": "string_length", "column": "code", "max": 3},
        {"check": "predicate", "expr": "qty >= 0"},
        {"check": "custom", "name": "not_row_70", "fn": fn, "columns": ["row"]},
        {"check": "referential_integrity", "column": "customer", "ref": customers_ref, "ref_column": "c_custkey"},
        {
            "check": "regex",
            "name": "code_digits",
            "column": "code",
            "pattern": "^[0-9]+$",
            "policy": "warn",
            "quarantine": False,
        },
        {
            "check": "not_null",
            "name": "price_set_for_c",
            "column": "price",
            "where": "kind == 'c'",
            "policy": "warn",
            "quarantine": False,
        },
    ]


# name -> (measured value, passed); fractions of rows are exact ratios of planted counts
EXPECTED = {
    "row_count": (1000, True),
    "rows_vs_previous": (1000 / 800, True),  # the previous run had 800 rows
    "rows_vs_700": (1000 / 700, False),
    "unique(id)": (3, False),
    "unique(id,kind)": (0, True),  # the duplicated ids differ in kind
    "distinct_count(kind)": (4, True),
    "null_count(price)": (3, False),
    "null_fraction(price)": (0.003, True),
    "min(price)": (0.0, True),
    "max_price_b": (1000.0, False),  # row 40 is kind 'b'
    "mean(price)": ((49500 - 15 + 960) / 997, True),  # 10 x sum(0..99), minus 3 nulls of 5, row 40 40 -> 1000
    "sum(qty)": (2987, True),  # 142 x 21 + 15, rows 60 (4 -> -1) and 61 (5 -> null)
    "freshness(updated_at)": (1800.0, True),
    "schema_ok": ("no drift", True),
    "schema_v0": (
        {
            "missing": ["gone"],
            "added": ["kind", "price", "qty", "email", "code", "customer", "updated_at"],
            "changed": {"id": "int32 -> int64"},
        },
        False,
    ),
    "not_null(email)": (1 - 1 / 1000, False),  # row 12
    "accepted_values(kind)": (1 - 2 / 1000, False),  # rows 20, 21
    "regex(email)": (1 - 1 / 999, True),  # row 11; row 12's null is not evaluated
    "range(price)": (1 - 1 / 997, False),  # row 40; 3 nulls not evaluated
    "string_length(code)": (1 - 1 / 1000, False),  # row 30
    "predicate(qty >= 0)": (1 - 2 / 1000, False),  # rows 60 and 61 (null fails)
    "not_row_70": (1 - 1 / 1000, False),
    "referential_integrity(customer)": (1 - 20 / 1000, False),  # customer 49: rows 49, 99, ..., 999
    "code_digits": (1 - 1 / 1000, False),  # row 80, warn: reported, not quarantined
    "price_set_for_c": (1 - 1 / 332, False),  # row 5, among the 332 rows of kind 'c'
    "quality_score": (1 - 31 / 1000, True),  # 29 quarantined rows + rows 80 and 5
}
QUARANTINED = {
    11: ["regex(email)"],
    12: ["not_null(email)"],
    20: ["accepted_values(kind)"],
    21: ["accepted_values(kind)"],
    30: ["string_length(code)"],
    40: ["range(price)"],
    60: ["predicate(qty >= 0)"],
    61: ["predicate(qty >= 0)"],
    70: ["not_row_70"],
    **{r: ["referential_integrity(customer)"] for r in range(49, N, 50)},
}
WARN = {"null_count(price)", "code_digits", "price_set_for_c"}  # the checks with policy warn
SCORE_THRESHOLD = 0.95
