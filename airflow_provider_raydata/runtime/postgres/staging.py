"""Stage a load (on the cluster): check it against the target and, for overwrite and upsert, COPY
the committed Parquet files into a new staging table next to the target, one Ray task per
cluster CPU in parallel (pyarrow reads them and CSV-encodes them for psycopg's COPY; no Ray Data
pipeline in between). Append and replace_partition COPY inside the publish transaction instead."""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import replace

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql

from ...contracts import DataError, Destination, PostgresPlan
from ..refs import data_files
from ..storage import filesystem_for
from ..upsert import check_no_repeated_key
from .common import (
    STAGING_PREFIX,
    connect,
    definition,
    drop_staging_tables,
    ensure_ledger,
    has_rows,
    idents,
    mark_staging_table,
    named_duplicates,
    pg_type,
    table_columns,
    table_parts,
)
from .upsert import check_conflict_target, is_first_load

# Modes whose publish COPYs straight into the target: a staging table would cost a second copy.
DIRECT_MODES = ("append", "replace_partition")
COPY_BATCH_ROWS = 262_144  # CSV-encoded per chunk; smaller chunks cost more per row


def copy_to_staging(uri: str, storage: dict | None, destination: Destination, load_id: str) -> PostgresPlan:
    """Check the load against the target and return the plan for ``publish``. For overwrite and
    upsert, first COPY the committed Parquet dataset at ``uri`` into a new staging table in
    parallel; append and replace_partition COPY inside the publish transaction instead."""
    schema_name, table = table_parts(destination.table)
    fs, path = filesystem_for(uri, storage)
    files = data_files(fs, path)
    arrow_schema = _dataset_schema(fs, files)
    columns = arrow_schema.names
    destination.check_columns(columns)
    mode, rule = destination.mode, destination.upsert
    plan = PostgresPlan(
        destination=f"{schema_name}.{table}",
        schema=schema_name,
        table=table,
        mode=mode,
        columns=columns,
        upsert=rule,
        partition_by=list(destination.partition_by),
        load_id=load_id,
        uri=uri,
        files=[f.path for f in files],
    )
    target = sql.Identifier(schema_name, table)
    staging_name = f"{STAGING_PREFIX}{load_id}_{uuid.uuid4().hex[:8]}"
    staging = sql.Identifier(schema_name, staging_name)
    with connect(destination.conn) as conn, conn.cursor() as cur:
        # Committed now, not in the long publish transaction: loads into other tables of the
        # schema would otherwise wait for that whole transaction on the first CREATE.
        ensure_ledger(cur, schema_name)
        drop_staging_tables(cur, schema_name, load_id)
        existing = table_columns(cur, schema_name, table)
        if existing is None:
            plan = replace(plan, column_types=[pg_type(f) for f in arrow_schema])
        else:
            unknown = [c for c in columns if c not in existing]
            if unknown:
                raise DataError(
                    f"Column {unknown[0]!r} is not in table {schema_name}.{table} (its columns: {', '.join(existing)})"
                )
        if mode in DIRECT_MODES:
            return plan
        if mode == "upsert" and existing is not None:
            check_conflict_target(cur, plan, target, target)  # before anything is copied
        plan = replace(plan, first_load=is_first_load(plan) and (existing is None or not has_rows(cur, target)))
        if mode == "upsert" and not rule.sequence_by and not plan.first_load:
            # Checked before anything is copied (a first load's unique index build finds them), by
            # pyarrow on the files' key columns: PostgreSQL's GROUP BY on staging took 10 s for 6M rows.
            keys = list(rule.keys)
            check_no_repeated_key(
                pa.concat_tables([pq.read_table(f.path, columns=keys, filesystem=fs) for f in files]), rule
            )
        new_columns = definition(columns, plan.column_types) if existing is None else None
        if mode == "overwrite" or plan.first_load:
            # A full, logged table like the target: publish swaps it in (no second copy of the rows).
            like = sql.SQL("LIKE {} INCLUDING ALL").format(target) if existing is not None else new_columns
            cur.execute(sql.SQL("CREATE TABLE {} ({})").format(staging, like))
        elif existing is not None:
            cur.execute(
                sql.SQL("CREATE UNLOGGED TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                    staging, idents(columns), target
                )
            )
        else:
            cur.execute(
                sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(staging, definition(columns, plan.column_types))
            )
        rebuild = _drop_indexes(cur, conn, staging)
        mark_staging_table(cur, staging, load_id)  # same transaction: never visible unmarked
    started = time.perf_counter()
    try:
        rows = copy_in_parallel(uri, fs, files, storage, destination.conn, (schema_name, staging_name), columns)
        copied = time.perf_counter()
        _rebuild_indexes(destination.conn, rebuild, f"{schema_name}.{table}")
    except BaseException:
        with connect(destination.conn) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staging))
        raise
    return replace(
        plan,
        rows_written=rows,
        staging_table=staging_name,
        copy_seconds=round(copied - started, 3),
        index_seconds=round(time.perf_counter() - copied, 3),
    )


def _rebuild_indexes(conn_params: dict, rebuild: list, target: str) -> None:
    with connect(conn_params) as conn, named_duplicates(target):
        for statement in rebuild:
            conn.execute(statement)


def _drop_indexes(cur, conn, table) -> list:
    """Drop the indexes (and the constraints they back) of a new, empty table and return the
    statements that rebuild them, in their order: building an index once after the COPY is
    cheaper than updating it row by row (6M rows with a primary key: 29 s of parallel COPY with
    the key in place, against 23 s without it plus 5 s to build it after)."""
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


def _dataset_schema(fs, files) -> pa.Schema:
    if not files:
        raise DataError("The input dataset has no Parquet files to load")
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
