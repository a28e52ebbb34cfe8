"""Readers: a source spec (plain dict) becomes a lazy Ray Dataset.

    {"kind": "files", "path": "s3://raw/orders/{{ ds }}/*.parquet", "format": "parquet",
     "columns": [...], "filter": "o_totalprice > 0", "cast": {"o_orderdate": "date32"}}

Other kinds (SQL, Snowflake, BigQuery) register a reader in ``READERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from . import refs
from .expressions import columns_in, compile_expression
from .storage import expand, filesystem_for
from .types import cast_columns, check_columns

FORMATS: dict[str, tuple[Callable[..., ray.data.Dataset], tuple[str, ...]]] = {
    "parquet": (ray.data.read_parquet, (".parquet",)),
    "csv": (ray.data.read_csv, (".csv", ".csv.gz")),
    "json": (ray.data.read_json, (".json", ".jsonl", ".json.gz", ".jsonl.gz")),
}


def read_source(source: dict[str, Any], storage: dict | None) -> ray.data.Dataset:
    kind = source.get("kind", "files")
    if kind not in READERS:
        raise ValueError(f"Unknown source kind {kind!r}; known kinds: {', '.join(READERS)}")
    ds = READERS[kind](source, storage)
    if kind == "files":
        return ds
    shape = {"casts": source.get("cast") or {}, "row_filter": source.get("filter"), "columns": source.get("columns")}
    if not any(shape.values()):
        return ds
    return ds.map_batches(shape_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, fn_kwargs=shape)


def read_files(source: dict[str, Any], storage: dict | None) -> ray.data.Dataset:
    paths = source["path"] if isinstance(source["path"], list) else [source["path"]]
    fmt = source.get("format") or _infer_format(paths[0])
    if fmt not in FORMATS:
        raise ValueError(f"Unknown file format {fmt!r}; use one of {', '.join(FORMATS)}")
    reader, extensions = FORMATS[fmt]
    fs, _ = filesystem_for(paths[0], storage)
    files = [f for uri in paths for f in expand(fs, filesystem_for(uri, storage)[1], extensions)]
    columns, row_filter = source.get("columns"), source.get("filter")
    kwargs: dict[str, Any] = {"filesystem": fs}
    if fmt == "parquet":
        with fs.open_input_file(files[0]) as handle:
            available = pq.read_schema(handle).names
        needed = list(columns or []) + sorted(columns_in(row_filter) if row_filter else [])
        check_columns(needed, available, f"source {paths[0]}")
        if columns:
            kwargs["columns"] = list(dict.fromkeys(needed))
    ds = reader(files, **kwargs)
    return ds.map_batches(
        shape_batch,
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        fn_kwargs={"casts": source.get("cast") or {}, "row_filter": row_filter, "columns": columns},
    )


def shape_batch(table: pa.Table, casts: dict, row_filter: str | None, columns: list | None) -> pa.Table:
    """Cast, filter and project one batch (one fused step after the read)."""
    check_columns(casts, table.schema.names, "cast")
    table = cast_columns(table, casts)
    if row_filter:
        table = table.filter(compile_expression(row_filter, table.schema))
    if columns:
        check_columns(columns, table.schema.names, "columns")
        table = table.select(columns)
    return table


def read_ref(ref: dict[str, Any] | str, storage: dict | None) -> tuple[ray.data.Dataset, dict]:
    """Read a committed dataset reference (checks its ``_SUCCESS`` marker first)."""
    meta = refs.resolve(ref, storage)
    fs, path = filesystem_for(meta["uri"], storage)
    return ray.data.read_parquet(path, filesystem=fs, partitioning=None), meta


def _infer_format(path: str) -> str:
    for fmt, (_, extensions) in FORMATS.items():
        if path.rstrip("*/").endswith(extensions):
            return fmt
    return "parquet"


def read_postgres(source: dict[str, Any], storage: dict | None) -> ray.data.Dataset:
    from .postgres import read_postgres as read  # psycopg is an optional extra

    return read(source, storage)


def read_snowflake(source: dict[str, Any], storage: dict | None) -> ray.data.Dataset:
    from .snowflake import read_snowflake as read  # the Snowflake connector is an optional extra

    return read(source, storage)


def read_bigquery(source: dict[str, Any], storage: dict | None) -> ray.data.Dataset:
    from .bigquery import read_bigquery as read  # google-cloud-bigquery is an optional extra

    return read(source, storage)


READERS: dict[str, Callable[[dict[str, Any], dict | None], ray.data.Dataset]] = {
    "files": read_files,
    "postgres": read_postgres,
    "snowflake": read_snowflake,
    "bigquery": read_bigquery,
}
