"""Data-quality checks (the check language: ``runtime.specs``), computed in one distributed pass.

    {"check": "null_fraction", "column": "email", "leq_to": 0.01, "policy": "warn"}
    {"check": "mean", "column": "price", "equal_to": 10, "tolerance": 0.05}
    {"check": "regex", "column": "email", "pattern": "^[^@]+@[^@]+$", "geq_to": 0.99}

Every batch yields small partial metrics: row and null counts, min/max, sums, the distinct keys
of ``unique``/``distinct_count`` checks, and for each row-level check the rows it evaluated and
failed. The stage driver merges them and compares each measured value with its expectation.
Row-level checks also decide which rows are quarantined: ``row_failures`` gives their per-row
result in the measuring pass and, when some row failed, again in the pass that splits the data
into passing and quarantined rows (so custom functions must be deterministic).
"""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import ray
import ray.data

from . import refs
from .expressions import compile_expression
from .specs import CHECKS, COMPARATORS, ROW, TABLE, check_name, columns_used, expectation, key_columns
from .specs import validate_checks as validate_spec
from .storage import filesystem_for
from .transforms import resolve_callable
from .types import arrow_type

MAX_EXAMPLES = 5
FAILED_CHECKS = "_failed_checks"  # list<string> column of quarantined rows: the row checks each row failed


def prepare_checks(checks: list[dict[str, Any]], schema: pa.Schema, storage: dict | None) -> list[dict[str, Any]]:
    """Validate against the data's schema (unknown columns, wrong types) before any row is read,
    and resolve what the pass needs: names, policies, key columns, referenced key sets."""
    validate_spec(checks, {field.name: str(field.type) for field in schema})
    prepared = []
    for check in checks:
        check = {**check, "name": check_name(check), "policy": check.get("policy", "fail")}
        if check["check"] == "unique":
            check["columns"] = key_columns(check)
        if check["check"] == "referential_integrity":
            check["keys"] = reference_keys(check, storage, schema.field(check["column"]).type)
        prepared.append(check)
    return prepared


def reference_keys(check: dict[str, Any], storage: dict | None, like: pa.DataType) -> pa.Array:
    """The distinct keys of the other dataset (its key column only)."""
    meta = refs.resolve(check["ref"], storage)
    column = check.get("ref_column", check["column"])
    fs, path = filesystem_for(meta["uri"], storage)
    try:
        keys = pq.read_table(path, columns=[column], filesystem=fs).column(column)
    except (KeyError, pa.ArrowInvalid) as exc:
        problem = f"cannot read key column {column!r} of {meta['uri']}: {exc}"
        raise ValueError(f"check {check_name(check)}: {problem}") from None
    return pc.unique(keys.combine_chunks()).cast(like)


def run_checks(
    ds: ray.data.Dataset, checks: list[dict[str, Any]], storage: dict | None, score_threshold: float | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every check in one pass; return the report and the prepared checks."""
    schema = ds.schema().base_schema
    checks = prepare_checks(checks, schema, storage)
    shipped = [{**c, "keys": ray.put(c["keys"])} if "keys" in c else c for c in checks]
    needed = list(dict.fromkeys(col for c in checks for col in columns_used(c)))
    if any(c["check"] == "custom" and "columns" not in c for c in checks):
        needed = schema.names  # a custom function sees every column
    scan = ds.select_columns(needed or schema.names[:1])
    partials = scan.map_batches(
        measure_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, fn_kwargs={"checks": shipped}
    ).take_all()
    return merge_report(checks, partials, schema, score_threshold), shipped


def measure_batch(table: pa.Table, checks: list[dict[str, Any]]) -> dict[str, list]:
    """One batch's partial metrics, pickled into a one-row batch."""
    parts, failures = [], []
    for check in checks:
        level = CHECKS[check["check"]].level
        scope = in_scope(table, check.get("where"))
        if level == ROW:
            failed = row_failures(table, check, scope)
            failures.append((failed, check.get("quarantine", True)))
            parts.append(_row_part(table, check, failed, scope))
        elif level == TABLE:
            parts.append(_table_part(table if scope is None else table.filter(scope), check))
        else:
            parts.append(None)
    failed_any = _any([f for f, _ in failures], table.num_rows)
    quarantined = _any([f for f, q in failures if q], table.num_rows)
    summary = (table.num_rows, _count(failed_any), _count(quarantined))
    return {"summary": [pickle.dumps(summary)], "parts": [pickle.dumps(parts)]}


def in_scope(table: pa.Table, where: str | None) -> pa.Array | None:
    """Rows a check's ``where`` selects (a null result selects nothing), or None for all rows."""
    if not where:
        return None
    return pc.fill_null(evaluate_expression(table, where), False)


def evaluate_expression(table: pa.Table, expression: str) -> pa.Array:
    result = pds.dataset(table).to_table(columns={"value": compile_expression(expression, table.schema)})
    return result.column("value").combine_chunks()


def row_failures(table: pa.Table, check: dict[str, Any], scope: pa.Array | None = None) -> pa.Array:
    """True for each row that fails a row-level check (never null). Value checks (range, regex,
    accepted_values, string_length, referential_integrity) pass nulls: null is not_null's business.
    A predicate or custom function that returns null fails the row."""
    kind = check["check"]
    if kind == "predicate":
        failed = pc.invert(pc.fill_null(evaluate_expression(table, check["expr"]), False))
    elif kind == "custom":
        failed = pc.invert(pc.fill_null(_custom_result(table, check), False))
    else:
        column = table.column(check["column"])
        if kind == "not_null":
            failed = column.is_null()
        else:
            failed = pc.and_(pc.fill_null(pc.invert(_value_passes(column, check)), False), column.is_valid())
    return failed if scope is None else pc.and_(failed, scope)


def _value_passes(column: pa.Array, check: dict[str, Any]) -> pa.Array:
    kind = check["check"]
    if kind == "accepted_values":
        return pc.is_in(column, value_set=pa.array(check["values"]).cast(column.type))
    if kind == "regex":
        return pc.match_substring_regex(column, check["pattern"])
    if kind == "referential_integrity":
        keys = check["keys"]
        return pc.is_in(column, value_set=ray.get(keys) if isinstance(keys, ray.ObjectRef) else keys)
    values = pc.utf8_length(column) if kind == "string_length" else column
    passes = pa.array(np.ones(len(column), dtype=bool))
    if check.get("min") is not None:
        passes = pc.and_(passes, pc.greater_equal(values, _scalar(check["min"], values.type)))
    if check.get("max") is not None:
        passes = pc.and_(passes, pc.less_equal(values, _scalar(check["max"], values.type)))
    return passes


def _scalar(value: Any, like: pa.DataType) -> pa.Scalar:
    """A bound as a scalar of the column's type: dates and timestamps may be written as strings."""
    if isinstance(value, str) and (pa.types.is_date(like) or pa.types.is_timestamp(like)):
        return pa.scalar(value).cast(like)
    return pa.scalar(value)


def _custom_result(table: pa.Table, check: dict[str, Any]) -> pa.Array:
    fn = resolve_callable(check["fn"])
    batch = table.select(check["columns"]) if "columns" in check else table
    fmt = check.get("batch_format", "pandas")
    result = fn(batch.to_pandas() if fmt == "pandas" else batch, **(check.get("fn_kwargs") or {}))
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    result = result if isinstance(result, pa.Array) else pa.array(np.asarray(result))
    if len(result) != table.num_rows or not pa.types.is_boolean(result.type):
        raise ValueError(
            f"check {check['name']}: the function must return one boolean per row "
            f"(got {len(result)} values of type {result.type} for {table.num_rows} rows)"
        )
    return result


def _row_part(table: pa.Table, check: dict[str, Any], failed: pa.Array, scope: pa.Array | None) -> tuple:
    """(rows evaluated, rows failed, examples of failing values)."""
    evaluated = table.num_rows if scope is None else _count(scope)
    examples: list = []
    if "column" in check:
        column = table.column(check["column"])
        if check["check"] != "not_null":
            evaluated -= column.null_count if scope is None else _count(pc.and_(scope, column.is_null()))
        if check["check"] != "not_null" and _count(failed):
            examples = pc.unique(column.filter(failed)).to_pylist()[:MAX_EXAMPLES]
    return evaluated, _count(failed), examples


def _table_part(table: pa.Table, check: dict[str, Any]) -> Any:
    kind = check["check"]
    if kind in ("row_count", "row_count_change"):
        return table.num_rows
    if kind in ("null_count", "null_fraction"):
        return table.column(check["column"]).null_count, table.num_rows
    if kind in ("distinct_count", "unique"):
        keys = table.select(check.get("columns") or [check["column"]])
        keys = keys.drop_null() if any(c.null_count for c in keys.columns) else keys
        return keys.num_rows, distinct_rows(keys)
    column = table.column(check["column"])
    if kind in ("min", "max", "freshness"):
        bounds = pc.min_max(column)
        return bounds["min"].as_py(), bounds["max"].as_py()
    if kind in ("mean", "sum"):
        if pa.types.is_integer(column.type):  # exact: int64 sums would wrap around silently
            column = column.cast(pa.decimal128(38, 0))
        return pc.sum(column).as_py(), len(column) - column.null_count
    raise ValueError(f"no partial metric for check {kind!r}")


def distinct_rows(table: pa.Table) -> pa.Table:
    """The distinct rows of a table. One thread: faster here than pyarrow's threaded hash
    aggregation, and a Ray task has one CPU anyway. Compacted: the group-by's output chunks
    keep oversized buffers that would otherwise be pickled whole. -0.0 and 0.0 are one value (as
    in SQL and pandas): adding 0.0 turns -0.0 into 0.0 before the bitwise hash."""
    floats = [i for i, field in enumerate(table.schema) if pa.types.is_floating(field.type)]
    for i in floats:
        column = table.column(i)
        table = table.set_column(i, table.field(i), pc.add(column, pa.scalar(0.0, column.type)))
    return table.group_by(table.column_names, use_threads=False).aggregate([]).combine_chunks()


def count_distinct_keys(parts: list[pa.Table]) -> int:
    """Distinct rows over all batches, given each batch's distinct rows.

    A key whose first column lies inside only one batch's [min, max] range cannot occur in any
    other batch, so only keys in ranges shared by several batches are merged: with ordered keys
    (ids, timestamps) that is a handful of boundary values; with shuffled keys, all of them.
    """
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return 0
    first = parts[0].schema.field(0).type
    if not (
        pa.types.is_integer(first)
        or pa.types.is_string(first)
        or pa.types.is_large_string(first)
        or pa.types.is_temporal(first)
        or pa.types.is_decimal(first)
    ):  # floats: NaN is outside min/max
        return distinct_rows(pa.concat_tables(parts, promote_options="permissive")).num_rows
    bounds = [pc.min_max(p.column(0)) for p in parts]
    bounds = [(b["min"].as_py(), b["max"].as_py()) for b in bounds]
    shared = _shared_ranges(bounds)
    overlapping = []
    for part, (low, high) in zip(parts, bounds, strict=True):
        mask = None
        for start, end in shared:
            if start <= high and end >= low:
                inside = pc.and_(pc.greater_equal(part.column(0), start), pc.less_equal(part.column(0), end))
                mask = inside if mask is None else pc.or_(mask, inside)
        if mask is not None:
            overlapping.append(part.filter(mask))
    if not overlapping:
        return sum(p.num_rows for p in parts)
    merged = pa.concat_tables(overlapping, promote_options="permissive")
    return sum(p.num_rows for p in parts) - merged.num_rows + distinct_rows(merged).num_rows


def _shared_ranges(bounds: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """The value ranges covered by two or more of the closed ranges ``bounds`` (a sweep)."""
    events = sorted([(low, 0) for low, _ in bounds] + [(high, 1) for _, high in bounds])  # starts first
    shared, depth, start = [], 0, None
    for value, is_end in events:
        depth += -1 if is_end else 1
        if depth == 2 and not is_end:
            start = value
        elif depth == 1 and is_end:
            shared.append((start, value))
    return shared


def merge_report(
    checks: list[dict[str, Any]], partials: list[dict], schema: pa.Schema, score_threshold: float | None = None
) -> dict[str, Any]:
    """Merge the batches' partial metrics and judge every check: the quality report."""
    summaries = [pickle.loads(p["summary"]) for p in partials]
    per_batch = [pickle.loads(p["parts"]) for p in partials]
    rows_in, failed_any, quarantined = (sum(s[i] for s in summaries) for i in range(3))
    results = []
    for index, check in enumerate(checks):
        parts = [p[index] for p in per_batch]
        if check["check"] == "schema":
            results.append(_schema_result(check, schema))
        else:
            results.append(_judge(check, *_measure(check, parts)))
    score = 1.0 if not rows_in else 1 - failed_any / rows_in
    if score_threshold is not None:
        results.append(
            {
                "name": "quality_score",
                "check": "quality_score",
                "column": None,
                "value": score,
                "expected": f">= {score_threshold:g}",
                "passed": score >= score_threshold,
                "policy": "fail",
            }
        )
    return {
        "passed": all(r["passed"] for r in results if r["policy"] == "fail"),
        "num_rows": rows_in,
        "rows_in": rows_in,
        "rows_passed": rows_in - quarantined,
        "rows_quarantined": quarantined,
        "score": score,
        "score_threshold": score_threshold,
        "failed": sum(not r["passed"] for r in results),
        "checks": results,
    }


def _measure(check: dict[str, Any], parts: list) -> tuple[Any, dict[str, Any]]:
    """The measured value of a row or table check, with details for the report."""
    kind = check["check"]
    if CHECKS[kind].level == ROW:
        evaluated, failed = sum(p[0] for p in parts), sum(p[1] for p in parts)
        examples = list(dict.fromkeys(e for p in parts for e in p[2]))[:MAX_EXAMPLES]
        details = {"failed_rows": failed, "evaluated_rows": evaluated, "examples": examples}
        return (1.0 if not evaluated else 1 - failed / evaluated), details
    if kind == "row_count":
        return sum(parts), {}
    if kind == "row_count_change":
        rows, previous = sum(parts), check.get("previous_rows")
        details = {"rows": rows, "previous_rows": previous}
        if previous is None:
            return None, {**details, "note": "no previous successful run: not judged"}
        return (rows / previous if previous else (1.0 if rows == 0 else None)), details
    if kind in ("null_count", "null_fraction"):
        nulls, rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return (nulls if kind == "null_count" else (nulls / rows if rows else 0.0)), {}
    if kind in ("distinct_count", "unique"):
        distinct = count_distinct_keys([p[1] for p in parts])
        return (distinct if kind == "distinct_count" else sum(p[0] for p in parts) - distinct), {}
    if kind in ("min", "max", "freshness"):
        values = [p[0 if kind == "min" else 1] for p in parts if p[0] is not None]
        if not values:
            return None, {"note": "no non-null values"}
        value = min(values) if kind == "min" else max(values)
        if kind == "freshness":
            as_of = _as_datetime(check.get("as_of") or datetime.now(UTC))
            return (as_of - _as_datetime(value)).total_seconds(), {"newest": str(value), "as_of": as_of.isoformat()}
        return _number(value), {}
    total, count = sum((p[0] for p in parts if p[0] is not None), 0), sum(p[1] for p in parts)
    if not count:
        return None, {"note": "no non-null values"}
    return _number(total if kind == "sum" else total / count), {}


def _judge(check: dict[str, Any], value: Any, details: dict[str, Any]) -> dict[str, Any]:
    comparators, tolerance = expectation(check), check.get("tolerance")
    not_judged = check["check"] == "row_count_change" and check.get("previous_rows") is None
    passed = not_judged or (value is not None and compare(value, comparators, tolerance))
    return {
        "name": check["name"],
        "check": check["check"],
        "column": check.get("column") or check.get("columns"),
        "value": _plain(value),
        "expected": expectation_text(comparators, tolerance, check),
        "passed": bool(passed),
        "policy": check["policy"],
        **{k: _plain(v) for k, v in details.items() if v not in (None, [])},
    }


def compare(value: Any, comparators: dict[str, Any], tolerance: float | None = None) -> bool:
    """common-sql's comparators; ``tolerance`` widens each bound by that fraction of its value."""
    for op, expected in comparators.items():
        expected = _like(expected, value)
        slack = abs(expected) * tolerance if tolerance else 0
        low, high = (expected - slack, expected + slack) if slack else (expected, expected)
        if op == "equal_to":
            ok = low <= value <= high
        elif op in ("greater_than", "geq_to"):
            ok = value > low if op == "greater_than" else value >= low
        else:
            ok = value < high if op == "less_than" else value <= high
        if not ok:
            return False
    return True


def expectation_text(comparators: dict[str, Any], tolerance: float | None, check: dict[str, Any]) -> str:
    kind = check["check"]
    text = " and ".join(f"{COMPARATORS[op]} {value}" for op, value in comparators.items())
    text += f" ± {tolerance:.0%}" if tolerance else ""
    if CHECKS[kind].level == ROW:
        return f"pass fraction {text}: {_row_rule(check)}"
    unit = {"freshness": " s old", "row_count_change": " × previous rows", "unique": " duplicates"}.get(kind, "")
    return text + unit


def _row_rule(check: dict[str, Any]) -> str:
    kind = check["check"]
    bounds = " and ".join(f"{s} {check[k]}" for k, s in (("min", ">="), ("max", "<=")) if check.get(k) is not None)
    return {
        "not_null": "not null",
        "accepted_values": f"in {check.get('values')}",
        "regex": f"matches {check.get('pattern')!r}",
        "range": bounds,
        "string_length": f"length {bounds}",
        "predicate": str(check.get("expr")),
        "custom": f"{getattr(check.get('fn'), '__name__', check.get('fn'))} is true",
        "referential_integrity": f"present in {check.get('ref_column', check.get('column'))} of the other dataset",
    }[kind]


def _schema_result(check: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """Schema drift: columns removed, added, or with another type than declared."""
    expected = {name: arrow_type(type_name) for name, type_name in check["columns"].items()}
    actual = {field.name: field.type for field in schema}
    drift = {
        "missing": [name for name in expected if name not in actual],
        "added": [name for name in actual if name not in expected],
        "changed": {
            name: f"{expected[name]} -> {actual[name]}"
            for name in expected
            if name in actual and _logical(expected[name]) != _logical(actual[name])
        },
    }
    allow_extra = check.get("allow_extra", False)
    passed = not drift["missing"] and not drift["changed"] and (allow_extra or not drift["added"])
    return {
        "name": check["name"],
        "check": "schema",
        "column": None,
        "value": {k: v for k, v in drift.items() if v} or "no drift",
        "expected": f"{len(expected)} declared columns and types" + (", extra columns allowed" if allow_extra else ""),
        "passed": passed,
        "policy": check["policy"],
    }


def _logical(type_: pa.DataType) -> str:
    """string, large_string and string_view are one logical type here (Ray writes large_string)."""
    name = str(type_)
    for variant, base in (("large_string", "string"), ("string_view", "string"), ("large_binary", "binary")):
        name = name.replace(variant, base)
    return name.replace("binary_view", "binary")


def split_batch(table: pa.Table, checks: list[dict[str, Any]], quarantine_uri: str, storage: dict | None) -> pa.Table:
    """Write this batch's quarantined rows (with ``_failed_checks``) and return the passing rows."""
    row_checks = [c for c in checks if CHECKS[c["check"]].level == ROW]
    masks = [row_failures(table, c, in_scope(table, c.get("where"))) for c in row_checks]
    bad = _any([m for m, c in zip(masks, row_checks, strict=True) if c.get("quarantine", True)], table.num_rows)
    if _count(bad):
        quarantined = table.filter(bad)
        if FAILED_CHECKS in quarantined.column_names:  # re-checking a quarantine dataset
            quarantined = quarantined.drop_columns([FAILED_CHECKS])
        matrix = np.column_stack([m.to_numpy(zero_copy_only=False) for m in masks])[bad.to_numpy(zero_copy_only=False)]
        _, failed_check = np.nonzero(matrix)  # row-major: grouped by row, in check order
        offsets = np.concatenate([[0], np.cumsum(matrix.sum(axis=1))]).astype(np.int32)
        names = pa.array([c["name"] for c in row_checks]).take(pa.array(failed_check, pa.int64()))
        quarantined = quarantined.append_column(FAILED_CHECKS, pa.ListArray.from_arrays(offsets, names))
        fs, path = filesystem_for(quarantine_uri, storage)
        fs.create_dir(path, recursive=True)
        pq.write_table(quarantined, f"{path}/part-{uuid.uuid4().hex}.parquet", filesystem=fs)
    return table.filter(pc.invert(bad))


def quarantine_schema(schema: pa.Schema) -> pa.Schema:
    if FAILED_CHECKS in schema.names:
        schema = schema.remove(schema.get_field_index(FAILED_CHECKS))
    return schema.append(pa.field(FAILED_CHECKS, pa.list_(pa.string())))


def _any(masks: list[pa.Array], num_rows: int) -> pa.Array:
    result = pa.array(np.zeros(num_rows, dtype=bool))
    for mask in masks:
        result = pc.or_(result, mask)
    return result


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if hasattr(value, "to_pydatetime"):  # a pandas Timestamp (nanosecond columns)
        value = value.to_pydatetime()
    if not isinstance(value, datetime) and isinstance(value, date):
        value = datetime.combine(value, time(0))
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # naive times are UTC


def _like(expected: Any, value: Any) -> Any:
    """An expected value as the measured value's kind: dates may be given as ISO strings."""
    if isinstance(expected, str) and isinstance(value, datetime):
        parsed = datetime.fromisoformat(expected)
        return parsed if parsed.tzinfo or not value.tzinfo else parsed.replace(tzinfo=value.tzinfo)
    if isinstance(expected, str) and isinstance(value, date):
        return date.fromisoformat(expected)
    return expected


def _plain(value: Any) -> Any:
    """JSON-friendly values for the XCom report."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "..."
    if isinstance(value, (Decimal, np.floating)):
        return float(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
