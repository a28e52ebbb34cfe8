"""Stage specs: plain-data validation shared by the operators (at DAG parse time) and the runtime.

Imports neither Airflow nor Ray, so parsing a DAG stays fast.
"""

from __future__ import annotations

from typing import Any

from .types import arrow_type

AGGREGATE_NAMES = ("sum", "count", "mean", "min", "max", "count_distinct")
JOIN_TYPES = {"inner": "inner", "left": "left_outer", "outer": "full_outer"}
ARROW_JOIN_TYPES = {"inner": "inner", "left": "left outer"}
MAP_BATCHES_OPTIONS = ("batch_format", "batch_size", "concurrency", "num_cpus", "num_gpus", "fn_kwargs")
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
        where = f"step {index} ({op})"
        if op not in STEP_FIELDS:
            raise ValueError(f"Unknown step {op!r} at step {index}; known steps: {', '.join(STEP_FIELDS)}")
        extra = set(step) - STEP_FIELDS[op] - {"op"}
        if extra:
            raise ValueError(f"Unknown field(s) {sorted(extra)} in {where}")
        missing = REQUIRED[op] - set(step)
        if missing:
            raise ValueError(f"Missing field(s) {sorted(missing)} in {where}")
        if op == "join" and step.get("how", "inner") not in JOIN_TYPES:
            raise ValueError(f"Unknown join type {step['how']!r} in {where}; use {', '.join(JOIN_TYPES)}")
        if op == "aggregate":
            for name, agg in step["aggs"].items():
                fn = agg[0] if isinstance(agg, (list, tuple)) and agg else agg
                if fn not in AGGREGATE_NAMES:
                    raise ValueError(
                        f"Unknown aggregate {fn!r} for {name!r} in {where}; use {', '.join(AGGREGATE_NAMES)}"
                    )
        if op == "cast":
            for type_name in step["columns"].values():
                arrow_type(type_name)
        if op == "drop_duplicates" and step.get("keep", "first") not in ("first", "last"):
            raise ValueError(f"'keep' must be 'first' or 'last' in {where}")


CHECK_FIELDS: dict[str, tuple[set[str], set[str]]] = {  # check -> (required, optional)
    "row_count": (set(), {"min", "max"}),
    "not_null": ({"column"}, set()),
    "unique": ({"columns"}, set()),
    "range": ({"column"}, {"min", "max"}),
    "accepted_values": ({"column", "values"}, set()),
    "regex": ({"column", "pattern"}, set()),
}


def check_name(check: dict[str, Any]) -> str:
    target = check.get("column") or ",".join(check.get("columns") or [])
    return check.get("name") or (f"{check['check']}({target})" if target else check["check"])


def validate_checks(checks: list[dict[str, Any]]) -> None:
    for index, check in enumerate(checks, 1):
        kind = check.get("check") if isinstance(check, dict) else None
        if kind not in CHECK_FIELDS:
            raise ValueError(f"Unknown check {kind!r} at position {index}; known: {', '.join(CHECK_FIELDS)}")
        required, optional = CHECK_FIELDS[kind]
        missing = required - set(check)
        extra = set(check) - required - optional - {"check", "name"}
        if missing or extra:
            problem = f"missing {sorted(missing)}" if missing else f"unknown field(s) {sorted(extra)}"
            raise ValueError(f"Check {index} ({kind}): {problem}")
        if kind in ("row_count", "range") and "min" not in check and "max" not in check:
            raise ValueError(f"Check {index} ({kind}) needs 'min', 'max' or both")


DESTINATION_MODES = {
    "parquet": ("append", "overwrite", "overwrite_partitions"),
    "postgres": ("append", "overwrite", "replace_partition", "upsert"),
    "snowflake": ("append", "overwrite", "replace_partition", "upsert"),
    "bigquery": ("append", "overwrite", "replace_partition", "upsert"),
}


def validate_destination(destination: dict[str, Any]) -> None:
    """Check a load destination's kind, mode and the columns the mode needs (no data needed)."""
    kind, mode = destination.get("kind", "parquet"), destination.get("mode", "append")
    if kind not in DESTINATION_MODES:
        raise ValueError(f"Unknown destination kind {kind!r}; known kinds: {', '.join(DESTINATION_MODES)}")
    modes = DESTINATION_MODES[kind]
    if mode not in modes:
        raise ValueError(f"Unknown mode {mode!r} for a {kind} destination; use {', '.join(modes)}")
    if mode in ("overwrite_partitions", "replace_partition") and not destination.get("partition_by"):
        raise ValueError(f"mode {mode!r} needs partition_by")
    if mode == "upsert" and not destination.get("keys"):
        raise ValueError("mode 'upsert' needs keys (the columns that identify a row)")
    if kind in ("postgres", "snowflake", "bigquery") and not destination.get("table"):
        raise ValueError(f"a {kind} destination needs 'table'")
    if kind == "bigquery" and mode == "replace_partition" and not destination.get("partition"):
        raise ValueError(
            "a bigquery replace_partition needs 'partition': the partition to replace, e.g. '{{ ds_nodash }}'"
        )
