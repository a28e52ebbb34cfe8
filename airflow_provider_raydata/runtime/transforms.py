"""Transform steps (on the cluster): plain dicts applied to a Ray Dataset as one lazy pipeline.

{"op": "map_batches", "fn": "pkg.mod:fn", "batch_format": "pandas", "fn_kwargs": {...},
 "output_schema": {"new_or_retyped_column": "arrow type"}}  (runtime.batches)
{"op": "select", "columns": [...]}            {"op": "rename", "columns": {"old": "new"}}
{"op": "cast", "columns": {"col": "float64"}} {"op": "filter", "expr": "qty > 0"}
{"op": "drop_duplicates", "keys": [...], "order_by": "updated_at", "keep": "last"}
{"op": "join", "right": <dataset ref>, "on": [...], "right_on": [...], "how": "inner|left|outer"}
{"op": "aggregate", "by": [...], "aggs": {"revenue": ["sum", "price"], "n": ["count"]}}
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data
from ray.data.aggregate import Count, CountDistinct, Max, Mean, Min, Sum

from ..contracts import DataError, DatasetRef
from . import refs, stage_log
from .batches import UserFunctionError, is_async, step_label, typed_batches
from .expressions import compile_expression
from .sources import read_ref
from .specs import (
    ARROW_JOIN_TYPES,
    BROADCAST_JOIN_MAX_BYTES,
    JOIN_TYPES,
    RAY_MAP_OPTIONS,
    validate_steps,
)
from .types import arrow_type, cast_columns, check_columns

AGGREGATES = {
    "sum": Sum,
    "count": Count,
    "mean": Mean,
    "min": Min,
    "max": Max,
    "count_distinct": CountDistinct,
}


def resolve_callable(fn: Callable | str) -> Callable:
    """A callable as is, or ``"package.module:function"`` imported on the cluster."""
    if callable(fn):
        return fn
    module_name, _, attr = str(fn).partition(":")
    if not attr:
        raise DataError(f"Function reference {fn!r} must look like 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"Cannot import {fn!r} on the Ray cluster: {exc}") from exc
    return target


def apply_steps(
    ds: ray.data.Dataset, steps: list[dict], storage: dict | None, rows_hint: int | None = None
) -> ray.data.Dataset:
    """``rows_hint``: the input's row count, used to size the batches of broadcast joins."""
    validate_steps(steps)
    schema = ds.schema()
    columns: list[str] | None = schema.names if schema is not None else None  # unknown after map_batches
    for index, step in enumerate(steps, 1):
        label = f"step {index} ({step['op']})"
        if step["op"] == "aggregate" and schema is not None:  # what it aggregates, should no row reach it
            earlier = functools.partial(steps_schema, schema.base_schema, steps[: index - 1], storage)
            ds, columns = _aggregate(ds, step, columns, label, storage, rows_hint, schema_before=earlier)
            continue
        ds, columns = APPLY[step["op"]](ds, step, columns, label, storage, rows_hint)
    return ds


def apply_steps_here(table: pa.Table, steps: list[dict], storage: dict | None) -> pa.Table:
    """The steps applied in this process to a small table: for an input with no rows, whose
    result (empty, or one row of a whole-table aggregate, or a right join's right side) and
    schema Ray Data cannot tell (it calls no function on an empty block)."""
    for index, step in enumerate(steps, 1):
        label = f"step {index} ({step['op']})"
        try:
            table = HERE[step["op"]](table, step, storage, label)
        except UserFunctionError as exc:
            raise DataError(
                f"{exc}: called with an empty batch (no rows reached it) to learn its output columns; "
                "handle an empty batch, or declare them with output_schema={...}"
            ) from exc
        except DataError:
            raise
        except Exception as exc:
            hint = ": declare them with output_schema={...}" if step["op"] == "map_batches" else ""
            raise DataError(
                f"{label}: applied to no rows the step raised {type(exc).__name__}: {exc}; "
                f"so its output columns are unknown{hint}"
            ) from exc
    return table


def steps_schema(schema: pa.Schema, steps: list[dict], storage: dict | None) -> pa.Schema:
    """The schema of the steps' result when it has no rows."""
    return apply_steps_here(schema.empty_table(), steps, storage).schema


def _map_batches_here(table: pa.Table, step: dict, storage: dict | None, label: str) -> pa.Table:
    """A batch function applied to a small table. On no rows, ``output_schema`` stands in for a
    function that is not called here (a callable class, which may load a model; an async one)
    or that fails on an empty batch: the input's columns with the declared ones."""
    fn, declared = resolve_callable(step["fn"]), step.get("output_schema") or {}
    label = step_label(label, fn)
    stands_in = declared and not table.num_rows
    if stands_in and (isinstance(fn, type) or is_async(fn)):
        return _declared(table, declared)
    if is_async(fn):
        raise DataError(f"{label}: an async function does not run here on no rows: declare its output_schema={{...}}")
    typed = typed_batches(fn, step.get("batch_format") or "pandas", declared, label)
    try:
        result = (typed() if isinstance(fn, type) else typed)(table, **(step.get("fn_kwargs") or {}))
        if inspect.isgenerator(result):
            batches = [batch for batch in result if isinstance(batch, pa.Table)]
            result = pa.concat_tables(batches) if batches else _declared(table, declared)
    except UserFunctionError:
        if stands_in:
            return _declared(table, declared)
        raise
    return result


def _declared(table: pa.Table, declared: dict[str, str]) -> pa.Table:
    """No rows of ``table``'s columns with the ``declared`` types, and the declared new columns."""
    types = {name: arrow_type(kind) for name, kind in declared.items()}
    fields = [field.with_type(types.pop(field.name)) if field.name in types else field for field in table.schema]
    return pa.schema(fields + [pa.field(name, kind) for name, kind in types.items()]).empty_table()


def _join_here(table: pa.Table, step: dict, storage: dict | None, label: str) -> pa.Table:
    right_ref = DatasetRef.parse(step["right"], f"{label} 'right'")
    how = step.get("how", "inner")
    if how == "outer" or table.num_rows:  # the right side's rows reach the result (read whole: see README)
        right = pa.concat_tables(ray.get(read_ref(right_ref, storage)[0].to_arrow_refs()))
    else:
        right = refs.arrow_schema(right_ref, storage).empty_table()
    on = list(step["on"])
    right_on = list(step.get("right_on") or on)
    collide = (set(table.column_names) - set(on)) & (set(right.column_names) - set(right_on))
    kinds = {"inner": "inner", "left": "left outer", "outer": "full outer"}
    return broadcast_join(table, right, on, right_on, kinds[how], "_right" if collide else None)


def _aggregate_here(table: pa.Table, step: dict, storage: dict | None, label: str) -> pa.Table:
    by, specs = list(step.get("by") or []), []
    for spec in step["aggs"].values():
        fn, *args = spec if isinstance(spec, (list, tuple)) else [spec]
        specs.append(([], "count_all") if fn == "count" and not args else (args[0], fn))
    result = table.group_by(by, use_threads=False).aggregate(specs)
    produced = ["count_all" if fn == "count_all" else f"{column}_{fn}" for column, fn in specs]  # pyarrow's names
    columns = [result[key] for key in by] + [result[name] for name in produced]
    return pa.Table.from_arrays(columns, names=[*by, *step["aggs"]])


HERE = {
    "map_batches": _map_batches_here,
    "select": lambda table, step, storage, label: table.select(list(step["columns"])),
    "rename": lambda table, step, storage, label: table.rename_columns(
        [step["columns"].get(name, name) for name in table.column_names]
    ),
    "cast": lambda table, step, storage, label: cast_columns(table, step["columns"]),
    "filter": lambda table, step, storage, label: filter_batch(table, step["expr"], label),
    "drop_duplicates": lambda table, step, storage, label: keep_one_per_key(
        table, list(step["keys"]), step.get("order_by"), step.get("keep")
    ),
    "join": _join_here,
    "aggregate": _aggregate_here,
}


def _map_batches(ds, step, columns, label, storage, rows_hint=None):
    options = {k: step[k] for k in RAY_MAP_OPTIONS if step.get(k) is not None}
    fn = resolve_callable(step["fn"])
    if isinstance(fn, type) and "concurrency" not in options:
        options["concurrency"] = 1  # a callable class runs in actors and needs a pool size
    batch_format = step.get("batch_format") or "pandas"
    fn = typed_batches(fn, batch_format, step.get("output_schema"), step_label(label, fn))
    if stage_log.forward_prints_to is not None:
        fn = stage_log.forwarding_prints(fn, *stage_log.forward_prints_to)
    # The typed function converts pyarrow batches itself; an async one gets its format from Ray.
    batch_format = batch_format if is_async(fn) else "pyarrow"
    ds = ds.map_batches(fn, batch_format=batch_format, fn_kwargs=step.get("fn_kwargs"), **options)
    return ds, None


def _select(ds, step, columns, label, storage, rows_hint=None):
    if columns is not None:
        check_columns(step["columns"], columns, label)
    return ds.select_columns(list(step["columns"])), list(step["columns"])


def _rename(ds, step, columns, label, storage, rows_hint=None):
    mapping = step["columns"]
    if columns is not None:
        check_columns(mapping, columns, label)
        columns = [mapping.get(c, c) for c in columns]
    return ds.rename_columns(mapping), columns


def _cast(ds, step, columns, label, storage, rows_hint=None):
    if columns is not None:
        check_columns(step["columns"], columns, label)
    return _arrow_map(ds, cast_columns, casts=step["columns"]), columns


def _filter(ds, step, columns, label, storage, rows_hint=None):
    return _arrow_map(ds, filter_batch, expr=step["expr"], label=label), columns


def filter_batch(table: pa.Table, expr: str, label: str) -> pa.Table:
    try:
        return table.filter(compile_expression(expr, table.schema))
    except ValueError as exc:
        raise DataError(f"{label}: {exc}") from None


def _drop_duplicates(ds, step, columns, label, storage, rows_hint=None):
    keys, order_by = list(step["keys"]), step.get("order_by")
    if columns is not None:
        check_columns(keys + ([order_by] if order_by else []), columns, label)
    options = {"key_columns": keys, "order_by": order_by, "keep": step.get("keep")}
    # Two phases, both vectorised: each block keeps one row per key, then the survivors are
    # shuffled by a hash of the key into buckets and each bucket keeps one row per key. Ray's
    # groupby(keys).map_groups calls Python once per key (8 s for 8,000 rows in the demo).
    buckets = max(int(ray.cluster_resources().get("CPU", 2)), math.ceil((rows_hint or 0) / DEDUP_BUCKET_ROWS), 1)
    hashed = _arrow_map(ds, keep_one_per_key, **options, buckets=buckets)
    deduped = hashed.groupby(BUCKET).map_groups(keep_one_per_key, batch_format="pyarrow", fn_kwargs=options)
    return deduped, columns


BUCKET = "__raydata_bucket"
DEDUP_BUCKET_ROWS = 1_000_000  # rows per bucket of drop_duplicates' shuffle: one task's table each


def keep_one_per_key(
    table: pa.Table, key_columns: list[str], order_by: str | None, keep: str | None, buckets: int | None = None
) -> pa.Table:
    """One row per key: the first or last by ``order_by`` (else in the table's order). With
    ``buckets``, the rows kept get a bucket column (a hash of the key); without, it is dropped."""
    position = "__raydata_position"
    if order_by:
        table = table.sort_by([(order_by, "ascending")])  # a stable sort
    numbered = table.append_column(position, pa.array(np.arange(table.num_rows)))
    pick = "max" if keep == "last" else "min"
    picked = numbered.group_by(key_columns, use_threads=False).aggregate([(position, pick)])
    kept = table.take(np.sort(picked[f"{position}_{pick}"].to_numpy()))  # in the table's order
    if buckets is None:
        return kept.drop_columns([BUCKET]) if BUCKET in kept.column_names else kept
    hashes = pd.util.hash_pandas_object(kept.select(key_columns).to_pandas(), index=False).to_numpy()
    return kept.append_column(BUCKET, pa.array((hashes % buckets).astype(np.int64)))


def _join(ds, step, columns, label, storage, rows_hint=None):
    right, meta = read_ref(DatasetRef.parse(step["right"], f"{label} 'right'"), storage)
    on = list(step["on"])
    right_on = list(step.get("right_on") or on)
    how = step.get("how", "inner")
    right_columns = list(meta.schema or right.schema().names)
    if columns is not None:
        check_columns(on, columns, label)
    check_columns(right_on, right_columns, f"{label}, right side {meta.uri}")
    collide = columns is not None and bool((set(columns) - set(on)) & (set(right_columns) - set(right_on)))
    suffix = "_right" if collide or columns is None else None
    out_columns = None
    if columns is not None:
        extra = [c for c in right_columns if c not in right_on]
        out_columns = columns + [f"{c}_right" if suffix and c in columns else c for c in extra]
    broadcast = step.get("broadcast")
    if broadcast is None:
        broadcast = how in ARROW_JOIN_TYPES and (meta.size_bytes or math.inf) <= BROADCAST_JOIN_MAX_BYTES
    if broadcast:
        if how not in ARROW_JOIN_TYPES:
            raise DataError(f"{label}: a broadcast join supports only inner and left joins, not {how!r}")
        table = pa.concat_tables(ray.get(right.to_arrow_refs()))
        options = {"right": ray.put(table), "on": on, "right_on": right_on, "how": ARROW_JOIN_TYPES[how]}
        return ds.map_batches(
            broadcast_join,
            batch_format="pyarrow",
            batch_size=broadcast_join_batch_rows(rows_hint),
            zero_copy_batch=True,
            fn_kwargs={**options, "suffix": suffix},
        ), out_columns
    partitions = step.get("num_partitions") or max(2, int(ray.cluster_resources().get("CPU", 2)))
    joined = ds.join(
        right,
        join_type=JOIN_TYPES[how],
        num_partitions=partitions,
        on=tuple(on),
        right_on=tuple(right_on),
        right_suffix=suffix,
    )
    return joined, out_columns


def broadcast_join_batch_rows(rows_hint: int | None) -> int | None:
    """Rows per batch for a broadcast join: each batch rebuilds the hash table of the right side
    (2 s for 1.5M TPC-H orders here), so use about one batch per CPU, within memory-safe bounds."""
    if not rows_hint:
        return None
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    return min(max(math.ceil(rows_hint / cpus), 65_536), 2_000_000)


def broadcast_join(table: pa.Table, right, on, right_on, how, suffix) -> pa.Table:
    right_table = right if isinstance(right, pa.Table) else ray.get(right)
    for left_key, right_key in zip(on, right_on, strict=True):  # e.g. string against large_string
        kind = table.schema.field(left_key).type
        if right_table.schema.field(right_key).type != kind:
            index = right_table.schema.get_field_index(right_key)
            right_table = right_table.set_column(index, right_key, right_table[right_key].cast(kind))
    return table.join(right_table, keys=on, right_keys=right_on, join_type=how, right_suffix=suffix, coalesce_keys=True)


def _aggregate(ds, step, columns, label, storage, rows_hint=None, schema_before=None):
    by = list(step.get("by") or [])
    aggs = []
    for name, spec in step["aggs"].items():
        fn, *args = spec if isinstance(spec, (list, tuple)) else [spec]
        aggs.append((name, fn, args[0] if args else None))
    if columns is not None:
        check_columns(by + [c for _, _, c in aggs if c], columns, label)
    out_columns = by + [name for name, _, _ in aggs]
    # Two phases: every block is pre-aggregated with pyarrow (vectorised, no shuffle) and the
    # far smaller partials are merged here. Ray's groupby (a shuffle with Python accumulators
    # for count_distinct: 77 s for 0.9M rows into 45k groups here) stays the fallback for
    # keys with so many groups that the partials would not fit one process.
    partial_refs = _arrow_map(ds, partial_aggregate, by=by, aggs=aggs).materialize().to_arrow_refs()
    partials = pa.concat_tables(ray.get(partial_refs)) if partial_refs else None
    if (partials is None or not partials.num_rows) and schema_before is not None:  # no row reached it
        return ray.data.from_arrow(_aggregate_here(schema_before().empty_table(), step, storage, label)), out_columns
    if partials is not None and partials.num_rows <= LOCAL_MERGE_MAX_ROWS:
        return ray.data.from_arrow(merge_partials(partials, by, aggs)), out_columns
    ray_aggs = [AGGREGATES[fn](*([column] if column else []), alias_name=name) for name, fn, column in aggs]
    if by:
        return ds.groupby(by).aggregate(*ray_aggs), out_columns
    return ray.data.from_items([ds.aggregate(*ray_aggs)]), out_columns


LOCAL_MERGE_MAX_ROWS = 5_000_000


def partial_aggregate(table: pa.Table, by: list[str], aggs: list[tuple]) -> pa.Table:
    specs, names = [], []
    for name, fn, column in aggs:
        if fn == "count" and column is None:
            specs.append(([], "count_all"))
            names.append(f"{name}#n")
        elif fn == "count":
            specs.append((column, "count"))
            names.append(f"{name}#n")
        elif fn == "mean":
            specs += [(column, "sum"), (column, "count")]
            names += [f"{name}#sum", f"{name}#n"]
        elif fn == "count_distinct":
            specs.append((column, "distinct"))
            names.append(f"{name}#distinct")
        else:  # sum, min, max
            specs.append((column, fn))
            names.append(f"{name}#{fn}")
    keys = by or ["__all__"]  # pyarrow has no whole-table "distinct": group by a constant instead
    if not by:
        table = table.append_column("__all__", pa.array(np.zeros(table.num_rows, dtype=np.int8)))
    return table.group_by(keys, use_threads=False).aggregate(specs).rename_columns(keys + names)


def merge_partials(partials: pa.Table, by: list[str], aggs: list[tuple]) -> pa.Table:
    frame = partials.to_pandas()
    keys = by or ["__all__"]
    grouped = frame.groupby(keys, dropna=False, sort=False)
    merged = {}
    for name, fn, _ in aggs:
        if fn == "count":
            merged[name] = grouped[f"{name}#n"].sum()
        elif fn == "mean":
            merged[name] = grouped[f"{name}#sum"].sum(min_count=1) / grouped[f"{name}#n"].sum()
        elif fn == "count_distinct":
            values = frame[keys + [f"{name}#distinct"]].explode(f"{name}#distinct")
            merged[name] = values.groupby(keys, dropna=False, sort=False)[f"{name}#distinct"].nunique()
        elif fn == "sum":
            merged[name] = grouped[f"{name}#sum"].sum(min_count=1)
        else:
            merged[name] = getattr(grouped[f"{name}#{fn}"], fn)()
    result = pd.DataFrame(merged).reset_index()
    if not by:
        result = result.drop(columns="__all__")
    # pandas infers types from the values (a decimal sum's precision from one day's numbers):
    # keys, sums, mins and maxes keep the types pyarrow gave the partials.
    kept = {key: partials.schema.field(key).type for key in by}
    kept.update(
        {name: partials.schema.field(f"{name}#{fn}").type for name, fn, _ in aggs if fn in ("sum", "min", "max")}
    )
    table = pa.Table.from_pandas(result, preserve_index=False)
    return cast_columns(
        table, {name: str(kind) for name, kind in kept.items() if table.schema.field(name).type != kind}
    )


def _arrow_map(ds: ray.data.Dataset, fn: Callable, **kwargs) -> ray.data.Dataset:
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, fn_kwargs=kwargs)


APPLY = {
    "map_batches": _map_batches,
    "select": _select,
    "rename": _rename,
    "cast": _cast,
    "filter": _filter,
    "drop_duplicates": _drop_duplicates,
    "join": _join,
    "aggregate": _aggregate,
}
