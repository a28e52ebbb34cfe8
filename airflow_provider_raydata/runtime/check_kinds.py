"""Check kinds: everything one kind of data-quality check is and does, one class per kind (facts
read at DAG parse time, measurements made on the cluster).

To add a kind, write its class and register it in ``CHECKS`` (then test it: the planted defects in
``tests/quality_data.py`` must cover it). Its class attributes are facts that ``runtime.specs``
reads at DAG parse time (fields, level, what the comparators compare); its methods are what
``runtime.checks`` calls during the one distributed pass:

- a row kind (``RowKind``) says which rows pass (``passes``) and how its rule reads in the report
  (``rule``); its value is the fraction of evaluated rows that pass, and failing rows are
  quarantined;
- a table kind (``TableKind``) measures a small partial metric per batch (``partial``) and merges
  the batches' partials into its value (``merge``);
- a schema kind (``SchemaKind``) judges the dataset's schema alone (``result``).

``runtime.specs`` imports this module at DAG parse time: it imports neither Airflow nor Ray, and
no pyarrow module beyond what ``runtime.types`` and ``runtime.expressions`` load anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..contracts import CheckResult, DataError
from .expressions import compile_expression
from .types import arrow_type

ROW, TABLE, SCHEMA = "row", "table", "schema"
# What a kind's comparators compare, which decides the values they accept (specs._comparator_problem).
MEASURES = ("count", "fraction", "ratio", "number", "value", "seconds")


@dataclass(frozen=True)
class Measured:
    """A check's measured value and details for the report. ``judged=False``: there is nothing
    to compare yet (a first run), so the check passes."""

    value: Any
    details: dict[str, Any] = field(default_factory=dict)
    judged: bool = True


class CheckKind:
    """The facts every kind declares."""

    level: str  # ROW, TABLE or SCHEMA
    measures: str | None = None  # one of MEASURES (None: no comparators)
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    default: dict[str, Any] | None = None  # the expectation when no comparator is given
    aliases: tuple[tuple[str, str], ...] = ()  # (field, comparator): fields that stand for comparators
    column_types: tuple[str, ...] = ()  # type classes the checked column must have (types.type_class)

    def validate(self, check: dict[str, Any], label: str) -> None:
        """Raise ValueError on what is wrong with this kind's own fields (runtime.specs checks
        the shared rules: required and unknown fields, comparators, column names)."""

    def reads_every_column(self, check: dict[str, Any]) -> bool:
        """True if the check reads more than ``runtime.specs.columns_used`` can tell."""
        return False

    def lookup(self, check: dict[str, Any]) -> tuple[Any, str] | None:
        """The other dataset (a reference) and its key column that ``column``'s values are looked
        up in, or None. ``runtime.checks`` reads the key set once, before any row is read."""
        return None


class RowKind(CheckKind):
    """Passes or fails each row. ``on_values``: the rule tests each non-null value of ``column``,
    so nulls pass and are not evaluated (null is not_null's business) and failing values are shown
    as examples; otherwise a row whose result is null fails."""

    level = ROW
    measures = "fraction"
    default = {"equal_to": 1}
    on_values = True

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        """One boolean per row (``keys``: the key set of ``lookup``)."""
        raise NotImplementedError

    def rule(self, check: dict[str, Any]) -> str:
        raise NotImplementedError


class TableKind(CheckKind):
    """Measures one value over all rows, from small per-batch partial metrics."""

    level = TABLE
    unit = ""  # after the expectation in the report

    def partial(self, table: pa.Table, check: dict[str, Any]) -> Any:
        """One batch's partial metric (small: it is pickled to the driver)."""
        raise NotImplementedError

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        raise NotImplementedError


class SchemaKind(CheckKind):
    level = SCHEMA

    def result(self, check: dict[str, Any], schema: pa.Schema) -> CheckResult:
        """The check's entry in the report (it reads no rows)."""
        raise NotImplementedError


# --- table kinds ---------------------------------------------------------------------------------


class RowCount(TableKind):
    measures = "count"
    optional = ("min", "max")
    aliases = (("min", "geq_to"), ("max", "leq_to"))

    def partial(self, table: pa.Table, check: dict[str, Any]) -> int:
        return table.num_rows

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        return Measured(sum(parts))


class RowCountChange(TableKind):
    """Rows / the previous successful run's rows (``previous_rows``: the operator finds them)."""

    measures = "ratio"
    optional = ("previous_rows",)
    unit = " × previous rows"

    def partial(self, table: pa.Table, check: dict[str, Any]) -> int:
        return table.num_rows

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        rows, previous = sum(parts), check.get("previous_rows")
        details = {"rows": rows, "previous_rows": previous}
        if previous is None:
            return Measured(None, {**details, "note": "no previous successful run: not judged"}, judged=False)
        return Measured(rows / previous if previous else (1.0 if rows == 0 else None), details)


class NullCount(TableKind):
    measures = "count"
    required = ("column",)
    default = {"equal_to": 0}

    def partial(self, table: pa.Table, check: dict[str, Any]) -> tuple[int, int]:
        return table.column(check["column"]).null_count, table.num_rows

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        return Measured(sum(p[0] for p in parts))


class NullFraction(NullCount):
    measures = "fraction"

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        nulls, rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return Measured(nulls / rows if rows else 0.0)


class DistinctCount(TableKind):
    """Distinct non-null keys: each batch sends its distinct keys, merged by count_distinct_keys."""

    measures = "count"
    required = ("column",)

    def partial(self, table: pa.Table, check: dict[str, Any]) -> tuple[int, pa.Table]:
        keys = table.select(check.get("columns") or [check["column"]])
        keys = keys.drop_null() if any(c.null_count for c in keys.columns) else keys
        return keys.num_rows, distinct_rows(keys)

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        return Measured(count_distinct_keys([p[1] for p in parts]))


class Unique(DistinctCount):
    """Duplicated keys (non-null keys minus distinct keys); the key is ``column`` or ``columns``."""

    required = ()
    optional = ("column", "columns")
    default = {"equal_to": 0}
    unit = " duplicates"

    def validate(self, check: dict[str, Any], label: str) -> None:
        if ("column" in check) == ("columns" in check):
            raise DataError(f"{label}: give 'column' or 'columns' (a composite key), one of them")

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        return Measured(sum(p[0] for p in parts) - count_distinct_keys([p[1] for p in parts]))


class Min(TableKind):
    measures = "value"
    required = ("column",)
    column_types = ("number", "time", "string")
    end = "min"

    def partial(self, table: pa.Table, check: dict[str, Any]) -> Any:
        return pc.min_max(table.column(check["column"]))[self.end].as_py()

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        values = [p for p in parts if p is not None]
        if not values:
            return _no_values()
        return Measured(_number(min(values) if self.end == "min" else max(values)))


class Max(Min):
    end = "max"


class Freshness(Max):
    """Seconds from the newest value to ``as_of`` (the operator passes the data interval's end)."""

    measures = "seconds"
    optional = ("as_of",)
    column_types = ("time",)
    unit = " s old"

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        values = [p for p in parts if p is not None]
        if not values:
            return _no_values()
        newest, as_of = max(values), _as_datetime(check.get("as_of") or datetime.now(UTC))
        age = (as_of - _as_datetime(newest)).total_seconds()
        return Measured(age, {"newest": str(newest), "as_of": as_of.isoformat()})


class Sum(TableKind):
    measures = "number"
    required = ("column",)
    column_types = ("number",)

    def partial(self, table: pa.Table, check: dict[str, Any]) -> tuple[Any, int]:
        column = table.column(check["column"])
        if pa.types.is_integer(column.type):  # exact: int64 sums would wrap around silently
            column = column.cast(pa.decimal128(38, 0))
        return pc.sum(column).as_py(), len(column) - column.null_count

    def merge(self, parts: list, check: dict[str, Any]) -> Measured:
        total, count = sum((p[0] for p in parts if p[0] is not None), 0), sum(p[1] for p in parts)
        return Measured(_number(self.of(total, count))) if count else _no_values()

    def of(self, total: Any, count: int) -> Any:
        return total


class Mean(Sum):
    def of(self, total: Any, count: int) -> Any:
        return total / count


# --- schema --------------------------------------------------------------------------------------


class Schema(SchemaKind):
    """Schema drift: columns removed, added, or with another type than declared."""

    required = ("columns",)
    optional = ("allow_extra",)

    def validate(self, check: dict[str, Any], label: str) -> None:
        if not isinstance(check["columns"], dict) or not check["columns"]:
            raise DataError(f"{label}: 'columns' must map column names to Arrow types")
        for type_name in check["columns"].values():
            arrow_type(type_name)

    def result(self, check: dict[str, Any], schema: pa.Schema) -> CheckResult:
        expected = {name: arrow_type(type_name) for name, type_name in check["columns"].items()}
        actual = {f.name: f.type for f in schema}
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
        extra = ", extra columns allowed" if allow_extra else ""
        value = {k: v for k, v in drift.items() if v} or "no drift"
        expected_text = f"{len(expected)} declared columns and types{extra}"
        return CheckResult(check["name"], "schema", None, value, expected_text, passed, check["policy"])


# --- row kinds -----------------------------------------------------------------------------------


class NotNull(RowKind):
    required = ("column",)
    on_values = False

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        return table.column(check["column"]).is_valid()

    def rule(self, check: dict[str, Any]) -> str:
        return "not null"


class AcceptedValues(RowKind):
    required = ("column", "values")

    def validate(self, check: dict[str, Any], label: str) -> None:
        if not isinstance(check["values"], (list, tuple)):
            raise DataError(f"{label}: 'values' must be a list")

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        column = table.column(check["column"])
        return pc.is_in(column, value_set=pa.array(check["values"]).cast(column.type))

    def rule(self, check: dict[str, Any]) -> str:
        return f"in {check.get('values')}"


class Regex(RowKind):
    required = ("column", "pattern")
    column_types = ("string",)

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        return pc.match_substring_regex(table.column(check["column"]), check["pattern"])

    def rule(self, check: dict[str, Any]) -> str:
        return f"matches {check.get('pattern')!r}"


class Range(RowKind):
    """``min`` <= value <= ``max``; either bound may be left out."""

    required = ("column",)
    optional = ("min", "max")
    column_types = ("number", "time", "string")

    def validate(self, check: dict[str, Any], label: str) -> None:
        if "min" not in check and "max" not in check:
            raise DataError(f"{label} needs 'min', 'max' or both")
        if _is_number(check.get("min")) and _is_number(check.get("max")) and check["min"] > check["max"]:
            raise DataError(f"{label}: 'min' {check['min']} is above 'max' {check['max']}")

    def values(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        return column

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        values = self.values(table.column(check["column"]))
        passes = pa.array(np.ones(len(values), dtype=bool))
        for bound, test in (("min", pc.greater_equal), ("max", pc.less_equal)):
            if check.get(bound) is not None:
                passes = pc.and_(passes, test(values, _scalar(check[bound], values.type)))
        return passes

    def rule(self, check: dict[str, Any]) -> str:
        bounds = (("min", ">="), ("max", "<="))
        return " and ".join(f"{sign} {check[k]}" for k, sign in bounds if check.get(k) is not None)


class StringLength(Range):
    column_types = ("string",)

    def values(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        return pc.utf8_length(column)

    def rule(self, check: dict[str, Any]) -> str:
        return f"length {super().rule(check)}"


class Predicate(RowKind):
    """``expr``: a row filter expression (runtime.expressions) that each row must satisfy."""

    required = ("expr",)
    on_values = False

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        return evaluate_expression(table, check["expr"])

    def rule(self, check: dict[str, Any]) -> str:
        return str(check.get("expr"))


class Custom(RowKind):
    """``fn(batch, **fn_kwargs)`` returns one boolean per row; it must be deterministic, since
    the rows are split by a second evaluation."""

    required = ("fn",)
    optional = ("columns", "batch_format", "fn_kwargs")
    on_values = False

    def validate(self, check: dict[str, Any], label: str) -> None:
        if not (callable(check["fn"]) or ":" in str(check["fn"])):
            raise DataError(f"{label}: 'fn' must be a callable or 'package.module:function'")

    def reads_every_column(self, check: dict[str, Any]) -> bool:
        return "columns" not in check

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        from .transforms import resolve_callable  # imports Ray: only here, on the cluster

        fn = resolve_callable(check["fn"])
        batch = table.select(check["columns"]) if "columns" in check else table
        fmt = check.get("batch_format", "pandas")
        result = fn(batch.to_pandas() if fmt == "pandas" else batch, **(check.get("fn_kwargs") or {}))
        if isinstance(result, pa.ChunkedArray):
            result = result.combine_chunks()
        result = result if isinstance(result, pa.Array) else pa.array(np.asarray(result))
        if len(result) != table.num_rows or not pa.types.is_boolean(result.type):
            raise DataError(
                f"check {check['name']}: the function must return one boolean per row "
                f"(got {len(result)} values of type {result.type} for {table.num_rows} rows)"
            )
        return result

    def rule(self, check: dict[str, Any]) -> str:
        return f"{getattr(check.get('fn'), '__name__', check.get('fn'))} is true"


class ReferentialIntegrity(RowKind):
    """Each value of ``column`` is a key of another dataset (``ref``; its ``ref_column``, by
    default the same name)."""

    required = ("column", "ref")
    optional = ("ref_column",)

    def lookup(self, check: dict[str, Any]) -> tuple[Any, str] | None:
        return check["ref"], check.get("ref_column", check["column"])

    def passes(self, table: pa.Table, check: dict[str, Any], keys: pa.Array | None) -> pa.Array:
        return pc.is_in(table.column(check["column"]), value_set=keys)

    def rule(self, check: dict[str, Any]) -> str:
        return f"present in {check.get('ref_column', check.get('column'))} of the other dataset"


# The order is the order of the "known:" list in error messages.
CHECKS: dict[str, CheckKind] = {
    "row_count": RowCount(),
    "row_count_change": RowCountChange(),
    "null_count": NullCount(),
    "null_fraction": NullFraction(),
    "distinct_count": DistinctCount(),
    "unique": Unique(),
    "min": Min(),
    "max": Max(),
    "mean": Mean(),
    "sum": Sum(),
    "freshness": Freshness(),
    "schema": Schema(),
    "not_null": NotNull(),
    "accepted_values": AcceptedValues(),
    "regex": Regex(),
    "range": Range(),
    "string_length": StringLength(),
    "predicate": Predicate(),
    "custom": Custom(),
    "referential_integrity": ReferentialIntegrity(),
}


# --- shared by the kinds -------------------------------------------------------------------------


def evaluate_expression(table: pa.Table, expression: str) -> pa.Array:
    import pyarrow.dataset as pds  # not loaded at DAG parse time

    result = pds.dataset(table).to_table(columns={"value": compile_expression(expression, table.schema)})
    return result.column("value").combine_chunks()


def distinct_rows(table: pa.Table) -> pa.Table:
    """The distinct rows of a table. One thread: faster here than pyarrow's threaded hash
    aggregation, and a Ray task has one CPU anyway. Compacted: the group-by's output chunks
    keep oversized buffers that would otherwise be pickled whole. -0.0 and 0.0 are one value (as
    in SQL and pandas): adding 0.0 turns -0.0 into 0.0 before the bitwise hash."""
    floats = [i for i, f in enumerate(table.schema) if pa.types.is_floating(f.type)]
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


def _no_values() -> Measured:
    return Measured(None, {"note": "no non-null values"})


def _scalar(value: Any, like: pa.DataType) -> pa.Scalar:
    """A bound as a scalar of the column's type: dates and timestamps may be written as strings."""
    if isinstance(value, str) and (pa.types.is_date(like) or pa.types.is_timestamp(like)):
        return pa.scalar(value).cast(like)
    return pa.scalar(value)


def _logical(type_: pa.DataType) -> str:
    """string, large_string and string_view are one logical type here (Ray writes large_string)."""
    name = str(type_)
    for variant, base in (("large_string", "string"), ("string_view", "string"), ("large_binary", "binary")):
        name = name.replace(variant, base)
    return name.replace("binary_view", "binary")


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
