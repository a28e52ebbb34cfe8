"""Snowflake: reads from the query's own result batches, loads that never half-apply.

Read (on the cluster): the query runs once, with bound parameters; its result batches (Arrow
chunks that Snowflake serves from presigned URLs) are fetched in parallel by Ray read tasks and
cast to the Arrow schema that Snowflake describes for the result, so every block agrees.

Load, in two steps, each safe to repeat:
1. ``stage_load`` (on the cluster): Ray write tasks write their blocks as Parquet files and PUT
   them on a named internal stage (``_raydata_stage`` in the target's schema, under a folder of
   this load); one ``COPY INTO`` loads them into a transient staging table (``PURGE = TRUE``).
2. ``publish`` (on the Airflow worker): one transaction checks and records the load in
   ``_raydata_loads`` and moves the staged rows into the target by mode (``INSERT``,
   ``INSERT OVERWRITE``, ``DELETE`` + ``INSERT``); an upsert is one ``MERGE`` statement (atomic
   on its own, and idempotent). Then the staging table is dropped. DDL commits implicitly in
   Snowflake, so tables are created before the transaction begins.

Identifiers are always double-quoted (quotes doubled); values are always bound (``qmark``).
The connection parameters arrive inside the stage spec; nothing here logs or formats them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import Datasink, Datasource, ReadTask

from .specs import load_columns

LEDGER = "_raydata_loads"
STAGE = "_raydata_stage"
STAGING_PREFIX = "_raydata_"


def quote(name: str) -> str:
    """A Snowflake identifier, double-quoted (so case-sensitive), embedded quotes doubled."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"Invalid Snowflake identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def qualified(*parts: str) -> str:
    return ".".join(quote(p) for p in parts)


def column_list(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(prefix + quote(n) for n in names)


def table_parts(name: str | dict, conn: dict[str, Any]) -> tuple[str, str, str]:
    """``"db.schema.table"``, ``"schema.table"``, ``"table"`` or a dict -> (database, schema, table).

    Missing parts come from the connection's ``database``/``schema``. Use the dict form for
    names that contain dots.
    """
    if isinstance(name, dict):
        parts = [name.get("database"), name.get("schema"), name.get("table")]
    else:
        parts = [None, None, *name.split(".")][-3:] if name.count(".") <= 2 else []
    if len(parts) != 3:
        raise ValueError(f"Invalid table name {name!r}: use 'database.schema.table' or a dict")
    database, schema, table = parts
    database, schema = database or conn.get("database"), schema or conn.get("schema")
    if not (database and schema and table):
        raise ValueError(f"Table {name!r} needs a database and schema (in the name or the connection)")
    return database, schema, table


def connect(params: dict[str, Any], paramstyle: str = "qmark"):
    import snowflake.connector

    return snowflake.connector.connect(**params, paramstyle=paramstyle)


# --- reading -----------------------------------------------------------------------------


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


def source_query(source: dict[str, Any]) -> tuple[str, Any, str]:
    """(query, parameters, paramstyle): a list binds ``?`` server-side; a dict binds
    ``%(name)s`` in the connector (escaped); a ``table`` becomes a quoted SELECT."""
    if bool(source.get("query")) == bool(source.get("table")):
        raise ValueError("A Snowflake source needs exactly one of 'query' or 'table'")
    if source.get("table"):
        return f"SELECT * FROM {qualified(*table_parts(source['table'], source['conn']))}", None, "qmark"
    params = source.get("parameters")
    return source["query"], params or None, "pyformat" if isinstance(params, dict) else "qmark"


def read_snowflake(source: dict[str, Any], storage: dict | None):
    import ray.data

    query, params, paramstyle = source_query(source)
    with connect(source["conn"], paramstyle) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        schema = pa.schema([pa.field(c.name, arrow_type(c)) for c in cur.description])
        batches = [b for b in cur.get_result_batches() or [] if b.rowcount]
    empty = ray.data.from_arrow(schema.empty_table())  # keeps the schema when no row matches
    if not batches:
        return empty
    return empty.union(ray.data.read_datasource(_ResultBatches(batches, schema)))


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


# --- loading: stage on the cluster -------------------------------------------------------


def sf_type(field: pa.Field) -> str:
    t = field.type
    if pa.types.is_dictionary(t):
        return sf_type(field.with_type(t.value_type))
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_uint64(t):
        return "NUMBER(20, 0)"
    if pa.types.is_integer(t):
        return "NUMBER(19, 0)"
    if pa.types.is_floating(t):
        return "FLOAT"
    if pa.types.is_decimal(t) and t.precision <= 38:
        return f"NUMBER({t.precision}, {t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "VARCHAR"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "BINARY"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP_TZ" if t.tz else "TIMESTAMP_NTZ"
    if pa.types.is_time(t):
        return "TIME"
    raise ValueError(f"Column {field.name!r}: Arrow type {t} has no Snowflake mapping; cast it first")


def table_columns(cur, database: str, schema: str, table: str) -> list[str] | None:
    """The table's columns in order, or None when it does not exist."""
    cur.execute(
        f"SELECT column_name FROM {quote(database)}.information_schema.columns"
        " WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    )
    names = [row[0] for row in cur.fetchall()]
    return names or None


def drop_staging_tables(cur, database: str, schema: str, load_id: str) -> None:
    """Drop what earlier tries of this load left behind (a killed task never published them)."""
    cur.execute(
        f"SELECT table_name FROM {quote(database)}.information_schema.tables"
        " WHERE table_schema = ? AND startswith(table_name, ?)",
        [schema, f"{STAGING_PREFIX}{load_id}_"],
    )
    for (name,) in cur.fetchall():
        cur.execute(f"DROP TABLE IF EXISTS {qualified(database, schema, name)}")


def stage_load(ds, destination: dict[str, Any], load_id: str) -> dict[str, Any]:
    """PUT the dataset as Parquet files on an internal stage and COPY them into a staging table."""
    params = destination["conn"]
    database, schema, table = table_parts(destination["table"], params)
    arrow_schema = ds.schema()
    arrow_schema = arrow_schema.base_schema if arrow_schema is not None else pa.schema([])
    columns = arrow_schema.names
    mode, keys, partition_by = load_columns(destination, columns)
    if len({c.upper() for c in columns}) != len(columns):  # COPY matches Parquet columns case-insensitively
        raise ValueError(f"Columns that differ only by case cannot be loaded into Snowflake: {columns}")
    token = uuid.uuid4().hex[:8]
    staging_name = f"{STAGING_PREFIX}{load_id}_{token}"
    staging, target = qualified(database, schema, staging_name), qualified(database, schema, table)
    stage_path = f"@{qualified(database, schema, STAGE)}/{load_id}/{token}/"
    with connect(params) as conn, conn.cursor() as cur:
        drop_staging_tables(cur, database, schema, load_id)
        existing = table_columns(cur, database, schema, table)
        if existing is not None:
            unknown = [c for c in columns if c not in existing]
            if unknown:
                raise ValueError(
                    f"Column {unknown[0]!r} is not in table {schema}.{table} (its columns: {', '.join(existing)})"
                )
            cur.execute(f"CREATE TRANSIENT TABLE {staging} AS SELECT {column_list(columns)} FROM {target} LIMIT 0")
        else:
            definition = ", ".join(f"{quote(f.name)} {sf_type(f)}" for f in arrow_schema)
            cur.execute(f"CREATE TRANSIENT TABLE {staging} ({definition})")
        cur.execute(f"CREATE STAGE IF NOT EXISTS {qualified(database, schema, STAGE)}")
        try:
            ds.write_datasink(SnowflakeStageSink(params, stage_path))
            cur.execute(
                f"COPY INTO {staging} FROM {stage_path} FILE_FORMAT = (TYPE = PARQUET USE_LOGICAL_TYPE = TRUE)"
                " MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE PURGE = TRUE"
            )
            rows = sum(int(row[3] or 0) for row in cur.fetchall() if len(row) > 3 and str(row[1]) == "LOADED")
        except BaseException:
            cur.execute(f"DROP TABLE IF EXISTS {staging}")
            raise
    return {
        "kind": "snowflake",
        "destination": f"{database}.{schema}.{table}",
        "database": database,
        "schema": schema,
        "table": table,
        "staging_table": staging_name,
        "columns": columns,
        "mode": mode,
        "keys": keys,
        "partition_by": partition_by,
        "sequence_by": destination.get("sequence_by"),
        "delete_column": destination.get("delete_column"),
        "load_id": load_id,
        "rows_written": rows,
        "created": existing is None,
    }


class SnowflakeStageSink(Datasink):
    """A Ray Data sink: each write task PUTs its blocks as Parquet files on the load's stage folder."""

    def __init__(self, conn_params: dict[str, Any], stage_path: str):
        self._conn_params = conn_params
        self.stage_path = stage_path

    def __repr__(self) -> str:  # never show the parameters
        return f"SnowflakeStageSink({self.stage_path})"

    def get_name(self) -> str:
        return "SnowflakeStage"

    def write(self, blocks: Iterable, ctx) -> int:
        from ray.data.block import BlockAccessor

        rows = 0
        with tempfile.TemporaryDirectory(prefix="raydata-sf-") as folder, connect(self._conn_params) as conn:
            cur = conn.cursor()
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if not table.num_rows:
                    continue
                path = os.path.join(folder, f"{uuid.uuid4().hex}.parquet")
                pq.write_table(table, path)
                cur.execute(f"PUT 'file://{path}' {self.stage_path} AUTO_COMPRESS = FALSE OVERWRITE = TRUE")
                os.remove(path)
                rows += table.num_rows
        return rows


# --- loading: publish on the Airflow worker ----------------------------------------------


def publish(conn, plan: dict[str, Any]) -> dict[str, Any]:
    """Move the staged rows into the target in one transaction (conn: a qmark connector connection)."""
    database, schema, mode = plan["database"], plan["schema"], plan["mode"]
    target = qualified(database, schema, plan["table"])
    staging = qualified(database, schema, plan["staging_table"])
    ledger = qualified(database, schema, LEDGER)
    columns = column_list(plan["columns"])
    result = {key: plan[key] for key in ("destination", "mode", "rows_written", "load_id")}
    result.update(rows_deleted=0, skipped=False, partitions=[])
    cur = conn.cursor()
    if table_columns(cur, database, schema, plan["staging_table"]) is None:
        raise RuntimeError(f"Staging table {schema}.{plan['staging_table']} is gone: the load must be rerun")
    # DDL commits implicitly: create what the transaction needs before it begins.
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {ledger} (target VARCHAR, load_id VARCHAR, mode VARCHAR, rows_written NUMBER,"
        " loaded_at TIMESTAMP_TZ DEFAULT CURRENT_TIMESTAMP())"
    )
    if table_columns(cur, database, schema, plan["table"]) is None:
        cur.execute(f"CREATE TABLE IF NOT EXISTS {target} AS SELECT {columns} FROM {staging} LIMIT 0")
    record = [plan["destination"], plan["load_id"], mode, plan["rows_written"]]
    if mode == "upsert":
        # One MERGE is atomic by itself, and replaying it gives the same table: it needs no ledger
        # check, so it runs as its own transaction (fakesnow also cannot MERGE inside BEGIN).
        result["rows_deleted"] = _merge(cur, plan, target, staging)
        _record(cur, ledger, record)
        cur.execute(f"DROP TABLE IF EXISTS {staging}")
        return result
    cur.execute("BEGIN")
    try:
        cur.execute(f"SELECT mode FROM {ledger} WHERE target = ? AND load_id = ?", record[:2])
        if mode == "append" and any(row[0] == "append" for row in cur.fetchall()):
            cur.execute("ROLLBACK")  # this run's append was already published: never twice
            cur.execute(f"DROP TABLE IF EXISTS {staging}")
            return {**result, "skipped": True, "rows_written": 0}
        _record(cur, ledger, record)
        if mode == "overwrite":
            cur.execute(f"INSERT OVERWRITE INTO {target} ({columns}) SELECT {columns} FROM {staging}")
        else:
            if mode == "replace_partition":
                keys = plan["partition_by"]
                match = " AND ".join(f"t.{quote(k)} IS NOT DISTINCT FROM s.{quote(k)}" for k in keys)
                cur.execute(
                    f"DELETE FROM {target} AS t USING (SELECT DISTINCT {column_list(keys)} FROM {staging}) AS s"
                    f" WHERE {match}"
                )
                result["rows_deleted"] = cur.rowcount
                cur.execute(f"SELECT DISTINCT {column_list(keys)} FROM {staging}")
                result["partitions"] = sorted("/".join(map(str, row)) for row in cur.fetchall())
            cur.execute(f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {staging}")
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute(f"DROP TABLE IF EXISTS {staging}")
    return result


def _record(cur, ledger: str, record: list) -> None:
    cur.execute(f"DELETE FROM {ledger} WHERE target = ? AND load_id = ?", record[:2])
    cur.execute(f"INSERT INTO {ledger} (target, load_id, mode, rows_written) VALUES (?, ?, ?, ?)", record)


def _merge(cur, plan: dict[str, Any], target: str, staging: str) -> int:
    """MERGE the latest staged row per key (``sequence_by``); flagged rows (``delete_column``) delete."""
    keys, names = plan["keys"], plan["columns"]
    rows = f"SELECT {column_list(names)} FROM {staging}"
    if plan.get("sequence_by"):
        order = f"PARTITION BY {column_list(keys)} ORDER BY {quote(plan['sequence_by'])} DESC"
        rows += f" QUALIFY ROW_NUMBER() OVER ({order}) = 1"
    else:
        cur.execute(
            f"SELECT {column_list(keys)} FROM {staging} GROUP BY {column_list(keys)} HAVING count(*) > 1 LIMIT 1"
        )
        duplicate = cur.fetchone()
        if duplicate is not None:
            named = ", ".join(f"{k}={v!r}" for k, v in zip(keys, duplicate, strict=True))
            raise ValueError(
                f"upsert: key ({named}) appears more than once in this load; set sequence_by to keep the latest"
            )
    match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys)
    updates = ", ".join(f"t.{quote(c)} = s.{quote(c)}" for c in names if c not in keys)
    flag = plan.get("delete_column")
    # As for PostgreSQL: an older version never replaces (or deletes) a newer stored row.
    seq = quote(plan["sequence_by"]) if plan.get("sequence_by") else None
    newer = f" AND (t.{seq} IS NULL OR s.{seq} IS NULL OR t.{seq} <= s.{seq})" if seq else ""
    clauses = [f"WHEN MATCHED AND s.{quote(flag)}{newer} THEN DELETE"] if flag else []
    if updates:
        clauses.append(f"WHEN MATCHED{newer} THEN UPDATE SET {updates}")
    insert = f"WHEN NOT MATCHED{f' AND s.{quote(flag)} IS NOT TRUE' if flag else ''} THEN INSERT"
    clauses.append(f"{insert} ({column_list(names)}) VALUES ({column_list(names, 's.')})")
    cur.execute(f"MERGE INTO {target} AS t USING ({rows}) AS s ON {match} {' '.join(clauses)}")
    counts = dict(zip([d.name.lower() for d in cur.description], cur.fetchone() or (), strict=False))
    return int(counts.get("number of rows deleted") or 0)
