"""Stage a Snowflake load (on the cluster): PUT Parquet files on an internal stage, COPY them
into a transient staging table. ``publish`` (on the worker) moves them into the target."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from ...contracts import DataError, Destination, SnowflakePlan
from .common import (
    INTERNAL_STAGE,
    STAGING_PREFIX,
    column_list,
    connect,
    drop_staging_tables,
    qualified,
    quote,
    table_columns,
    table_parts,
)


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
    raise DataError(f"Column {field.name!r}: Arrow type {t} has no Snowflake mapping; cast it first")


def copy_to_staging(ds, destination: Destination, load_id: str) -> SnowflakePlan:
    """PUT the dataset as Parquet files on an internal stage and COPY them into a staging table."""
    params = destination.conn
    database, schema, table = table_parts(destination.table, params)
    arrow_schema = ds.schema()
    arrow_schema = arrow_schema.base_schema if arrow_schema is not None else pa.schema([])
    columns = arrow_schema.names
    destination.check_columns(columns)
    if len({c.upper() for c in columns}) != len(columns):  # COPY matches Parquet columns case-insensitively
        raise DataError(f"Columns that differ only by case cannot be loaded into Snowflake: {columns}")
    token = uuid.uuid4().hex[:8]
    staging_name = f"{STAGING_PREFIX}{load_id}_{token}"
    staging, target = qualified(database, schema, staging_name), qualified(database, schema, table)
    stage_path = f"@{qualified(database, schema, INTERNAL_STAGE)}/{load_id}/{token}/"
    with connect(params) as conn, conn.cursor() as cur:
        drop_staging_tables(cur, database, schema, load_id)
        existing = table_columns(cur, database, schema, table)
        if existing is not None:
            unknown = [c for c in columns if c not in existing]
            if unknown:
                raise DataError(
                    f"Column {unknown[0]!r} is not in table {schema}.{table} (its columns: {', '.join(existing)})"
                )
            cur.execute(f"CREATE TRANSIENT TABLE {staging} AS SELECT {column_list(columns)} FROM {target} LIMIT 0")
        else:
            definition = ", ".join(f"{quote(f.name)} {sf_type(f)}" for f in arrow_schema)
            cur.execute(f"CREATE TRANSIENT TABLE {staging} ({definition})")
        cur.execute(f"CREATE STAGE IF NOT EXISTS {qualified(database, schema, INTERNAL_STAGE)}")
        try:
            ds.write_datasink(InternalStageSink(params, stage_path))
            cur.execute(
                f"COPY INTO {staging} FROM {stage_path} FILE_FORMAT = (TYPE = PARQUET USE_LOGICAL_TYPE = TRUE)"
                " MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE PURGE = TRUE"
            )
            rows = sum(int(row[3] or 0) for row in cur.fetchall() if len(row) > 3 and str(row[1]) == "LOADED")
        except BaseException:
            cur.execute(f"DROP TABLE IF EXISTS {staging}")
            raise
    return SnowflakePlan(
        destination=f"{database}.{schema}.{table}",
        database=database,
        schema=schema,
        table=table,
        staging_table=staging_name,
        mode=destination.mode,
        columns=columns,
        upsert=destination.upsert,
        partition_by=list(destination.partition_by),
        load_id=load_id,
        rows_written=rows,
        created=existing is None,
    )


class InternalStageSink(Datasink):
    """A Ray Data sink: each write task PUTs its blocks as Parquet files on the load's stage folder."""

    def __init__(self, conn_params: dict[str, Any], stage_path: str):
        self._conn_params = conn_params
        self.stage_path = stage_path

    def __repr__(self) -> str:  # never show the parameters
        return f"InternalStageSink({self.stage_path})"

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
