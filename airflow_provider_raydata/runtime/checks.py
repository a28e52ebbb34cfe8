"""Data-quality checks, all computed in one distributed pass.

    {"check": "row_count", "min": 1, "max": 10_000}
    {"check": "not_null", "column": "id"}
    {"check": "unique", "columns": ["id"]}            # composite keys: several columns
    {"check": "range", "column": "price", "min": 0, "max": 1e6}
    {"check": "accepted_values", "column": "status", "values": ["F", "O", "P"]}
    {"check": "regex", "column": "email", "pattern": "^[^@]+@[^@]+$"}

Every batch yields a small dict of partial metrics (counts, min/max, key hashes); the stage's
driver merges them. Uniqueness uses 64-bit key hashes; when hashes collide the duplicates are
confirmed on the exact keys before the check is failed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from .specs import check_name, validate_checks
from .types import check_columns

MAX_EXAMPLES = 5


def columns_of(checks: list[dict[str, Any]]) -> list[str]:
    names = [c["column"] for c in checks if "column" in c]
    names += [col for c in checks for col in c.get("columns", [])]
    return list(dict.fromkeys(names))


def partial_metrics(table: pa.Table, checks: list[dict[str, Any]]) -> dict[str, list[bytes]]:
    """One batch's partial metrics, pickled into a one-row batch."""
    parts: list[Any] = []
    for check in checks:
        kind = check["check"]
        column = table.column(check["column"]) if "column" in check else None
        if kind == "not_null":
            parts.append(column.null_count)
        elif kind == "unique":
            keys = table.select(check["columns"]).to_pandas()
            parts.append(np.unique(pd.util.hash_pandas_object(keys, index=False).to_numpy()))
        elif kind == "range":
            bounds = pc.min_max(column)
            parts.append((bounds["min"].as_py(), bounds["max"].as_py()))
        elif kind == "accepted_values":
            bad = pc.filter(column, pc.invert(pc.is_in(column, pa.array(check["values"]))))
            parts.append((len(bad), pc.unique(bad).to_pylist()[:MAX_EXAMPLES]))
        elif kind == "regex":
            matches = pc.match_substring_regex(column, check["pattern"])
            bad = pc.filter(column, pc.invert(matches))
            parts.append((len(bad), bad.to_pylist()[:MAX_EXAMPLES]))
        else:
            parts.append(None)
    return {"rows": [table.num_rows], "parts": [pickle.dumps(parts)]}


def run_checks(ds: ray.data.Dataset, checks: list[dict[str, Any]]) -> dict[str, Any]:
    validate_checks(checks)
    schema = ds.schema()
    if schema is not None:
        for check in checks:
            check_columns(columns_of([check]), schema.names, f"check {check_name(check)}")
    needed = columns_of(checks)
    scan = ds.select_columns(needed) if needed else ds
    batches = scan.map_batches(
        partial_metrics,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={"checks": checks},
    ).take_all()
    num_rows = sum(b["rows"] for b in batches)
    per_batch = [pickle.loads(b["parts"]) for b in batches]
    results = [
        evaluate(check, [p[i] for p in per_batch], num_rows, lambda keys: exact_duplicates(ds, keys))
        for i, check in enumerate(checks)
    ]
    failed = [r for r in results if not r["passed"]]
    return {"passed": not failed, "num_rows": num_rows, "checks": results, "failed": len(failed)}


def exact_duplicates(ds: ray.data.Dataset, keys: list[str]) -> int:
    counts = ds.groupby(keys).count().map_batches(_excess, batch_format="pyarrow")
    return int(sum(row["excess"] for row in counts.take_all()))


def evaluate(
    check: dict[str, Any], parts: list, num_rows: int, confirm_duplicates: Callable[[list[str]], int]
) -> dict[str, Any]:
    kind = check["check"]
    result: dict[str, Any] = {"name": check_name(check), "check": kind, "column": check.get("column")}
    if kind == "row_count":
        value, passed = num_rows, _within(num_rows, check.get("min"), check.get("max"))
        expected = _bounds_text(check.get("min"), check.get("max"))
    elif kind == "not_null":
        value = sum(parts)
        passed, expected = value == 0, "0 nulls"
    elif kind == "unique":
        hashes = np.concatenate(parts) if parts else np.array([], dtype=np.uint64)
        _, counts = np.unique(hashes, return_counts=True)
        value = int((counts[counts > 1] - 1).sum())
        if value:  # confirm on the exact keys: a hash collision must not fail a good key
            value = confirm_duplicates(check["columns"])
        passed, expected = value == 0, "0 duplicate keys"
    elif kind == "range":
        lows = [p[0] for p in parts if p[0] is not None]
        highs = [p[1] for p in parts if p[1] is not None]
        low, high = (min(lows), max(highs)) if lows else (None, None)
        value = {"min": low, "max": high}
        passed = low is None or (
            _within(low, check.get("min"), check.get("max")) and _within(high, check.get("min"), check.get("max"))
        )
        expected = _bounds_text(check.get("min"), check.get("max"))
    else:  # accepted_values, regex: count of failing non-null values plus examples
        value = sum(p[0] for p in parts)
        examples = list(dict.fromkeys(e for p in parts for e in p[1]))[:MAX_EXAMPLES]
        passed = value == 0
        expected = f"in {check['values']}" if kind == "accepted_values" else f"matches {check['pattern']!r}"
        if examples:
            result["examples"] = [_plain(e) for e in examples]
    result.update(value=_plain(value), expected=expected, passed=bool(passed))
    return result


def _excess(table: pa.Table) -> dict[str, list[int]]:
    counts = table.column("count()").to_numpy()
    return {"excess": [int(np.clip(counts - 1, 0, None).sum())]}


def _within(value, low, high) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _bounds_text(low, high) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f">= {low}" if low is not None else f"<= {high}"


def _plain(value):
    """JSON-friendly values for the XCom report."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
