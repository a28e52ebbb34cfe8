"""Readers (on the cluster): a ``contracts.Source`` becomes a lazy Ray Dataset.

    {"kind": "files", "path": "s3://raw/orders/{{ ds }}/*.parquet", "format": "parquet",
     "columns": [...], "filter": "o_totalprice > 0", "cast": {"o_orderdate": "date32"}}

Other kinds (SQL, Snowflake, BigQuery) register a reader in ``READERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import Partitioning

from ..contracts import DataError, DatasetRef, IncrementalWindow, Source
from . import refs
from .expressions import columns_in, compile_expression
from .storage import expand, filesystem_for
from .types import arrow_type, cast_columns, check_columns

FORMATS: dict[str, tuple[Callable[..., ray.data.Dataset], tuple[str, ...]]] = {
    "parquet": (ray.data.read_parquet, (".parquet",)),
    "csv": (ray.data.read_csv, (".csv", ".csv.gz")),
    "json": (ray.data.read_json, (".json", ".jsonl", ".json.gz", ".jsonl.gz")),
}


def read_source(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema | None]:
    """The source as a lazy dataset (cast, filtered, projected), and the schema its rows have,
    known without reading them (from file footers or headers, the query's description, or the
    ``cast`` spec), so that zero rows still carry it; None when nothing declares one."""
    ds, declared = READERS[source.kind](source, storage)
    columns = list(source.columns) if source.columns else None
    casts = {**source.partition_columns, **source.cast}
    shape = {"casts": casts, "row_filter": source.filter, "columns": columns}
    if source.window and not (source.kind == "postgres" or source.window.partitioned):
        shape["window"] = source.window  # PostgreSQL applies it in its query; partitions by their paths
    if declared is None and casts:  # e.g. JSON, which has no header: the cast names columns and types
        names = list(dict.fromkeys([*(columns or []), *casts]))
        declared = pa.schema([(name, arrow_type(casts.get(name, "null"))) for name in names])
    schema = shape_batch(declared.empty_table(), **shape).schema if declared is not None else None
    if any(shape.values()):
        ds = ds.map_batches(shape_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, fn_kwargs=shape)
    return ds, schema


def read_files(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema | None]:
    paths = source.paths
    fmt = source.format or _infer_format(paths[0])
    if fmt not in FORMATS:
        raise DataError(f"Unknown file format {fmt!r}; use one of {', '.join(FORMATS)}")
    reader, extensions = FORMATS[fmt]
    fs, _ = filesystem_for(paths[0], storage)
    all_files = [
        found for uri in paths for found in expand(fs, filesystem_for(uri, storage)[1], extensions, scheme_of(uri))
    ]
    window = source.window
    files = in_window_partitions(all_files, window) if window and window.partitioned else all_files
    columns, row_filter = list(source.columns) if source.columns else None, source.filter
    kwargs: dict[str, Any] = {"filesystem": fs, "partitioning": None}
    if fmt == "parquet":
        needed = list(columns or []) + sorted(columns_in(row_filter) if row_filter else [])
        needed = [name for name in needed if name not in source.partition_columns]  # from the paths
        schema = check_parquet_files(fs, files or all_files[:1], needed or None, scheme_of(paths[0]))
        check_columns(needed, schema.names, f"source {paths[0]}")
        if columns:
            kwargs["columns"] = list(dict.fromkeys(needed))
    else:
        schema = csv_header(fs, (files or all_files)[0]) if fmt == "csv" else None
    if source.partition_columns:
        kwargs["partitioning"] = Partitioning("hive")  # adds every key of the path as a string column
        kwargs.pop("columns", None)  # the projection runs after the read, with the partition columns
        keys = {part.split("=", 1)[0] for path in all_files for part in path.split("/")[:-1] if "=" in part}
        check_columns(source.partition_columns, sorted(keys), f"partition_columns of {paths[0]}")
        if schema is not None:
            schema = _with_fields(schema, [pa.field(name, pa.string()) for name in sorted(keys)])
    if not files:  # no partition in this window: an empty increment, with the source's schema
        return ray.data.from_arrow((schema or pa.schema([])).empty_table()), schema
    ds = reader(files, **kwargs)
    unlisted = sorted(keys - set(source.partition_columns)) if source.partition_columns else []
    return (ds.drop_columns(unlisted) if unlisted else ds), _without(schema, unlisted)


def _with_fields(schema: pa.Schema, fields: list[pa.Field]) -> pa.Schema:
    for added in fields:
        if added.name not in schema.names:
            schema = schema.append(added)
    return schema


def _without(schema: pa.Schema | None, names: list[str]) -> pa.Schema | None:
    if schema is None:
        return None
    return pa.schema([f for f in schema if f.name not in names])


def scheme_of(uri: str) -> str:
    """``s3://`` of ``s3://bucket/key`` (``""`` for a local path): the part a filesystem path lacks."""
    return uri[: uri.index("://") + 3] if "://" in uri else ""


def unreadable_file(source: Source, storage: dict | None) -> str | None:
    """After a CSV or JSON read failed on the data: ``uri: the parser's error`` of the first file
    that does not parse (the error Ray Data reports names no file), or None."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    fmt = source.format or _infer_format(source.paths[0])
    if source.kind != "files" or fmt not in ("csv", "json"):
        return None
    fs, _ = filesystem_for(source.paths[0], storage)
    for uri in source.paths:
        files = expand(fs, filesystem_for(uri, storage)[1], FORMATS[fmt][1])
        if source.window and source.window.partitioned:
            files = in_window_partitions(files, source.window)
        for path in files[:1000]:
            try:
                with fs.open_input_stream(path, compression="detect") as handle:
                    if fmt == "csv":
                        pacsv.open_csv(handle).read_all()
                    else:
                        pajson.read_json(handle)
            except pa.ArrowInvalid as exc:
                return f"{scheme_of(uri)}{path}: {exc}"
    return None


def csv_header(fs, path: str) -> pa.Schema:
    """A CSV file's columns from its header (and types from its first block: ``null`` when the
    file has no rows)."""
    import pyarrow.csv as pacsv

    with fs.open_input_stream(path, compression="detect") as handle:
        return pacsv.open_csv(handle).schema


def check_parquet_files(fs, files: list[str], columns: list[str] | None, scheme: str = "") -> pa.Schema:
    """Read every file's footer (in parallel) before any row: a corrupt or truncated file, or a
    file whose columns differ from the first one's (schema drift), is named instead of failing
    somewhere inside Ray Data. ``columns``: only these must agree (others may come and go)."""

    def schema_of(path: str) -> pa.Schema:
        try:
            with fs.open_input_file(path) as handle:
                return pq.read_schema(handle)
        except pa.ArrowInvalid as exc:
            raise DataError(f"Corrupt or truncated Parquet file {scheme}{path}: {exc}") from None
        except OSError as exc:  # a failed read (or a footer pyarrow cannot decode): retried
            raise OSError(f"Cannot read the Parquet footer of {scheme}{path}: {exc}") from exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(schema_of, files))
    first = schemas[0]
    compared = columns or first.names
    for path, schema in zip(files[1:], schemas[1:], strict=True):
        for name in compared:
            if name not in schema.names:
                raise DataError(f"Schema drift: {scheme}{path} has no column {name!r} (unlike {scheme}{files[0]})")
            if name in first.names and schema.field(name).type != first.field(name).type:
                raise DataError(
                    f"Schema drift: column {name!r} is {schema.field(name).type} in {scheme}{path} "
                    f"but {first.field(name).type} in {scheme}{files[0]}"
                )
        if columns is None and set(schema.names) - set(first.names):
            extra = sorted(set(schema.names) - set(first.names))
            raise DataError(
                f"Schema drift: {scheme}{path} has extra column(s) {', '.join(extra)} (unlike {scheme}{files[0]})"
            )
    return first


def in_window_partitions(files: list[str], window: IncrementalWindow) -> list[str]:
    """Files of the date partitions (``.../{column}=YYYY-MM-DD/...``) that overlap the window."""
    start, end = _bound(window.start), _bound(window.end)
    marker = f"{window.column}="
    chosen = []
    for path in files:
        segment = next((part for part in path.split("/") if part.startswith(marker)), None)
        if segment is None:
            raise DataError(f"{path} is not under a '{marker}YYYY-MM-DD' partition directory")
        day = datetime.fromisoformat(unquote(segment[len(marker) :]))
        day = day if day.tzinfo else day.replace(tzinfo=UTC)
        if (start is None or day + timedelta(days=1) > start) and (end is None or day < end):
            chosen.append(path)
    return chosen


def window_filter(table: pa.Table, window: IncrementalWindow) -> pa.Table:
    """Rows with ``start <= column < end`` (either bound may be open)."""
    column = window.column
    check_columns([column], table.schema.names, "incremental window")
    kind = table.schema.field(column).type
    condition = None
    for bound, compare in ((window.start, pc.greater_equal), (window.end, pc.less)):
        if bound is None:
            continue
        value = _bound(bound) if pa.types.is_timestamp(kind) or pa.types.is_date(kind) else bound
        if pa.types.is_date(kind):
            value = value.date()
        elif pa.types.is_timestamp(kind) and kind.tz is None:
            value = value.astimezone(UTC).replace(tzinfo=None)  # naive timestamps are taken as UTC
        test = compare(table[column], pa.scalar(value).cast(kind))
        condition = test if condition is None else pc.and_(condition, test)
    return table if condition is None else table.filter(pc.fill_null(condition, False))


def _bound(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def shape_batch(
    table: pa.Table, casts: dict, row_filter: str | None, columns: list | None, window: IncrementalWindow | None = None
) -> pa.Table:
    """Cast, filter and project one batch (one fused step after the read)."""
    check_columns(casts, table.schema.names, "cast")
    table = cast_columns(table, casts)
    if window and not window.partitioned:
        table = window_filter(table, window)
    if row_filter:
        table = table.filter(compile_expression(row_filter, table.schema))
    if columns:
        check_columns(columns, table.schema.names, "columns")
        table = table.select(columns)
    return table


def read_ref(ref: DatasetRef, storage: dict | None) -> tuple[ray.data.Dataset, DatasetRef]:
    """Read a committed dataset (checks its ``_SUCCESS`` marker first); return it and its reference."""
    meta = refs.resolve(ref, storage)
    fs, path = filesystem_for(meta.uri, storage)
    return ray.data.read_parquet(path, filesystem=fs, partitioning=None), meta


def _infer_format(path: str) -> str:
    for fmt, (_, extensions) in FORMATS.items():
        if path.rstrip("*/").endswith(extensions):
            return fmt
    return "parquet"


def read_postgres(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    from .postgres.read import read_postgres as read  # psycopg is an optional extra

    return read(source, storage)


def read_snowflake(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    from .snowflake.read import read_snowflake as read  # the Snowflake connector is an optional extra

    return read(source, storage)


def read_bigquery(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    from .bigquery.read import read_bigquery as read  # google-cloud-bigquery is an optional extra

    return read(source, storage)


READERS: dict[str, Callable[[Source, dict | None], tuple[ray.data.Dataset, pa.Schema | None]]] = {
    "files": read_files,
    "postgres": read_postgres,
    "snowflake": read_snowflake,
    "bigquery": read_bigquery,
}
