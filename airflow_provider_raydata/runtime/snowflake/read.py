"""Read a Snowflake query (on the cluster) from its result batches, in parallel Ray read tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from ray.data.datasource import Datasource, ReadTask

from ...contracts import Source
from .common import connect, qualified, table_parts

if TYPE_CHECKING:
    import ray.data


def arrow_type(column) -> pa.DataType:
    """The Arrow type for a column of a Snowflake result (``cursor.description``)."""
    from snowflake.connector.constants import FIELD_ID_TO_NAME

    name = FIELD_ID_TO_NAME[column.type_code]
    if name == "FIXED":
        return pa.int64() if not column.scale else pa.decimal128(column.precision, column.scale)
    return {
        "REAL": pa.float64(),
        "DATE": pa.date32(),
        "TIMESTAMP_NTZ": pa.timestamp("ns"),
        "TIMESTAMP_LTZ": pa.timestamp("ns", tz="UTC"),
        "TIMESTAMP_TZ": pa.timestamp("ns", tz="UTC"),
        "TIME": pa.time64("ns"),
        "BINARY": pa.binary(),
        "BOOLEAN": pa.bool_(),
    }.get(name, pa.string())  # TEXT, and VARIANT/OBJECT/ARRAY as their JSON text


def source_query(source: Source) -> tuple[str, Any, str]:
    """(query, parameters, paramstyle): a list binds ``?`` server-side; a dict binds
    ``%(name)s`` in the connector (escaped); a ``table`` becomes a quoted SELECT."""
    if source.table:
        return f"SELECT * FROM {qualified(*table_parts(source.table, source.conn))}", None, "qmark"
    params = source.parameters
    return source.query, params or None, "pyformat" if isinstance(params, dict) else "qmark"


def read_snowflake(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    """The query's rows, and their schema from the cursor's description."""
    import ray.data

    query, params, paramstyle = source_query(source)
    with connect(source.conn, paramstyle) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        schema = pa.schema([pa.field(c.name, arrow_type(c)) for c in cur.description])
        batches = [b for b in cur.get_result_batches() or [] if b.rowcount]
    empty = ray.data.from_arrow(schema.empty_table())  # keeps the schema when no row matches
    if not batches:
        return empty, schema
    return empty.union(ray.data.read_datasource(_ResultBatches(batches, schema))), schema


class _ResultBatches(Datasource):
    """Read tasks over a query's result batches (each downloads its chunks; no credentials)."""

    def __init__(self, batches: list, schema: pa.Schema):
        self._batches, self._schema = batches, schema

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(b.uncompressed_size or 0 for b in self._batches) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        from ray.data.block import BlockMetadata

        groups = [self._batches[i :: max(1, parallelism)] for i in range(min(parallelism, len(self._batches)))]
        return [
            ReadTask(
                lambda group=group, schema=self._schema: [_fetch(group, schema)],
                BlockMetadata(num_rows=sum(b.rowcount for b in group), size_bytes=None, exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for group in groups
        ]


def _fetch(batches: Sequence, schema: pa.Schema) -> pa.Table:
    tables = [b.to_arrow() for b in batches]
    return pa.concat_tables(
        [pa.Table.from_arrays([t.column(f.name).cast(f.type) for f in schema], schema=schema) for t in tables]
    )
