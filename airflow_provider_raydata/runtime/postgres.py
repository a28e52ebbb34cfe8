"""PostgreSQL: parallel reads, and loads that never half-apply.

Read (on the cluster): ``ray.data.read_sql`` sharded on a key column, with bound parameters,
cast to the Arrow schema that PostgreSQL describes for the query (so every block agrees).

Load (``load``, on the cluster), from the committed Parquet files (pyarrow reads them and
CSV-encodes them for psycopg's COPY; no Ray Data pipeline in between):
1. ``stage_load`` checks the columns against the target (and an upsert's keys for repeats and
   for the unique index); for overwrite and upsert it COPYs the files into a new staging table
   next to the target, one Ray task per cluster CPU in parallel.
2. ``publish`` moves the rows into the target in one transaction: append and replace_partition
   COPY the files straight into it (a staging table would cost a second copy of every row),
   overwrite swaps the staging table in, upsert inserts from it ``ON CONFLICT``. An upsert into
   a missing or empty table (a first load, without ``sequence_by`` or ``delete_column``) is
   staged and swapped in like an overwrite, unless the table has gained rows by then.
3. That transaction is left open until the Airflow task, holding the stage's result, asks the
   stage executor to commit it (``finish``). If the task dies first, the transaction ends with
   the stage's process (the retry supersedes it, or the executor's wait runs out) and PostgreSQL
   rolls it back: the target is exactly as it was. Staging tables of failed loads are dropped;
   the retry drops those of killed ones (same load id).

The connection parameters arrive inside the stage spec; nothing here logs or formats them.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .refs import data_files
from .specs import DataError, load_columns
from .storage import filesystem_for
from .types import repeated_key

LEDGER = "_raydata_loads"
# Modes whose publish COPYs straight into the target: a staging table would cost a second copy.
DIRECT_MODES = ("append", "replace_partition")
STAGING_PREFIX = "_raydata_"
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# A held load's transaction outlives the stage executor's commit wait (120 s) by this bound at most.
IDLE_IN_TRANSACTION_SECONDS = 180
COPY_BATCH_ROWS = 262_144  # CSV-encoded per chunk; smaller chunks cost more per row


def _sql():  # psycopg is an optional extra: import it where it is used
    from psycopg import sql

    return sql


def table_parts(name: str | dict) -> tuple[str, str]:
    """``"schema.table"``, ``"table"`` or ``{"schema": ..., "table": ...}`` -> (schema, table).

    The parts are always quoted as identifiers (psycopg.sql.Identifier), never pasted into SQL.
    """
    if isinstance(name, dict):
        schema, table = name.get("schema") or "public", name["table"]
    else:
        schema, _, table = name.rpartition(".") if "." in name else ("public", "", name)
    if not table or not schema:
        raise ValueError(f"Invalid table name {name!r}: use 'schema.table' or 'table'")
    return schema, table


def idents(names: Iterable[str]):
    """A comma-separated list of quoted identifiers."""
    sql = _sql()
    return sql.SQL(", ").join(map(sql.Identifier, names))


def connect(params: dict[str, Any]):
    import psycopg

    return psycopg.connect(**params)


# --- reading -----------------------------------------------------------------------------

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


def read_postgres(source: dict[str, Any], storage: dict | None):
    import ray
    import ray.data

    query, params = source_query(source)
    conn_params = source["conn"]
    schema, text_oids = describe_query(conn_params, query, params)
    key = source.get("shard_key")
    kwargs: dict[str, Any] = {"sql_params": params, "override_num_blocks": 1}
    if key:
        # Ray's default MD5 shard hash fails on PostgreSQL. The cast to int8 keeps
        # ABS() from overflowing on hashtext's minimum value; Ray wraps this as HASH_FN(KEYS).
        ident = _sql().Identifier(key).as_string()
        kwargs.update(shard_keys=[f"hashtext({ident}::text)::int8"], shard_hash_fn="")
        kwargs["override_num_blocks"] = int(source.get("num_shards") or max(2, ray.cluster_resources().get("CPU", 2)))
    ds = ray.data.read_sql(query, _ConnectionFactory(conn_params, text_oids), **kwargs)
    empty = ray.data.from_arrow(schema.empty_table())  # keeps the schema when no row matches
    return empty.union(ds.map_batches(_conform, fn_kwargs={"schema": schema}, batch_format="pyarrow", batch_size=None))


def source_query(source: dict[str, Any]) -> tuple[str, Any]:
    """The query text and its bound parameters; a ``table`` becomes a quoted SELECT. An incremental
    ``window`` wraps it in ``WHERE start <= column < end``, its bounds bound as parameters too."""
    sql = _sql()
    if bool(source.get("query")) == bool(source.get("table")):
        raise ValueError("A PostgreSQL source needs exactly one of 'query' or 'table'")
    if source.get("table"):
        schema, table = table_parts(source["table"])
        query, params = sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table)).as_string(), None
    else:
        query, params = source["query"], source.get("parameters") or None
    window = source.get("window")
    if not window:
        return query, params
    column = sql.Identifier(window["column"]).as_string()
    bounds = [(op, window[name]) for name, op in (("start", ">="), ("end", "<")) if window.get(name) is not None]
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


# --- loading: stage on the cluster -------------------------------------------------------


def pg_type(field: pa.Field) -> str:
    t = field.type
    if pa.types.is_dictionary(t):
        return pg_type(field.with_type(t.value_type))
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_int8(t) or pa.types.is_int16(t) or pa.types.is_uint8(t):
        return "smallint"
    if pa.types.is_int32(t) or pa.types.is_uint16(t):
        return "integer"
    if pa.types.is_int64(t) or pa.types.is_uint32(t):
        return "bigint"
    if pa.types.is_uint64(t):
        return "numeric(20, 0)"
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "real"
    if pa.types.is_float64(t):
        return "double precision"
    if pa.types.is_decimal(t):
        return f"numeric({t.precision}, {t.scale})"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp without time zone"
    if pa.types.is_time(t):
        return "time"
    raise ValueError(f"Column {field.name!r}: Arrow type {t} has no PostgreSQL COPY mapping; cast it first")


def table_columns(cur, schema: str, table: str) -> list[str] | None:
    """The target's columns in order, or None when the table does not exist."""
    cur.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum",
        [_sql().Identifier(schema, table).as_string()],
    )
    names = [row[0] for row in cur.fetchall()]
    if names:
        return names
    cur.execute("SELECT to_regclass(%s)", [_sql().Identifier(schema, table).as_string()])
    return None if cur.fetchone()[0] is None else []


def ensure_ledger(cur, schema: str) -> None:
    """The table recording published loads (target, load id), in the target's schema."""
    sql = _sql()
    cur.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (target text, load_id text, mode text, rows bigint,"
            " loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (target, load_id))"
        ).format(sql.Identifier(schema, LEDGER))
    )


def drop_staging_tables(cur, schema: str, load_id: str) -> None:
    """Drop what earlier tries of this load left behind (a killed task never published them)."""
    sql = _sql()
    cur.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE %s",
        [schema, f"{STAGING_PREFIX}{load_id}_%"],
    )
    for (name,) in cur.fetchall():
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, name)))


def mark_staging_table(cur, staging, load_id: str) -> None:
    """Record when a staging table was created (database clock) for the orphan sweep."""
    sql = _sql()
    cur.execute("SELECT now()")
    note = json.dumps({"raydata_staging": True, "load_id": load_id, "created_at": cur.fetchone()[0].isoformat()})
    cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(staging, sql.Literal(note)))


def stage_load(uri: str, storage: dict | None, destination: dict[str, Any], load_id: str) -> dict[str, Any]:
    """Check the load against the target and return the plan for ``publish``. For overwrite and
    upsert, first COPY the committed Parquet dataset at ``uri`` into a new staging table in
    parallel; append and replace_partition COPY inside the publish transaction instead."""
    sql = _sql()
    schema_name, table = table_parts(destination["table"])
    fs, path = filesystem_for(uri, storage)
    files = data_files(fs, path)
    arrow_schema = _dataset_schema(fs, files)
    columns = arrow_schema.names
    mode, keys, partition_by = load_columns(destination, columns)
    plan = {
        "kind": "postgres",
        "destination": f"{schema_name}.{table}",
        "schema": schema_name,
        "table": table,
        "staging_table": None,
        "columns": columns,
        "column_types": None,  # PostgreSQL types from the Arrow schema, for a table this load creates
        "mode": mode,
        "keys": keys,
        "partition_by": partition_by,
        "sequence_by": destination.get("sequence_by"),
        "delete_column": destination.get("delete_column"),
        "first_load": False,  # an upsert staged like an overwrite, see _is_first_load
        "load_id": load_id,
        "uri": uri,
        "files": [f.path for f in files],
        "rows_written": 0,
        "copy_seconds": 0.0,
        "index_seconds": 0.0,  # building the staging table's indexes after its COPY
    }
    target = sql.Identifier(schema_name, table)
    staging_name = f"{STAGING_PREFIX}{load_id}_{uuid.uuid4().hex[:8]}"
    staging = sql.Identifier(schema_name, staging_name)
    with connect(destination["conn"]) as conn, conn.cursor() as cur:
        # Committed now, not in the long publish transaction: loads into other tables of the
        # schema would otherwise wait for that whole transaction on the first CREATE.
        ensure_ledger(cur, schema_name)
        drop_staging_tables(cur, schema_name, load_id)
        existing = table_columns(cur, schema_name, table)
        if existing is None:
            plan["column_types"] = [pg_type(f) for f in arrow_schema]
        else:
            unknown = [c for c in columns if c not in existing]
            if unknown:
                raise DataError(
                    f"Column {unknown[0]!r} is not in table {schema_name}.{table} (its columns: {', '.join(existing)})"
                )
        if mode in DIRECT_MODES:
            return plan
        if mode == "upsert" and existing is not None:
            _check_conflict_target(cur, plan, target, target)  # before anything is copied
        plan["first_load"] = _is_first_load(plan) and (existing is None or not _has_rows(cur, target))
        if mode == "upsert" and not plan["sequence_by"] and not plan["first_load"]:
            # Checked before anything is copied (a first load's unique index build finds them), by
            # pyarrow on the files' key columns: PostgreSQL's GROUP BY on staging took 10 s for 6M rows.
            found = pa.concat_tables([pq.read_table(f.path, columns=keys, filesystem=fs) for f in files])
            if repeated := repeated_key(found, keys):
                raise DataError(repeated)
        if mode == "overwrite" or plan["first_load"]:
            # A full, logged table like the target: publish swaps it in (no second copy of the rows).
            like = sql.SQL("LIKE {} INCLUDING ALL").format(target) if existing is not None else definition(plan)
            cur.execute(sql.SQL("CREATE TABLE {} ({})").format(staging, like))
        elif existing is not None:
            cur.execute(
                sql.SQL("CREATE UNLOGGED TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                    staging, idents(columns), target
                )
            )
        else:
            cur.execute(sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(staging, definition(plan)))
        rebuild = _drop_indexes(cur, conn, staging)
        mark_staging_table(cur, staging, load_id)  # same transaction: never visible unmarked
    started = time.perf_counter()
    try:
        plan["rows_written"] = copy_in_parallel(
            uri, fs, files, storage, destination["conn"], (schema_name, staging_name), columns
        )
        copied = time.perf_counter()
        _rebuild_indexes(destination["conn"], rebuild, f"{schema_name}.{table}")
    except BaseException:
        with connect(destination["conn"]) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staging))
        raise
    plan.update(
        staging_table=staging_name,
        copy_seconds=round(copied - started, 3),
        index_seconds=round(time.perf_counter() - copied, 3),
    )
    return plan


def _rebuild_indexes(conn_params: dict, rebuild: list, target: str) -> None:
    with connect(conn_params) as conn, _named_duplicates(target):
        for statement in rebuild:
            conn.execute(statement)


@contextmanager
def _named_duplicates(target: str):
    """A unique index build that meets a repeated key fails the load (without retries), naming the
    key; the index's own name, a staging table's, would mean nothing to the user."""
    from psycopg import errors

    try:
        yield
    except errors.UniqueViolation as exc:
        raise DataError(f"{target} has a unique index that this load breaks: {exc.diag.message_detail}") from None


def _drop_indexes(cur, conn, table) -> list:
    """Drop the indexes (and the constraints they back) of a new, empty table and return the
    statements that rebuild them, in their order: building an index once after the COPY is
    cheaper than updating it row by row (6M rows with a primary key: 29 s of parallel COPY with
    the key in place, against 23 s without it plus 5 s to build it after)."""
    sql = _sql()
    cur.execute(
        "SELECT i.indexrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), pg_get_indexdef(i.indexrelid)"
        " FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid"
        " WHERE i.indrelid = to_regclass(%s) ORDER BY i.indexrelid",
        [table.as_string(conn)],
    )
    rebuild = []
    # The definitions are PostgreSQL's own (pg_get_*def), with every identifier already quoted.
    for index, constraint, constraint_definition, index_definition in cur.fetchall():
        if constraint:
            name = sql.Identifier(constraint)
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, name))
            rebuild.append(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(table, name, sql.SQL(constraint_definition))
            )
        else:
            cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(index)))
            rebuild.append(sql.SQL(index_definition))
    return rebuild


def definition(plan: dict[str, Any]):
    """A table's column list from the Arrow schema's PostgreSQL types."""
    sql = _sql()
    pairs = zip(plan["columns"], plan["column_types"], strict=True)
    return sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind in pairs)


def _dataset_schema(fs, files) -> pa.Schema:
    if not files:
        raise ValueError("The input dataset has no Parquet files to load")
    with fs.open_input_file(files[0].path) as handle:
        return pq.ParquetFile(handle).schema_arrow


def copy_in_parallel(
    uri: str, fs, files, storage: dict | None, conn_params: dict, table: tuple[str, str], columns: list[str]
) -> int:
    """COPY Parquet files into ``table`` with one Ray task per CPU of the cluster, each streaming its
    share (whole files, or row groups when there are fewer files than tasks) through one COPY.

    Plain tasks rather than a Ray Data pipeline: the input is already a committed Parquet dataset,
    and Ray Data's read/repartition/write plan took twice as long here for the same COPYs. Tasks
    are not retried by Ray: a COPY that committed before its worker died would be loaded twice.
    """
    import ray

    tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    shares = _shares(fs, files, tasks)
    copy = ray.remote(num_cpus=1, max_retries=0)(copy_parquet)
    named = copy.options(name=f"COPY {table[0]}.{table[1]}")
    return sum(ray.get([named.remote(uri, share, storage, conn_params, table, columns) for share in shares if share]))


def _shares(fs, files, tasks: int) -> list[list[tuple[str, list[int] | None]]]:
    """Split the files into ``tasks`` shares of about equal size: (path, row groups or None for all)."""
    if len(files) >= tasks:
        pieces = [((f.path, None), f.size) for f in files]
    else:
        pieces = []
        for f in files:
            with fs.open_input_file(f.path) as handle:
                meta = pq.ParquetFile(handle).metadata
            pieces += [((f.path, [i]), meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    shares: list[list] = [[] for _ in range(tasks)]
    loads = [0] * tasks
    for piece, size in sorted(pieces, key=lambda p: -p[1]):  # largest first, onto the lightest share
        lightest = loads.index(min(loads))
        shares[lightest].append(piece)
        loads[lightest] += size
    return shares


def copy_parquet(
    uri: str, share, storage: dict | None, conn_params: dict, table: tuple[str, str], columns: list[str]
) -> int:
    """One COPY of a share of Parquet files, committed on its own connection; returns the rows written."""
    with connect(conn_params) as conn, conn.cursor() as cur:
        return copy_files(cur, filesystem_for(uri, storage)[0], share, table, columns)


def copy_files(cur, fs, share, table: tuple[str, str], columns: list[str]) -> int:
    """COPY ``(path, row groups or None)`` pieces of Parquet files through ``cur`` (CSV encoded by pyarrow)."""
    from psycopg.copy import QueuedLibpqWriter

    sql = _sql()
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(sql.Identifier(*table), idents(columns))
    options = pacsv.WriteOptions(include_header=False)
    rows = 0
    # The queued writer sends one chunk while the next one is being encoded.
    with cur.copy(statement, writer=QueuedLibpqWriter(cur)) as copy:
        for path, row_groups in share:
            with fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                for batch in reader.iter_batches(COPY_BATCH_ROWS, row_groups=row_groups, columns=columns):
                    buffer = io.BytesIO()
                    pacsv.write_csv(batch, buffer, options)  # NULL: unquoted empty; '': quoted, as COPY reads
                    copy.write(buffer.getvalue())
                    rows += batch.num_rows
    return rows


# --- loading: publish (on the cluster, committed on the Airflow task's word) -------------


def load(
    uri: str, storage: dict | None, destination: dict[str, Any], load_id: str
) -> tuple[dict[str, Any], Callable[[bool], None]]:
    """Stage and publish a load in one transaction that is left open: ``finish(True)`` commits it,
    ``finish(False)`` rolls it back; so does the end of this process (PostgreSQL rolls back the
    transaction of a closed connection). The Airflow task asks for the commit only once it holds
    the result: a task killed before that leaves the target exactly as it was."""
    # Opened first: short-lived credentials (e.g. RDS IAM tokens) may expire during a long COPY.
    # Keepalives: a backend whose stage process vanished with its node ends its transaction too.
    conn = connect({**destination["conn"], **KEEPALIVES})  # not autocommit: statements open a transaction
    plan = None
    try:
        plan = stage_load(uri, storage, destination, load_id)
        # PostgreSQL itself ends the transaction if no commit comes (held locks stay bounded).
        conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_SECONDS}s'")
        result = publish(conn, plan, storage)
    except BaseException as exc:
        conn.close()
        if plan and plan["staging_table"]:  # the rolled-back load's staged rows
            try:
                with connect(destination["conn"]) as cleanup, cleanup.cursor() as cur:
                    drop_staging_tables(cur, plan["schema"], load_id)
            except Exception:  # noqa: S110 - the retry drops them; the load's own error matters
                pass
        if plan and isinstance(exc, ValueError) and not isinstance(exc, DataError):
            raise DataError(str(exc)) from None
        raise

    def finish(commit: bool) -> None:
        try:
            conn.commit() if commit else conn.rollback()
        finally:
            conn.close()

    return result, finish


def publish(conn, plan: dict[str, Any], storage: dict | None = None) -> dict[str, Any]:
    """Move the staged rows (or, for append and replace_partition, the committed Parquet files,
    read with ``storage``) into the target, in the caller's transaction on ``conn`` (psycopg 3,
    not in autocommit mode): the caller commits or rolls back."""
    started = time.perf_counter()
    result = _publish(conn, plan, storage)
    return {**result, "publish_seconds": round(time.perf_counter() - started, 3)}


def _publish(conn, plan: dict[str, Any], storage: dict | None) -> dict[str, Any]:
    sql = _sql()
    schema, table, mode = plan["schema"], plan["table"], plan["mode"]
    target, columns = sql.Identifier(schema, table), idents(plan["columns"])
    staging = sql.Identifier(schema, plan["staging_table"]) if plan["staging_table"] else None
    ledger = sql.Identifier(schema, LEDGER)
    reported = ("destination", "mode", "rows_written", "load_id", "copy_seconds", "index_seconds")
    result = {key: plan[key] for key in reported}
    result.update(rows_deleted=0, skipped=False, partitions=[])
    with conn.cursor() as cur:
        # One publisher per table at a time (a retry may overlap a killed try's orphan stage).
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [plan["destination"]])
        if staging is not None:
            cur.execute("SELECT to_regclass(%s)", [staging.as_string(conn)])
            if cur.fetchone()[0] is None:
                raise RuntimeError(f"Staging table {schema}.{plan['staging_table']} is gone: the load must be rerun")
        ensure_ledger(cur, schema)
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (target, load_id, mode, rows) VALUES (%s, %s, %s, %s) ON CONFLICT (target, load_id)"
                " DO UPDATE SET rows = EXCLUDED.rows, mode = EXCLUDED.mode, loaded_at = now()"
                " WHERE {}.mode <> 'append' OR EXCLUDED.mode <> 'append' RETURNING 1"
            ).format(ledger, sql.Identifier(LEDGER)),
            [plan["destination"], plan["load_id"], mode, plan["rows_written"]],
        )
        if cur.fetchone() is None:  # this run's append was already published: never twice
            if staging is not None:
                cur.execute(sql.SQL("DROP TABLE {}").format(staging))
            return {**result, "skipped": True, "rows_written": 0}
        exists = table_columns(cur, schema, table) is not None
        if mode == "overwrite" or (plan["first_load"] and _still_first_load(cur, plan, target, exists)):
            _swap(cur, conn, target, staging, schema, table, exists, columns)
            if mode == "upsert" and not exists:  # built once, after the COPY, and named after the table
                with _named_duplicates(plan["destination"]):
                    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(target, idents(plan["keys"])))
            return result
        if not exists:
            if plan["column_types"] is None:
                raise RuntimeError(f"Table {plan['destination']} was dropped while this load ran: rerun it")
            keys = plan["keys"] if mode == "upsert" else []
            primary = sql.SQL(", PRIMARY KEY ({})").format(idents(keys)) if keys else sql.SQL("")
            cur.execute(sql.SQL("CREATE TABLE {} ({}{})").format(target, definition(plan), primary))
        if staging is None:  # append, replace_partition: one COPY straight into the target
            fs = filesystem_for(plan["uri"], storage)[0]
            if mode == "replace_partition":  # a table created just now has nothing to delete
                deleted, result["partitions"] = _delete_partitions(cur, fs, plan, target, delete=exists)
                result["rows_deleted"] = deleted
            started = time.perf_counter()
            rows = copy_files(cur, fs, [(path, None) for path in plan["files"]], (schema, table), plan["columns"])
            result.update(rows_written=rows, copy_seconds=round(time.perf_counter() - started, 3))
            cur.execute(
                sql.SQL("UPDATE {} SET rows = %s WHERE target = %s AND load_id = %s").format(ledger),
                [rows, plan["destination"], plan["load_id"]],
            )
            return result
        _check_conflict_target(cur, plan, target, staging)
        insert = sql.SQL("INSERT INTO {} AS t ({}) ").format(target, columns)
        rows, result["rows_deleted"] = _upsert_rows(cur, plan, target, staging, columns)
        # Into an empty table an upsert is an insert: ON CONFLICT's per-row conflict check made
        # it ~2.5x slower (6M rows: 39-45 s, against 16 s).
        cur.execute(insert + rows + (_on_conflict(plan) if _has_rows(cur, target) else sql.SQL("")))
        cur.execute(sql.SQL("DROP TABLE {}").format(staging))
    return result


def _is_first_load(plan: dict[str, Any]) -> bool:
    """Whether an upsert, if its target is missing or empty, can be staged like an overwrite and
    swapped in: every row is inserted as it is (no version to pick, no delete to apply)."""
    return plan["mode"] == "upsert" and not plan["sequence_by"] and not plan["delete_column"]


def _still_first_load(cur, plan: dict[str, Any], target, exists: bool) -> bool:
    """Whether the target is still as it was when the first load was staged (missing, or empty
    with the same definition); otherwise the staged rows are upserted into it."""
    staged_like_target = plan["column_types"] is None  # the target existed then
    if not exists:
        return not staged_like_target
    # Writers outside this provider (they take no advisory lock) wait from here until the commit.
    cur.execute(_sql().SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
    return staged_like_target and not _has_rows(cur, target)


def _has_rows(cur, table) -> bool:
    cur.execute(_sql().SQL("SELECT EXISTS (SELECT FROM {})").format(table))
    return cur.fetchone()[0]


def _check_conflict_target(cur, plan, target, source) -> None:
    """Fail unless the target has the unique index that ``ON CONFLICT (keys)`` needs. The statement
    is only planned (EXPLAIN): nothing is inserted and no trigger fires."""
    from psycopg import errors

    sql = _sql()
    columns = idents(plan["columns"])
    try:
        cur.execute(
            sql.SQL("EXPLAIN INSERT INTO {} AS t ({}) SELECT {} FROM {}").format(target, columns, columns, source)
            + _on_conflict(plan)
        )
    except errors.InvalidColumnReference as exc:
        raise DataError(
            f"upsert into {plan['destination']} on ({', '.join(plan['keys'])}) needs a primary key or unique "
            "index on exactly those columns"
        ) from exc


def _delete_partitions(cur, fs, plan, target, delete: bool = True) -> tuple[int, list[str]]:
    """Delete the target's rows whose partition key is one of this load's (read from its files,
    distinct per file first); return the count and the partitions."""
    sql = _sql()
    keys = plan["partition_by"]
    tables = [pq.read_table(path, columns=keys, filesystem=fs).group_by(keys).aggregate([]) for path in plan["files"]]
    found = pa.concat_tables(tables).group_by(keys).aggregate([]) if tables else None
    if found is None or found.num_rows == 0:
        return 0, []
    values = [found.column(k).to_pylist() for k in keys]
    partitions = sorted("/".join(map(str, row)) for row in zip(*values, strict=True))
    if not delete:
        return 0, partitions
    # Cast to the target's own column types (Parquet's may differ: timestamptz vs timestamp, ...).
    cur.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname = ANY(%s) AND NOT attisdropped",
        [target.as_string(cur), keys],
    )
    types = dict(cur.fetchall())
    tests = []
    for key, column in zip(keys, values, strict=True):
        # "=" joins by hash; NULL partitions need IS NOT DISTINCT FROM, which compares row by row.
        test = "t.{0} IS NOT DISTINCT FROM s.{0}" if None in column else "t.{0} = s.{0}"
        tests.append(sql.SQL(test).format(sql.Identifier(key)))
    arrays = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(types[k])) for k in keys)
    cur.execute(
        sql.SQL("DELETE FROM {} AS t USING unnest({}) AS s({}) WHERE {}").format(
            target, arrays, idents(keys), sql.SQL(" AND ").join(tests)
        ),
        values,
    )
    return cur.rowcount, partitions


def _upsert_rows(cur, plan, target, staging, columns):
    """Rows to upsert (the latest per key when ``sequence_by`` is set); deletes flagged keys."""
    sql = _sql()
    keys = idents(plan["keys"])
    rows = sql.SQL("SELECT {} FROM {}").format(columns, staging)
    if plan.get("sequence_by"):
        rows = sql.SQL("SELECT DISTINCT ON ({}) {} FROM {} ORDER BY {}, {} DESC").format(
            keys, columns, staging, keys, sql.Identifier(plan["sequence_by"])
        )
    deleted = 0
    flag = plan.get("delete_column")
    if flag:
        latest = sql.SQL("({}) AS s").format(rows)
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = s.{0}").format(sql.Identifier(k)) for k in plan["keys"])
        if plan.get("sequence_by"):  # a delete older than the stored row does not apply
            match += sql.SQL(" AND (t.{0} <= s.{0}) IS NOT FALSE").format(sql.Identifier(plan["sequence_by"]))
        cur.execute(
            sql.SQL("DELETE FROM {} AS t USING {} WHERE {} AND s.{}").format(
                target, latest, match, sql.Identifier(flag)
            )
        )
        deleted = cur.rowcount
        rows = sql.SQL("SELECT {} FROM ({}) AS s WHERE s.{} IS NOT TRUE").format(columns, rows, sql.Identifier(flag))
    return rows, deleted


def _on_conflict(plan):
    sql = _sql()
    if plan["mode"] != "upsert":
        return sql.SQL("")
    updates = [c for c in plan["columns"] if c not in plan["keys"]]
    action = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
        )
        if updates
        else sql.SQL("DO NOTHING")
    )
    if updates and plan.get("sequence_by"):
        # An older version never replaces a newer one: loads (backfills, overlapping runs) may
        # publish in any order and still leave the latest row per key.
        action += sql.SQL(" WHERE (t.{0} <= EXCLUDED.{0}) IS NOT FALSE").format(sql.Identifier(plan["sequence_by"]))
    return sql.SQL(" ON CONFLICT ({}) ").format(idents(plan["keys"])) + action


def _swap(cur, conn, target, staging, schema, table, exists, columns):
    """Overwrite: the staged table becomes the target (a rename, no second copy of the rows),
    with the old table's owner and grants.

    When the swap could not carry the old table over whole (a partitioned table, triggers,
    row-level security, column grants, a publication, foreign keys to other tables, storage
    parameters: ``LIKE ... INCLUDING ALL`` copies none of them), other objects depend on it
    (views, owned sequences) or the loading role may not replace it (not its owner), its rows
    are replaced in place instead (TRUNCATE + INSERT).
    """
    from psycopg import errors

    sql = _sql()
    if not exists:
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(table)))
        cur.execute(sql.SQL("COMMENT ON TABLE {} IS NULL").format(target))  # not the staging table's note
        return
    cur.execute(
        "SELECT obj_description(c.oid, 'pg_class'), pg_get_userbyid(c.relowner), current_user,"
        " c.relkind <> 'r' OR c.relrowsecurity"
        " OR EXISTS (SELECT FROM pg_trigger WHERE tgrelid = c.oid AND NOT tgisinternal)"
        " OR EXISTS (SELECT FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL)"
        " OR EXISTS (SELECT FROM pg_publication_rel WHERE prrelid = c.oid)"
        " OR EXISTS (SELECT FROM pg_constraint WHERE conrelid = c.oid AND contype = 'f')"
        " OR c.reloptions IS NOT NULL"
        " FROM pg_class c WHERE c.oid = to_regclass(%s)",
        [target.as_string(conn)],
    )
    comment, owner, loader, keep_in_place = cur.fetchone()
    if keep_in_place:
        _replace_in_place(cur, target, staging, columns)
        return
    retired = f"{STAGING_PREFIX}old_{uuid.uuid4().hex[:8]}"
    try:
        with conn.transaction():  # a savepoint
            _copy_grants(cur, conn, target, staging)
            renames = _index_renames(cur, conn, target, staging)
            if owner != loader:
                cur.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(staging, sql.Identifier(owner)))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(retired)))
            cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(staging, sql.Identifier(table)))
            cur.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(comment)))
            cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, retired)))
            for staged_name, name in renames:  # the old names are free now
                cur.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(schema, staged_name), sql.Identifier(name)
                    )
                )
    except (errors.DependentObjectsStillExist, errors.InsufficientPrivilege):  # e.g. not the table's owner
        _replace_in_place(cur, target, staging, columns)


def _index_renames(cur, conn, target, staging) -> list[tuple[str, str]]:
    """(staging index, target index) name pairs: LIKE ... INCLUDING ALL names the copied indexes
    (and so their constraints) after the staging table. It copies them in the target's index
    order; if the two lists do not match column for column, the generated names are kept."""
    query = (  # columns by name: a table with dropped columns numbers them differently from its copy
        "SELECT c.relname, i.indisunique, i.indisprimary, i.indclass::text, ARRAY(SELECT a.attname"
        " FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) LEFT JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) ORDER BY i.indexrelid"
    )
    old = cur.execute(query, [target.as_string(conn)]).fetchall()
    new = cur.execute(query, [staging.as_string(conn)]).fetchall()
    if [row[1:] for row in old] != [row[1:] for row in new]:
        return []
    return [(staged[0], kept[0]) for staged, kept in zip(new, old, strict=True)]


def _copy_grants(cur, conn, source, target) -> None:
    """GRANT on ``target`` what is granted on ``source`` (LIKE ... INCLUDING ALL copies no grants)."""
    sql = _sql()
    cur.execute(
        "SELECT a.grantee = 0, r.rolname, a.privilege_type, a.is_grantable"
        " FROM pg_class c CROSS JOIN aclexplode(c.relacl) AS a LEFT JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE c.oid = to_regclass(%s) AND a.grantee <> c.relowner",
        [source.as_string(conn)],
    )
    for public, role, privilege, grantable in cur.fetchall():
        grantee = sql.SQL("PUBLIC") if public else sql.Identifier(role)
        option = sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL("")
        # privilege_type is one of the catalog's privilege keywords (SELECT, INSERT, ...).
        cur.execute(sql.SQL("GRANT {} ON {} TO {}{}").format(sql.SQL(privilege), target, grantee, option))


def _replace_in_place(cur, target, staging, columns) -> None:
    from psycopg import errors

    sql = _sql()
    try:
        if _has_rows(cur, target):  # an empty table (a first upsert) needs none, even if referenced
            cur.execute(sql.SQL("TRUNCATE {}").format(target))
    except errors.FeatureNotSupported as exc:  # emptying it would break other tables' foreign keys
        raise ValueError(f"overwrite cannot replace {target.as_string(cur)}: {exc.diag.message_primary}") from None
    cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(target, columns, columns, staging))
    cur.execute(sql.SQL("DROP TABLE {}").format(staging))


# --- retention: orphaned staging tables --------------------------------------------------

# Only names this module creates: stage_load's ``_raydata_{load_id}_{token}`` and _swap's
# ``_raydata_old_{token}`` (never the ``_raydata_loads`` ledger).
STAGING_NAME = re.compile(r"_raydata_(?:[0-9a-f]+|old)_[0-9a-f]{8}")


def drop_orphaned_staging_tables(
    conn, schemas: Iterable[str], older_than: timedelta, dry_run: bool = False
) -> list[str]:
    """Drop staging tables that killed loads left behind; return their ``schema.table`` names.

    A staging table is old when the creation time ``stage_load`` noted in its comment is before
    ``now() - older_than`` (database clock); a table without that note (made before notes
    existed, or a retired ``_raydata_old_*`` table) counts as old. Either way it is dropped only
    if no other session holds any lock on it: ``LOCK TABLE ... NOWAIT`` fails on a table that a
    COPY, a publish or any open transaction uses, and such a table is skipped, never waited for.
    ``conn``: a psycopg 3 connection; each table is dropped in its own transaction.
    """
    from psycopg import Rollback, errors

    sql = _sql()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname, c.relname, obj_description(c.oid, 'pg_class'), now() FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s) ORDER BY 1, 2",
            [list(schemas)],
        )
        found = [row for row in cur.fetchall() if STAGING_NAME.fullmatch(row[1]) and row[1] != LEDGER]
    dropped = []
    for schema, name, comment, now in found:
        created = _created_at(comment)
        if created is not None and created >= now - older_than:
            continue
        table = sql.Identifier(schema, name)
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE NOWAIT").format(table))
                if dry_run:
                    raise Rollback()
                cur.execute(sql.SQL("DROP TABLE {}").format(table))
        except (errors.LockNotAvailable, errors.UndefinedTable):
            continue  # in use (a running load or publish), or gone meanwhile
        dropped.append(f"{schema}.{name}")
    return dropped


def _created_at(comment: str | None) -> datetime | None:
    """The creation time in a staging table's comment, or None without one."""
    try:
        note = json.loads(comment or "")
        return datetime.fromisoformat(note["created_at"]) if note.get("raydata_staging") else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
