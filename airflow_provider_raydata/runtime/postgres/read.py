"""Read (on the cluster): ``ray.data.read_sql`` sharded on a key column, with bound parameters,
cast to the Arrow schema that PostgreSQL describes for the query (so every block agrees)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
from psycopg import sql

from ...contracts import Source
from .common import connect, table_parts

if TYPE_CHECKING:
    import ray.data

ARROW_FOR_PG = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "oid": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "date": pa.date32(),
    "time": pa.time64("us"),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "bytea": pa.binary(),
}


def read_postgres(source: Source, storage: dict | None) -> tuple[ray.data.Dataset, pa.Schema]:
    """The query's rows, and their schema as PostgreSQL describes it."""
    import ray
    import ray.data

    query, params = source_query(source)
    conn_params = source.conn
    schema, text_oids = describe_query(conn_params, query, params)
    key = source.shard_key
    kwargs: dict[str, Any] = {"sql_params": params, "override_num_blocks": 1}
    if key:
        # Ray's default MD5 shard hash fails on PostgreSQL. The cast to int8 keeps
        # ABS() from overflowing on hashtext's minimum value; Ray wraps this as HASH_FN(KEYS).
        ident = sql.Identifier(key).as_string()
        kwargs.update(shard_keys=[f"hashtext({ident}::text)::int8"], shard_hash_fn="")
        kwargs["override_num_blocks"] = int(source.num_shards or max(2, ray.cluster_resources().get("CPU", 2)))
    ds = ray.data.read_sql(query, _ConnectionFactory(conn_params, text_oids), **kwargs)
    empty = ray.data.from_arrow(schema.empty_table())  # keeps the schema when no row matches
    conformed = ds.map_batches(_conform, fn_kwargs={"schema": schema}, batch_format="pyarrow", batch_size=None)
    return empty.union(conformed), schema


def source_query(source: Source) -> tuple[str, Any]:
    """The query text and its bound parameters; a ``table`` becomes a quoted SELECT. An incremental
    ``window`` wraps it in ``WHERE start <= column < end``, its bounds bound as parameters too."""
    if source.table:
        schema, table = table_parts(source.table)
        query, params = sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table)).as_string(), None
    else:
        query, params = source.query, source.parameters or None
    window = source.window
    if not window:
        return query, params
    column = sql.Identifier(window.column).as_string()
    bounds = [(op, value) for value, op in ((window.start, ">="), (window.end, "<")) if value is not None]
    if not bounds:
        return query, params
    if isinstance(params, dict):
        names = [f"_raydata_window_{i}" for i in range(len(bounds))]
        test = " AND ".join(f"q.{column} {op} %({name})s" for (op, _), name in zip(bounds, names, strict=True))
        params = {**params, **{name: value for (_, value), name in zip(bounds, names, strict=True)}}
    else:
        test = " AND ".join(f"q.{column} {op} %s" for op, _ in bounds)
        params = [*(params or []), *(value for _, value in bounds)]
    return f"SELECT * FROM ({query}) AS q WHERE {test}", params


class _ConnectionFactory:
    """Picklable connection factory for Ray's read tasks; types without an Arrow twin load as text."""

    def __init__(self, params: dict[str, Any], text_oids: list[int]):
        self._params = params
        self.text_oids = text_oids

    def __repr__(self) -> str:  # never show the parameters
        return "PostgresConnectionFactory()"

    def __call__(self):
        from psycopg.types.string import TextLoader

        conn = connect(self._params)
        for oid in self.text_oids:  # numeric included: exact text, cast to decimal afterwards
            conn.adapters.register_loader(oid, TextLoader)
        return conn


def describe_query(conn_params: dict, query: str, params: Any) -> tuple[pa.Schema, list[int]]:
    """The Arrow schema of a query's result, from PostgreSQL's own description (no rows read),
    and the type OIDs to load as text (numeric, and types without an Arrow counterpart)."""
    from psycopg.postgres import types as pg_types

    with connect(conn_params) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM ({query}) AS q LIMIT 0", params)
        fields, text_oids = [], []
        for column in cur.description:
            info = pg_types.get(column.type_code)
            name = info.name if info else ""
            if name == "numeric":
                precision, scale = column.precision, column.scale
                arrow = pa.decimal128(precision, scale) if precision else pa.decimal128(38, 9)
            else:
                arrow = ARROW_FOR_PG.get(name, pa.string())
            if name not in ARROW_FOR_PG:
                text_oids.append(column.type_code)
            fields.append(pa.field(column.name, arrow))
    return pa.schema(fields), sorted(set(text_oids))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)
