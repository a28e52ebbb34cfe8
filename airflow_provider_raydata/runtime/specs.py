"""The step and check languages: validation shared by the operators (at DAG parse time) and the
runtime (on the cluster).

Imports neither Airflow nor Ray, so parsing a DAG stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..contracts import DataError
from .check_kinds import CHECKS, ROW, SCHEMA, CheckKind
from .expressions import columns_in
from .types import arrow_type, type_class

AGGREGATE_NAMES = ("sum", "count", "mean", "min", "max", "count_distinct")
JOIN_TYPES = {"inner": "inner", "left": "left_outer", "outer": "full_outer"}
ARROW_JOIN_TYPES = {"inner": "inner", "left": "left outer"}
BATCH_FORMATS = ("pandas", "pyarrow", "numpy")
RAY_MAP_OPTIONS = ("batch_size", "concurrency", "num_cpus", "num_gpus")  # passed on to Ray Data's map_batches
MAP_BATCHES_OPTIONS = ("batch_format", *RAY_MAP_OPTIONS, "fn_kwargs", "output_schema")
# Inner and left joins against a right side smaller than this (Parquet bytes) are broadcast to
# every batch instead of hash-shuffling both sides: Ray's hash join costs seconds of actor start-up.
BROADCAST_JOIN_MAX_BYTES = 256 * 1024 * 1024


STEP_FIELDS: dict[str, set[str]] = {
    "map_batches": {"fn", *MAP_BATCHES_OPTIONS},
    "select": {"columns"},
    "rename": {"columns"},
    "cast": {"columns"},
    "filter": {"expr"},
    "drop_duplicates": {"keys", "order_by", "keep"},
    "join": {"right", "on", "right_on", "how", "num_partitions", "broadcast"},
    "aggregate": {"by", "aggs"},
}
REQUIRED: dict[str, set[str]] = {
    "map_batches": {"fn"},
    "select": {"columns"},
    "rename": {"columns"},
    "cast": {"columns"},
    "filter": {"expr"},
    "drop_duplicates": {"keys"},
    "join": {"right", "on"},
    "aggregate": {"aggs"},
}


def validate_steps(steps: list[dict[str, Any]]) -> None:
    """Check step names and fields without data (used at DAG parse time too)."""
    for index, step in enumerate(steps, 1):
        op = step.get("op") if isinstance(step, dict) else None
        label = f"step {index} ({op})"
        if op not in STEP_FIELDS:
            raise DataError(f"Unknown step {op!r} at step {index}; known steps: {', '.join(STEP_FIELDS)}")
        extra = set(step) - STEP_FIELDS[op] - {"op"}
        if extra:
            raise DataError(f"Unknown field(s) {sorted(extra)} in {label}")
        missing = REQUIRED[op] - set(step)
        if missing:
            raise DataError(f"Missing field(s) {sorted(missing)} in {label}")
        if op == "join" and step.get("how", "inner") not in JOIN_TYPES:
            raise DataError(f"Unknown join type {step['how']!r} in {label}; use {', '.join(JOIN_TYPES)}")
        if op == "aggregate":
            for name, agg in step["aggs"].items():
                fn = agg[0] if isinstance(agg, (list, tuple)) and agg else agg
                if fn not in AGGREGATE_NAMES:
                    raise DataError(
                        f"Unknown aggregate {fn!r} for {name!r} in {label}; use {', '.join(AGGREGATE_NAMES)}"
                    )
        if op == "cast":
            for type_name in step["columns"].values():
                arrow_type(type_name)
        if op == "map_batches":
            for type_name in (step.get("output_schema") or {}).values():
                arrow_type(type_name)
            if step.get("batch_format", "pandas") not in BATCH_FORMATS:
                raise DataError(
                    f"Unknown batch_format {step['batch_format']!r} in {label}; use {', '.join(BATCH_FORMATS)}"
                )
        if op == "drop_duplicates" and step.get("keep", "first") not in ("first", "last"):
            raise DataError(f"'keep' must be 'first' or 'last' in {label}")


# ---------------------------------------------------------------------------------------------
# Data-quality checks (each kind's fields and behaviour: runtime.check_kinds; how they run:
# runtime.checks). Here: the parse-time validation every kind shares.

COMPARATORS = {"equal_to": "=", "greater_than": ">", "geq_to": ">=", "less_than": "<", "leq_to": "<="}
POLICIES = ("fail", "warn")
COMMON_FIELDS = ("check", "name", "policy", "where", "tolerance", *COMPARATORS)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_name(check: dict[str, Any]) -> str:
    target = check.get("column") or check.get("columns") or check.get("expr") or ""
    if isinstance(target, (list, tuple)):
        target = ",".join(target)
    if isinstance(target, dict):
        target = ""
    return check.get("name") or (f"{check['check']}({target})" if target else check["check"])


def columns_used(check: dict[str, Any]) -> list[str]:
    """Columns a check reads (a schema check's columns are what it compares, not what it reads)."""
    names: list[str] = []
    if CHECKS[check["check"]].level != SCHEMA:
        names += [check["column"]] if "column" in check else list(check.get("columns") or [])
    for field in ("expr", "where"):
        if isinstance(check.get(field), str) and not _templated(check[field]):
            names += sorted(columns_in(check[field]))
    return list(dict.fromkeys(names))


def expectation(check: dict[str, Any]) -> dict[str, Any]:
    """The comparators a check's measured value must satisfy (defaults and aliases applied)."""
    kind = CHECKS[check["check"]]
    found = {k: check[k] for k in COMPARATORS if k in check}
    found.update({op: check[name] for name, op in kind.aliases if name in check})
    if not found:
        found = dict(kind.default or {})
    if kind.measures == "seconds":
        found = {k: duration_seconds(v) for k, v in found.items()}
    return found


def duration_seconds(value: float | int | str) -> float:
    """Seconds from a number or a duration such as ``"90s"``, ``"30m"``, ``"36h"``, ``"2d"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.fullmatch(str(value).strip())
    if not match:
        raise DataError(f"Not a duration: {value!r}; use seconds or e.g. '30m', '36h', '2d'")
    return float(match[1]) * _SECONDS[match[2]]


def validate_checks(checks: list[dict[str, Any]], schema: Mapping[str, str] | None = None) -> None:
    """Check names, fields and comparators without data (DAG parse time); with ``schema``
    (column -> Arrow type name) also the columns each check reads and their types."""
    if not isinstance(checks, (list, tuple)) or not checks:
        raise DataError("checks must be a non-empty list of check dicts")
    names: set[str] = set()
    for index, check in enumerate(checks, 1):
        kind_name = check.get("check") if isinstance(check, dict) else None
        if kind_name not in CHECKS:
            raise DataError(f"Unknown check {kind_name!r} at position {index}; known: {', '.join(CHECKS)}")
        label = f"Check {index} ({check_name(check)})"
        _validate_fields(check, CHECKS[kind_name], label)
        name = check_name(check)
        if name in names:
            raise DataError(f"{label}: another check has the same name; give one of them a 'name'")
        names.add(name)
        if schema is not None:
            _validate_columns(check, CHECKS[kind_name], schema, label)


def _validate_fields(check: dict[str, Any], kind: CheckKind, label: str) -> None:
    allowed = {*COMMON_FIELDS, *kind.required, *kind.optional, *(("quarantine",) if kind.level == ROW else ())}
    missing = [f for f in kind.required if f not in check]
    extra = sorted(set(check) - allowed)
    if missing or extra:
        raise DataError(f"{label}: " + (f"missing {missing}" if missing else f"unknown field(s) {extra}"))
    if check.get("policy", "fail") not in POLICIES:
        raise DataError(f"{label}: policy must be one of {', '.join(POLICIES)}, not {check['policy']!r}")
    kind.validate(check, label)
    for field in ("expr", "where"):
        if field in check and not _templated(str(check[field])):
            columns_in(check[field])  # raises on a syntax error
    _validate_comparators(check, kind, label)


def _validate_comparators(check: dict[str, Any], kind: CheckKind, label: str) -> None:
    given = [k for k in (*COMPARATORS, "tolerance") if k in check]
    if kind.level == SCHEMA:
        if given:
            raise DataError(f"{label}: {given[0]!r} does not apply to a schema check")
        return
    if any(_templated(check[k]) for k in given):
        return  # checked again once rendered
    try:
        comparators = expectation(check)
    except ValueError as exc:
        raise DataError(f"{label}: {exc}") from None
    if not comparators:
        raise DataError(f"{label} needs a comparator: one of {', '.join(COMPARATORS)}")
    if given and any(name in check for name, _ in kind.aliases):
        aliases = "/".join(name for name, _ in kind.aliases)
        raise DataError(f"{label}: use either {aliases} or comparators, not both")
    for op, value in comparators.items():
        problem = _comparator_problem(kind.measures, value)
        if problem:
            raise DataError(f"{label}: {op} {value!r} does not apply: {check['check']} measures {problem}")
    if "tolerance" in check:
        tolerance = check["tolerance"]
        if not _is_number(tolerance) or tolerance < 0:
            raise DataError(f"{label}: tolerance must be a number >= 0 (a fraction of the expected value)")
        if not all(_is_number(v) for v in comparators.values()):
            raise DataError(f"{label}: tolerance applies to numeric comparators only")


def _comparator_problem(measures: str | None, value: Any) -> str | None:
    if measures == "value":
        return None if _is_number(value) or isinstance(value, str) else "a column value (a number or a date string)"
    if measures == "seconds":
        return None  # already converted by duration_seconds
    if not _is_number(value):
        return {"number": "a number", "ratio": "a ratio (rows / previous rows)"}.get(measures, f"a {measures}")
    if measures == "fraction" and not 0 <= value <= 1:
        return "a fraction of rows between 0 and 1"
    if measures in ("count", "ratio") and value < 0:
        return f"a {measures} (>= 0)"
    return None


def _validate_columns(check: dict[str, Any], kind: CheckKind, schema: Mapping[str, str], label: str) -> None:
    for column in columns_used(check):
        if column not in schema:
            raise DataError(f"Unknown column {column!r} in {label}; available columns: {', '.join(schema)}")
    if kind.column_types and "column" in check:
        found = type_class(schema[check["column"]])
        if found not in kind.column_types:
            raise DataError(
                f"{label}: column {check['column']!r} has type {schema[check['column']]}; "
                f"{check['check']} applies to {' or '.join(kind.column_types)} columns"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value
