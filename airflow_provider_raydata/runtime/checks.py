"""Data-quality checks (the check language: ``runtime.specs``; each kind: ``runtime.check_kinds``),
computed in one distributed pass on the cluster.

    {"check": "null_fraction", "column": "email", "leq_to": 0.01, "policy": "warn"}
    {"check": "mean", "column": "price", "equal_to": 10, "tolerance": 0.05}
    {"check": "regex", "column": "email", "pattern": "^[^@]+@[^@]+$", "geq_to": 0.99}

Every batch yields small partial metrics: each table check's partial (row and null counts,
min/max, sums, distinct keys) and, for each row-level check, the rows it evaluated and failed.
The stage driver merges them and compares each measured value with its expectation. Row-level
checks also decide which rows are quarantined: ``row_failures`` gives their per-row result in the
measuring pass and, when some row failed, again in the pass that splits the data into passing and
quarantined rows (so custom functions must be deterministic).

Checks that look values up in another dataset (referential_integrity) need its key set: read once
on the driver (``reference_keys``) and handed to the batch functions as ``keys`` (check name ->
key set or its ObjectRef), beside the checks.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from ..contracts import CheckResult, DataError, DatasetRef, QualityReport
from . import refs
from .check_kinds import CHECKS, ROW, SCHEMA, TABLE, Measured, evaluate_expression
from .check_kinds import count_distinct_keys as count_distinct_keys  # re-exported (tests)
from .check_kinds import distinct_rows as distinct_rows  # re-exported (tests)
from .specs import COMPARATORS, check_name, columns_used, expectation
from .specs import validate_checks as validate_spec
from .storage import filesystem_for

MAX_EXAMPLES = 5
FAILED_CHECKS = "_failed_checks"  # list<string> column of quarantined rows: the row checks each row failed


def prepare_checks(checks: list[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    """Validate against the data's schema (unknown columns, wrong types) before any row is read;
    return copies with the defaults the pass reads filled in: ``name`` and ``policy``."""
    validate_spec(checks, {f.name: str(f.type) for f in schema})
    return [{**check, "name": check_name(check), "policy": check.get("policy", "fail")} for check in checks]


def reference_keys(checks: list[dict[str, Any]], schema: pa.Schema, storage: dict | None) -> dict[str, pa.Array]:
    """The key set of each check with a ``lookup`` (prepared checks), by check name: the distinct
    keys of the other dataset's key column, as the type of the checked column."""
    found = {}
    for check in checks:
        lookup = CHECKS[check["check"]].lookup(check)
        if lookup is not None:
            found[check["name"]] = _distinct_keys(check, *lookup, storage, schema.field(check["column"]).type)
    return found


def _distinct_keys(check: dict[str, Any], ref: Any, column: str, storage: dict | None, like: pa.DataType) -> pa.Array:
    meta = refs.resolve(DatasetRef.parse(ref, f"check {check['name']} 'ref'"), storage)
    fs, path = filesystem_for(meta.uri, storage)
    try:
        keys = pq.read_table(path, columns=[column], filesystem=fs).column(column)
    except (KeyError, pa.ArrowInvalid) as exc:
        problem = f"cannot read key column {column!r} of {meta.uri}: {exc}"
        raise DataError(f"check {check['name']}: {problem}") from None
    return pc.unique(keys.combine_chunks()).cast(like)


def run_checks(
    ds: ray.data.Dataset, checks: list[dict[str, Any]], storage: dict | None, score_threshold: float | None = None
) -> tuple[QualityReport, list[dict[str, Any]], dict[str, Any]]:
    """Measure every check in one pass; return the report, the prepared checks and the key sets
    of referential checks (object refs, for the pass that splits the rows)."""
    schema = ds.schema().base_schema
    checks = prepare_checks(checks, schema)
    # Read once, before any row is read (a wrong key column fails here), shared by every batch.
    keys = {name: ray.put(k) for name, k in reference_keys(checks, schema, storage).items()}
    needed = list(dict.fromkeys(col for c in checks for col in columns_used(c)))
    if any(CHECKS[c["check"]].reads_every_column(c) for c in checks):
        needed = schema.names
    scan = ds.select_columns(needed or schema.names[:1])
    partials = scan.map_batches(
        measure_batch,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={"checks": checks, "keys": keys},
    ).take_all()
    return merge_report(checks, partials, schema, score_threshold), checks, keys


def measure_batch(table: pa.Table, checks: list[dict[str, Any]], keys: Mapping[str, Any]) -> dict[str, list]:
    """One batch's partial metrics, pickled into a one-row batch. ``keys``: ``reference_keys``,
    read once for all batches (as object refs on the cluster)."""
    keys = _key_sets(keys)
    parts, failures = [], []
    for check in checks:
        kind = CHECKS[check["check"]]
        scope = in_scope(table, check.get("where"))
        if kind.level == ROW:
            failed = row_failures(table, check, scope, keys.get(check["name"]))
            failures.append((failed, check.get("quarantine", True)))
            parts.append(_row_part(table, check, failed, scope))
        elif kind.level == TABLE:
            parts.append(kind.partial(table if scope is None else table.filter(scope), check))
        else:
            parts.append(None)
    failed_any = _any([f for f, _ in failures], table.num_rows)
    quarantined = _any([f for f, q in failures if q], table.num_rows)
    summary = (table.num_rows, _count(failed_any), _count(quarantined))
    return {"summary": [pickle.dumps(summary)], "parts": [pickle.dumps(parts)]}


def _key_sets(keys: Mapping[str, Any]) -> dict[str, pa.Array]:
    return {name: ray.get(k) if isinstance(k, ray.ObjectRef) else k for name, k in keys.items()}


def in_scope(table: pa.Table, where: str | None) -> pa.Array | None:
    """Rows a check's ``where`` selects (a null result selects nothing), or None for all rows."""
    if not where:
        return None
    return pc.fill_null(evaluate_expression(table, where), False)


def row_failures(
    table: pa.Table, check: dict[str, Any], scope: pa.Array | None = None, keys: pa.Array | None = None
) -> pa.Array:
    """True for each row that fails a row-level check (never null). Kinds ``on_values`` (range,
    regex, accepted_values, ...) pass nulls: null is not_null's business. For the others (a
    predicate, a custom function) a null result fails the row."""
    kind = CHECKS[check["check"]]
    passes = kind.passes(table, check, keys)
    if kind.on_values:
        failed = pc.and_(pc.fill_null(pc.invert(passes), False), table.column(check["column"]).is_valid())
    else:
        failed = pc.invert(pc.fill_null(passes, False))
    return failed if scope is None else pc.and_(failed, scope)


def _row_part(table: pa.Table, check: dict[str, Any], failed: pa.Array, scope: pa.Array | None) -> tuple:
    """(rows evaluated, rows failed, examples of failing values)."""
    evaluated = table.num_rows if scope is None else _count(scope)
    examples: list = []
    if CHECKS[check["check"]].on_values:
        column = table.column(check["column"])
        evaluated -= column.null_count if scope is None else _count(pc.and_(scope, column.is_null()))
        if _count(failed):
            examples = pc.unique(column.filter(failed)).to_pylist()[:MAX_EXAMPLES]
    return evaluated, _count(failed), examples


def _row_measure(parts: list) -> Measured:
    """A row check's value: the fraction of evaluated rows that pass."""
    evaluated, failed = sum(p[0] for p in parts), sum(p[1] for p in parts)
    examples = list(dict.fromkeys(e for p in parts for e in p[2]))[:MAX_EXAMPLES]
    details = {"failed_rows": failed, "evaluated_rows": evaluated, "examples": examples}
    return Measured(1.0 if not evaluated else 1 - failed / evaluated, details)


def merge_report(
    checks: list[dict[str, Any]], partials: list[dict], schema: pa.Schema, score_threshold: float | None = None
) -> QualityReport:
    """Merge the batches' partial metrics and judge every check: the quality report."""
    summaries = [pickle.loads(p["summary"]) for p in partials]
    per_batch = [pickle.loads(p["parts"]) for p in partials]
    rows_in, failed_any, quarantined = (sum(s[i] for s in summaries) for i in range(3))
    results = []
    for index, check in enumerate(checks):
        kind, parts = CHECKS[check["check"]], [p[index] for p in per_batch]
        if kind.level == SCHEMA:
            results.append(kind.result(check, schema))
        else:
            measured = _row_measure(parts) if kind.level == ROW else kind.merge(parts, check)
            results.append(_judge(check, measured, no_rows=rows_in == 0))
    score = 1.0 if not rows_in else 1 - failed_any / rows_in
    if score_threshold is not None:
        expected = f">= {score_threshold:g}"
        passed = score >= score_threshold
        results.append(CheckResult("quality_score", "quality_score", None, score, expected, passed, "fail"))
    return QualityReport(
        passed=all(r.passed for r in results if r.policy == "fail"),
        rows_in=rows_in,
        rows_passed=rows_in - quarantined,
        rows_quarantined=quarantined,
        score=score,
        score_threshold=score_threshold,
        checks=tuple(results),
    )


def _judge(check: dict[str, Any], measured: Measured, no_rows: bool = False) -> CheckResult:
    """``no_rows``: a value that zero rows cannot have (a mean, a newest time) passes as "no rows":
    on a quiet day the ``row_count`` check decides, not every aggregate."""
    comparators, tolerance, value = expectation(check), check.get("tolerance"), measured.value
    passed = not measured.judged or (value is not None and compare(value, comparators, tolerance))
    if no_rows and value is None:
        passed, measured = True, Measured(None, {**measured.details, "note": "no rows"})
    return CheckResult(
        name=check["name"],
        check=check["check"],
        column=check.get("column") or check.get("columns"),
        value=_plain(value),
        expected=expectation_text(comparators, tolerance, check),
        passed=bool(passed),
        policy=check["policy"],
        details={k: _plain(v) for k, v in measured.details.items() if v not in (None, [])},
    )


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
    kind = CHECKS[check["check"]]
    text = " and ".join(f"{COMPARATORS[op]} {value}" for op, value in comparators.items())
    text += f" ± {tolerance:.0%}" if tolerance else ""
    if kind.level == ROW:
        return f"pass fraction {text}: {kind.rule(check)}"
    return text + kind.unit


def split_batch(
    table: pa.Table,
    checks: list[dict[str, Any]],
    quarantine_uri: str,
    storage: dict | None,
    keys: Mapping[str, Any],
) -> pa.Table:
    """Write this batch's quarantined rows (with ``_failed_checks``) and return the passing rows.
    ``keys``: as for measure_batch."""
    keys = _key_sets(keys)
    row_checks = [c for c in checks if CHECKS[c["check"]].level == ROW]
    masks = [row_failures(table, c, in_scope(table, c.get("where")), keys.get(c["name"])) for c in row_checks]
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
